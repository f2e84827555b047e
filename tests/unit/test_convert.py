"""Conversion on small in-memory models: the key table per HF class, HF directories read back, and bad
input refused by name (non-BERT, unknown key, shape mismatch, truncated file, pickled code).

A failure points at megamlm/model/hf_keys.py (the table) or megamlm/convert/hf.py / zero.py (checks)."""

import json

import pytest
import torch

from megamlm.config import ModelConfig, ObjectiveConfig
from megamlm.convert import ConvertError, convert
from megamlm.convert.core import Weights
from megamlm.convert.hf import load_hf, save_hf
from megamlm.convert.zero import safe_load
from megamlm.model import build_model
from megamlm.model.hf_keys import to_hf_arch

transformers = pytest.importorskip("transformers")
V = 77


def weights(pair="nsp") -> Weights:
    from megamlm.config import config_to_dict

    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=40)
    m = build_model(mc, ObjectiveConfig(pair=pair), V)
    return Weights(dict(m.state_dict()), config_to_dict(mc), pair, V, source="test")


@pytest.mark.parametrize("arch", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
def test_table_gives_each_hf_class_exactly_its_keys(arch):
    w = weights()
    hf = getattr(transformers, arch)(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=64,
                                                             max_position_embeddings=40))
    got = to_hf_arch(w.state, arch)
    missing, unexpected = hf.load_state_dict(got, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                                               "embeddings.position_ids", "bert.embeddings.position_ids"}


def test_hf_dir_round_trip_and_missing_heads(tmp_path):
    w = weights()
    save_hf(w, tmp_path / "pt")
    back = load_hf(tmp_path / "pt")
    for k, v in w.state.items():
        assert torch.equal(back.state[k], v), k
    save_hf(w, tmp_path / "base", "BertModel")
    base = load_hf(tmp_path / "base")
    assert base.report["initialise"] == ["mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.norm.weight",
                                         "mlm_head.norm.bias", "mlm_head.decoder.bias",
                                         "pair_head.classifier.weight", "pair_head.classifier.bias"]
    convert(tmp_path / "base", tmp_path / "exp", "megamlm")  # heads initialised, reported, whole model written
    assert json.loads((tmp_path / "exp" / "convert_report.json").read_text())["initialised"]


def test_a_failure_part_way_leaves_no_output(tmp_path):
    w = weights()
    src = save_hf(w, tmp_path / "src", "BertForPreTraining")
    bad_tok = tmp_path / "bad.model"
    bad_tok.write_bytes(b"not a sentencepiece model")  # fails after the weights were written
    with pytest.raises(Exception):
        convert(src, tmp_path / "out", "hf", tokenizer=bad_tok)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    convert(src, tmp_path / "out", "hf")  # the same call without the bad tokenizer succeeds
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list(tmp_path.glob(".out*"))


def test_bad_hf_directories_are_refused_by_name(tmp_path):
    w = weights()
    d = save_hf(w, tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(ConvertError, match="not a BERT model"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ConvertError, match=r"bert.encoder.layer|encoder.layers.0.ffn.up.weight: shape \[64, 32\]"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    save_file({**sd, "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)}, str(d / "model.safetensors"))
    with pytest.raises(ConvertError, match="rotary"):
        load_hf(d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConvertError, match="model.safetensors.*truncated"):
        load_hf(d)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"x": torch.zeros(1), "y": Evil()}, f)
    with pytest.raises(ConvertError, match="weights-only"):
        safe_load(f)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(ConvertError, match="weights-only"):
        safe_load(f, deepspeed_classes=True)



def test_streaming_safetensors_writer_is_read_back_by_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megamlm.convert.safetensors_io import write_safetensors

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    ts = {"w": torch.randn(5, 3), "bf": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
          "strided": base[:, ::2], "rows": base[1:3], "ids": torch.tensor([3, -1], dtype=torch.int64),
          "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    write_safetensors(ts, tmp_path / "m.safetensors", metadata={"format": "x", "n": 3})
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == set(ts)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "x", "n": "3"}
