"""Conversion on small in-memory models: the key table per HF class, HF directories read back, and bad
input refused by name (non-BERT, unknown key, shape mismatch, truncated file or export, pickled code), and
the output written whole or not at all.

A failure points at megamlm/model/hf_keys.py (the table), megamlm/convert/hf.py / zero.py (checks), core.py /
safetensors_io.py (exports, headers) or convert/__init__.py (the output folder)."""

import json
import re
from pathlib import Path

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
    with pytest.raises(Exception):  # noqa: B017 - any failure after the weights were written: nothing may stay
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


# ------------------------------------------------------------------ truncated exports, config errors
ROOT = Path(__file__).resolve().parents[2]


def export(tmp_path):
    from megamlm.convert.core import save_export

    return save_export(weights(), tmp_path / "exp")


@pytest.mark.parametrize("cut", ["few", "half", "header"])
def test_a_truncated_export_is_named_not_taken_for_something_else(tmp_path, cut):
    from megamlm.convert.core import load_any

    d = export(tmp_path)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: {"few": len(raw) - 3, "half": len(raw) // 2, "header": 40}[cut]])
    with pytest.raises(ConvertError) as e:
        load_any(d)
    msg = str(e.value)
    assert msg.startswith(f"{f}: not a readable safetensors file (truncated?): "), msg
    if cut == "few":
        assert msg.endswith("(3 missing)"), msg
    assert "neither" not in msg
    with pytest.raises(ConvertError, match="truncated"):
        load_any(f)  # the file itself
    with pytest.raises(ConvertError, match="truncated"):
        convert(d, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_cli_prints_one_line_for_a_truncated_export_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    d = export(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    r = subprocess.run([sys.executable, "-m", "megamlm", "convert", str(d), str(tmp_path / "out"), "--to", "hf"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"megamlm convert: error: {f}: not a readable safetensors file (truncated?): "), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_safetensors_without_megamlm_metadata_or_at_all(tmp_path):
    from megamlm.convert.core import is_export, load_any

    hf = save_hf(weights(), tmp_path / "hf")
    assert not is_export(hf / "model.safetensors")  # whole, readable, no megamlm metadata
    with pytest.raises(ConvertError, match="neither a megamlm checkpoint"):
        load_any(hf / "model.safetensors")
    assert load_hf(hf).real_vocab_size == V  # the folder is an HF directory
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    with pytest.raises(ConvertError, match=r"junk.safetensors: not a readable safetensors file.*header length"):
        load_any(junk)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert not is_export(other)


def test_read_header_checks_the_sizes_its_header_lays_out(tmp_path):
    from megamlm.convert.safetensors_io import HeaderError, read_header, write_safetensors

    f = tmp_path / "t.safetensors"
    write_safetensors({"a": torch.zeros(3), "b": torch.ones(2, 2)}, f, metadata={"format": "x"})
    h = read_header(f)
    assert h["__metadata__"] == {"format": "x"} and h["b"]["data_offsets"] == [12, 28]
    raw = f.read_bytes()
    for n, what in [(4, "shorter than the 8-byte header length"), (20, "header alone needs"),
                    (len(raw) - 1, "(1 missing)")]:
        f.write_bytes(raw[:n])
        with pytest.raises(HeaderError, match=re.escape(what)):
            read_header(f)


def _checkpoint_folder(tmp_path, config_text: str):
    tag = tmp_path / "ck" / "step00000001"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("")
    (tag.parent / "latest").write_text(tag.name)
    (tag / "config.yaml").write_text(config_text)
    return tag.parent


def test_a_checkpoint_config_error_keeps_its_cause(tmp_path):
    from megamlm.config import ConfigError
    from megamlm.convert.core import load_megamlm_checkpoint

    ck = _checkpoint_folder(tmp_path, "engine: {zero_stage: 7}\nmodel: {hidden_size: big}\n")
    with pytest.raises(ConvertError) as e:
        load_megamlm_checkpoint(ck)
    assert isinstance(e.value.__cause__, ConfigError) and len(e.value.__cause__.problems) == 2
    assert "config.yaml" in str(e.value) and "engine.zero_stage=7" in str(e.value)
    (ck / "step00000001" / "config.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConvertError, match="not a readable YAML config") as e:
        load_megamlm_checkpoint(ck)
    import yaml

    assert isinstance(e.value.__cause__, yaml.YAMLError)


# ------------------------------------------------------------------ the output folder
def test_a_second_run_into_the_same_folder_is_refused_and_touches_nothing(tmp_path):
    src = save_hf(weights(), tmp_path / "src")
    convert(src, tmp_path / "out", "hf")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ConvertError, match=r"out: output folder exists and is not empty"):
        convert(src, tmp_path / "out", "hf")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="file: output exists and is not a folder"):
        convert(src, tmp_path / "file", "hf")


def test_an_empty_output_folder_is_replaced_keeping_its_mode(tmp_path):
    src = save_hf(weights(), tmp_path / "src")
    (tmp_path / "out").mkdir(mode=0o750)
    (tmp_path / "out").chmod(0o750)
    convert(src, tmp_path / "out", "megamlm")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_another_runs_partial_folder_is_never_deleted(tmp_path, caplog):
    """A hidden sibling this call did not create (another conversion's, or one a kill left) stays; a
    warning names it."""
    import logging

    src = save_hf(weights(), tmp_path / "src")
    other = tmp_path / ".out.partial"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"someone else's work in progress")
    with caplog.at_level(logging.WARNING, logger="megamlm.convert"):
        convert(src, tmp_path / "out", "hf")
    assert (other / "model.safetensors").read_bytes() == b"someone else's work in progress"
    assert str(other) in caplog.text and "interrupted conversion" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "out", "src"]


def test_a_failure_removes_the_parent_folders_it_made_and_only_those(tmp_path):
    src = save_hf(weights(), tmp_path / "src")
    bad_tok = tmp_path / "bad.model"
    bad_tok.write_bytes(b"not a sentencepiece model")
    (tmp_path / "keep").mkdir()
    with pytest.raises(Exception):  # noqa: B017 - any failure: the parent folders made for it go too
        convert(src, tmp_path / "keep" / "a" / "b" / "out", "hf", tokenizer=bad_tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model", "keep", "src"]
    assert list((tmp_path / "keep").iterdir()) == []
    convert(src, tmp_path / "keep" / "a" / "b" / "out", "hf")
    assert (tmp_path / "keep" / "a" / "b" / "out" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "keep" / "a" / "b").iterdir()] == ["out"]
