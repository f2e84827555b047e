"""ELECTRA end to end: a real 2-rank ZeRO-3 run on the default corpus (objective.name=electra) → its TensorBoard
scalars; `megamlm convert --to hf` → a discriminator/ (ElectraForPreTraining) and generator/
(ElectraForMaskedLM) pair that transformers loads with nothing missing, whose logits equal megamlm's on
DeepSpeed's own consolidation (fp32, 1e-5); HF → megamlm → HF identical; the ElectraModel export; the bad
--hf-arch refused by name; fine-tuning takes the discriminator as its encoder.

A failure points at megamlm/model/electra.py (the model), megamlm/convert/hf_electra.py and
megamlm/model/hf_electra.py (the export and its key tables), megamlm/convert/zero.py (the generator's tied
decoder in the consolidation) or megamlm/trainer.py (the disc_* scalars).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from tests.e2e._runs import ROOT, final_weights, tb_scalars, tiny_prepared_config
from tests.e2e.test_convert_e2e import _load_quiet, megamlm, torchrun

transformers = pytest.importorskip("transformers")

REST = """
train: {max_steps: 4, log_every: 1, eval_every: 2, eval_batches: 2}
checkpoint: {every_steps: 4}
"""
# the objective of configs/electra-tiny-cpu.yaml (a generator of half the width), on the shared tiny corpus and model
ELECTRA = (*(f"objective.{k}={v}" for k, v in
             yaml.safe_load((ROOT / "configs" / "electra-tiny-cpu.yaml").read_text())["objective"].items()),
           "objective.pair=none")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ZeRO-3, 2-rank fp32 ELECTRA run of 4 steps and its HF export."""
    d = tmp_path_factory.mktemp("electra")
    cfg = tiny_prepared_config(d, REST, warmup=1, model_extra=", dropout: 0.0, attention_dropout: 0.0")
    torchrun(cfg, d / "z3", "engine.zero_stage=3", *ELECTRA)
    megamlm("convert", str(d / "z3" / "checkpoints"), str(d / "hf"), "--to", "hf")
    return d, cfg


def _ours(d: Path, cfg: Path):
    from megamlm.config import load_config
    from megamlm.model import build_model
    from megamlm.tokenizer import Tokenizer

    c = load_config(cfg, [o for o in ELECTRA])
    tok = Tokenizer(c.tokenizer.model)
    m = build_model(c.model, c.objective, tok.padded_vocab_size, tok.vocab_size)
    m.load_state_dict(final_weights(d / "z3" / "checkpoints"))  # DeepSpeed's own consolidation, not ours
    return m.eval(), tok


def test_the_run_logs_the_discriminator_and_the_generator(run):
    d, _ = run
    tb = d / "z3" / "tb"
    for tag in ("mlm_loss", "mlm_accuracy", "disc_loss", "disc_accuracy", "disc_precision", "disc_recall",
                "replaced_share", "loss"):
        s = tb_scalars(tb, f"train/{tag}")
        assert sorted(s) == [1, 2, 3, 4], tag
    share = tb_scalars(tb, "train/replaced_share")
    assert all(0.05 < v < 0.2 for v in share.values()), share  # ~15% masked, nearly all replaced at the start
    loss, mlm, disc = (tb_scalars(tb, f"train/{t}") for t in ("loss", "mlm_loss", "disc_loss"))
    assert loss[1] == pytest.approx(mlm[1] + 50.0 * disc[1], rel=1e-5)  # gen_weight 1, disc_weight 50
    assert sorted(tb_scalars(tb, "eval/disc_loss")) == [0, 2, 4]  # held-out at the start, then every 2 steps


def test_zero3_run_to_hf_logit_parity(run, caplog):
    d, cfg = run
    ours, tok = _ours(d, cfg)
    disc, info, text = _load_quiet(transformers.ElectraForPreTraining, d / "hf" / "discriminator", caplog)
    assert not any(info.values()) and "LOAD REPORT" not in text, (info, text)
    gen, info, text = _load_quiet(transformers.ElectraForMaskedLM, d / "hf" / "generator", caplog)
    assert not any(info.values()) and "LOAD REPORT" not in text, (info, text)
    assert disc.config.vocab_size == gen.config.vocab_size == tok.vocab_size  # padding stripped
    assert (gen.config.hidden_size, gen.config.embedding_size, gen.config.num_hidden_layers) == (32, 64, 2)
    from megamlm.bench import random_batch

    b = random_batch(4, 32, tok.vocab_size, mlm_probability=0.2, padding=True, pair=False, seed=3)
    with torch.no_grad():
        mlm, ids, d_logits = ours.logits(b)
        kw = dict(attention_mask=b.attention_mask.long(), token_type_ids=b.token_type_ids)
        g_ref = gen(input_ids=b.input_ids, **kw).logits.reshape(-1, tok.vocab_size)[b.mlm_positions]
        d_ref = disc(input_ids=ids, **kw).logits
    torch.testing.assert_close(mlm, g_ref, atol=1e-5, rtol=0)
    m = b.attention_mask
    torch.testing.assert_close(d_logits[m], d_ref[m], atol=1e-5, rtol=0)
    base, info, _ = _load_quiet(transformers.AutoModel, d / "hf" / "discriminator", caplog)
    assert type(base).__name__ == "ElectraModel" and not info["missing_keys"]
    assert all(k.startswith("discriminator_predictions.") for k in info["unexpected_keys"])


def test_round_trip_hf_megamlm_hf_and_the_electra_model_export(run, tmp_path, caplog):
    d, _ = run
    from safetensors.torch import load_file

    from megamlm.convert import convert  # in this process: the CLI path is the fixture's

    convert(d / "hf", tmp_path / "m", "megamlm")
    convert(tmp_path / "m", tmp_path / "hf2", "hf")
    for part in ("discriminator", "generator"):
        a, b = load_file(d / "hf" / part / "model.safetensors"), load_file(tmp_path / "hf2" / part / "model.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
        assert json.loads((d / "hf" / part / "config.json").read_text()) == \
            json.loads((tmp_path / "hf2" / part / "config.json").read_text())
    convert(d / "z3" / "checkpoints", tmp_path / "base", "hf", hf_arch="ElectraModel")
    model, info, text = _load_quiet(transformers.AutoModel, tmp_path / "base" / "discriminator", caplog)
    assert type(model).__name__ == "ElectraModel" and not any(info.values()), info


def test_bad_architectures_are_refused_by_name(run, tmp_path):
    from megamlm.convert import ConvertError, convert

    d, _ = run
    with pytest.raises(ConvertError, match=r"is an ELECTRA checkpoint \(objective.name=electra\).*choose "
                                           r"ElectraForPreTraining or ElectraModel"):
        convert(d / "z3" / "checkpoints", tmp_path / "o", "hf", hf_arch="BertForPreTraining")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConvertError, match=r"discriminator/ \(ElectraForPreTraining\) and generator/"):
        convert(d / "hf" / "discriminator", tmp_path / "o2", "megamlm")


def test_finetuning_takes_the_discriminator_as_its_encoder(run):
    d, _ = run
    from megamlm.finetune.weights import load_pretrained

    ref = final_weights(d / "z3" / "checkpoints")
    for source in (d / "z3" / "checkpoints", d / "hf"):
        p = load_pretrained(str(source))
        assert set(p.encoder_state) == {k[len("encoder."):] for k in ref if k.startswith("encoder.")}
        assert p.model.hidden_size == 64 and p.pooler_state is None
        real = p.encoder_state["embeddings.word_embeddings.weight"].shape[0]
        for k, v in p.encoder_state.items():
            want = ref[f"encoder.{k}"]
            torch.testing.assert_close(v, want[:real] if k == "embeddings.word_embeddings.weight" else want,
                                       atol=0, rtol=0, msg=k)
    logging.getLogger(__name__).info("checked %d encoder tensors", len(p.encoder_state))


def test_megamlm_finetune_trains_on_the_electra_discriminator(run, tmp_path):
    """`megamlm finetune` with init.checkpoint = the ELECTRA run: token classification (WNUT-16) on the
    discriminator's encoder, through the same code as for a BERT checkpoint."""
    from tests.e2e.test_finetune_e2e import FAST, _finetune

    d, _ = run
    out = _finetune("configs/finetune/wnut16.yaml", d / "z3" / "checkpoints", tmp_path / "ft", *FAST, "train.epochs=1")
    assert out["steps"] == 25 and set(out["test"]) >= {"precision", "recall", "f1", "loss"}
