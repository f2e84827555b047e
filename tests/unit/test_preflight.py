"""Validation in one place (megamlm/preflight.py): what pretraining and fine-tuning refuse to start with,
found from the config and the files it names before any process group, and `megamlm check-config` running
the same checks on either kind of config (a fine-tuning one is told by its init / task / head sections).

The pretrained source is a megamlm checkpoint folder laid out as `pretrain` writes it (latest, a complete
step folder, config.yaml, tokenizer/) with a real SentencePiece model; its weights are never read here.
A failure points at megamlm/preflight.py, megamlm/finetune/weights.py (inspect_pretrained) or
megamlm/cli.py (cmd_check_config).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megamlm.cli import main
from megamlm.config import ConfigError, load_config
from megamlm.finetune.config import load_finetune_config
from megamlm.preflight import check_finetune, finetune_problems, pretrain_problems
from tests import data_fixtures as fx

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
WIKI = ROOT / "configs" / "finetune" / "wiki-topic.yaml"
WNUT = ROOT / "configs" / "finetune" / "wnut16.yaml"
CUDA = torch.cuda.is_available()


def fake_checkpoint(root: Path, val_fraction: float | None = 0.1, tokenizer: bool = True) -> Path:
    """A checkpoints folder as pretraining leaves it, minus the weights."""
    tag = root / "step00000004"
    tag.mkdir(parents=True)
    data = {} if val_fraction is None else {"val_fraction": val_fraction}
    (tag / "config.yaml").write_text(yaml.safe_dump({"data": data, "model": {"hidden_size": 32}}))
    if tokenizer:
        (tag / "tokenizer").mkdir()
        for f in (fx.tokenizer_path(), fx.tokenizer_path().with_suffix(".json")):
            shutil.copy(f, tag / "tokenizer" / f.name)
    (tag / "COMPLETE").write_text("")
    (root / "latest").write_text("step00000004\n")
    return root


def check_config(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["check-config", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------- check-config

def test_check_config_on_a_bad_finetune_config_names_the_key(capsys, tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    rc, out, err = check_config(capsys, WNUT, f"init.checkpoint={ck}", "train.batch_size=5", "train.patiense=2",
                                "--world-size", "2")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert "(2 problems)" in err, err
    assert "train.batch_size=5 is not a multiple of the world size 2" in err
    assert "train.'patiense'" in err and "did you mean 'patience'" in err


def test_check_config_of_a_good_finetune_config_says_what_it_did_not_check(capsys, tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    rc, out, err = check_config(capsys, WNUT, f"init.checkpoint={ck}")
    assert rc == 0, err
    assert f"checkpoint: {ck}" in out and "reader: wnut16" in out  # the resolved fine-tuning config
    lines = err.strip().splitlines()
    assert lines[0] == "# not checked: train.batch_size against the world size (pass --world-size N)"
    assert lines[1].startswith("# not checked: the examples of ") and "read when the run starts" in lines[1]
    assert lines[-1] == "# configuration is valid as far as checked (2 check(s) not run, above)"
    rc, out, err = check_config(capsys, WNUT, f"init.checkpoint={ck}", "--world-size", "4")
    assert rc == 0 and "# world size 4: data-parallel 4; step 32 sequences = micro 8 x data-parallel 4" in out


def test_check_config_finetune_flag_and_detection(capsys, tmp_path):
    """--finetune reads a file without fine-tuning sections as one (its defaults name no checkpoint);
    without the flag it is a pretraining config, whose train section has no epochs."""
    bare = tmp_path / "ft.yaml"
    bare.write_text("train:\n  epochs: 1\n")
    rc, _, err = check_config(capsys, bare, "--finetune")
    assert rc == 2 and "init.checkpoint is empty" in err, err
    rc, _, err = check_config(capsys, bare)
    assert rc == 2 and "unknown key train.'epochs'" in err and "init.checkpoint" not in err, err


@pytest.mark.skipif(CUDA, reason="the device problems shown are those of a machine without CUDA")
@pytest.mark.parametrize("over,said", [
    ("engine.precision=fp16", "engine.precision='fp16' needs a CUDA device"),
    ("optim.name=lamb", "optim.name='lamb' needs engine.zero_stage=0 (it is 1)"),
    ("engine.backend=nccl", "engine.backend='nccl' needs CUDA"),
])
def test_check_config_runs_the_device_checks_of_pretraining(capsys, tmp_path, over, said):
    files = [f"tokenizer.model={tmp_path / 'spm.model'}", f"data.shards_dir={tmp_path / 'shards'}"]
    rc, out, err = check_config(capsys, TINY, *files, over)
    assert rc == 2 and out == "" and said in err and "(1 problem)" in err, err


def test_check_config_runs_the_device_checks_of_finetuning(capsys, tmp_path):
    from megamlm.ops import cpu_kernels

    ck = fake_checkpoint(tmp_path / "ck")
    previous = cpu_kernels.set_enabled(False)  # as on a machine without a C compiler
    try:
        rc, _, err = check_config(capsys, WNUT, f"init.checkpoint={ck}", "engine.kernels=cpu")
    finally:
        cpu_kernels.set_enabled(previous)
    assert rc == 2 and "engine.kernels=cpu: the CPU kernels " in err, err
    if not CUDA:
        rc, _, err = check_config(capsys, WNUT, f"init.checkpoint={ck}", "engine.precision=fp16")
        assert rc == 2 and "engine.precision='fp16' needs a CUDA device" in err, err


def test_an_engine_field_that_failed_is_not_checked_against_the_device(capsys, tmp_path):
    files = [f"tokenizer.model={tmp_path / 'spm.model'}", f"data.shards_dir={tmp_path / 'shards'}"]
    rc, _, err = check_config(capsys, TINY, *files, "engine.kernels=fast", "engine.zero_stage=7")
    assert rc == 2 and "(2 problems)" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------- the checks themselves

def test_pretrain_problems_are_config_engine_and_files(tmp_path):
    cfg = load_config(TINY, [f"tokenizer.model={tmp_path / 'spm.model'}", f"data.shards_dir={tmp_path / 's'}",
                             "engine.global_batch_size=48"])
    problems = pretrain_problems(cfg, 5)
    assert any("engine.global_batch_size=48" in p for p in problems), problems  # the world-size arithmetic
    assert any("spm.model' does not exist" in p for p in problems) and any("no manifest.json" in p for p in problems)
    if not CUDA:
        fp16 = load_config(TINY, [f"tokenizer.model={fx.tokenizer_path()}", f"data.shards_dir={fx.shards()}",
                                  "engine.precision=fp16"])
        assert pretrain_problems(fp16, 1) == ["engine.precision='fp16' needs a CUDA device (DeepSpeed has no fp16 "
                                              "on CPU); use bf16 or fp32"]


def test_heldout_fraction_against_the_checkpoints_val_fraction(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck", val_fraction=0.1)
    assert finetune_problems(load_finetune_config(WIKI, [f"init.checkpoint={ck}"]), 1) == []  # 0 = the checkpoint's
    over = load_finetune_config(WIKI, [f"init.checkpoint={ck}", "task.heldout_fraction=0.3"])
    assert finetune_problems(over, 1) == [
        f"task.heldout_fraction=0.3 exceeds the pretraining data.val_fraction=0.1 of {ck / 'step00000004'}: the "
        "encoder saw some of these articles; pretrain with data.val_fraction >= 0.3"]
    unknown = fake_checkpoint(tmp_path / "ck2", val_fraction=None)
    assert finetune_problems(load_finetune_config(WIKI, [f"init.checkpoint={unknown}"]), 1) == [
        "task.heldout_fraction=0 and the init checkpoint names no data.val_fraction: set it"]
    r = check_finetune(load_finetune_config(WIKI, [f"init.checkpoint={unknown}", "task.heldout_fraction=0.2"]), 1)
    assert r.problems == [] and any("may have seen these articles" in u for u in r.unchecked), r


def test_the_tokenizer_is_found_or_named(tmp_path):
    bare = fake_checkpoint(tmp_path / "ck", tokenizer=False)
    assert finetune_problems(load_finetune_config(WNUT, [f"init.checkpoint={bare}"]), 1) == [
        f"{bare / 'step00000004'} holds no SentencePiece tokenizer: set init.tokenizer"]
    assert finetune_problems(load_finetune_config(WNUT, [f"init.checkpoint={bare}",
                                                         f"init.tokenizer={fx.tokenizer_path()}"]), 1) == []
    gone = tmp_path / "gone.model"
    r = check_finetune(load_finetune_config(WNUT, [f"init.checkpoint={bare}", f"init.tokenizer={gone}"]), 1)
    assert r.problems == [] and len(r.missing) == 1 and r.missing[0].startswith("init.tokenizer: ")
    assert finetune_problems(load_finetune_config(WNUT, [f"init.checkpoint={bare}", f"init.tokenizer={gone}"]), 1)


def test_a_missing_checkpoint_or_task_file_is_refused(tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    absent = tmp_path / "nothing"
    r = check_finetune(load_finetune_config(WNUT, [f"init.checkpoint={absent}"]), 2)
    assert r.missing == [f"init.checkpoint={str(absent)!r} does not exist"] and r.problems == []
    assert any("megamlm pretrain makes it" in u for u in r.unchecked)
    conll = load_finetune_config(WNUT, [f"init.checkpoint={ck}", "task.reader=conll", f"task.path={absent}.txt"])
    assert finetune_problems(conll, 1) == [f"task.path='{absent}.txt' does not exist"]
    (tmp_path / "not-a-source").mkdir()
    problems = finetune_problems(load_finetune_config(WNUT, [f"init.checkpoint={tmp_path / 'not-a-source'}"]), 1)
    assert len(problems) == 1 and problems[0].startswith("init.checkpoint: ") and "neither a megamlm" in problems[0]


def test_finetune_refuses_before_any_process_group(tmp_path, monkeypatch):
    """train.batch_size against the world size (and the other checks) run before init_distributed."""
    import torch.distributed as dist

    from megamlm.finetune.train import finetune

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    ck = fake_checkpoint(tmp_path / "ck")
    cfg = load_finetune_config(WNUT, [f"init.checkpoint={ck}", "train.batch_size=5",
                                      f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="train.batch_size=5 is not a multiple of the world size 2") as e:
        finetune(cfg)
    assert "finetune with world size 2" in str(e.value)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
