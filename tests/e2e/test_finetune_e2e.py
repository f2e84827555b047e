"""`megamlm finetune` end to end on the tiny demo checkpoint (runs/tiny-cpu/checkpoints, made by
`bash tools/demo.sh`; skipped when absent) and the real WNUT-16 data: DeepSpeed engine, TensorBoard,
checkpoints and resume, report, HF export; and pretrained > random initialisation on held-out Wikipedia
topics (frozen encoder, fixed seed) with runs/tiny-cpu-ft/checkpoints (skipped when absent).

A failure points at megamlm/finetune/train.py (loop, evaluation, best weights, resume), weights.py
(loading the checkpoint), report.py or export.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e._runs import ROOT, free_port, launch, tb_scalars

CKPT = ROOT / "runs" / "tiny-cpu" / "checkpoints"
# A tiny model pretrained with a large held-out share, so that held-out Wikipedia articles are enough to
# fine-tune on (configs/finetune/wiki-topic.yaml says how to make it).
CKPT_FT = ROOT / "runs" / "tiny-cpu-ft" / "checkpoints"
MARGIN = 0.05
FAST = ["task.max_examples=400", "task.max_len=64", "train.epochs=2", "train.batch_size=16", "train.eval_every=10",
        "optim.head_lr=5e-3", "optim.encoder_lr=1e-3", "train.seed=7", "checkpoint.every_evals=1"]


def _run(out: Path, *extra: str, flags=()) -> dict:
    launch(["env", f"MASTER_PORT={free_port()}", sys.executable, "-m", "megamlm", "finetune", "configs/finetune/wnut16.yaml", f"init.checkpoint={CKPT}",
            f"train.output_dir={out}", *FAST, *extra, *flags], timeout=240)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(not (CKPT / "latest").is_file(), reason="no tiny demo checkpoint: run `bash tools/demo.sh`")
def test_finetune_wnut16_round_trips(tmp_path):
    pre = _run(tmp_path / "pre", flags=["--report", "--export", str(tmp_path / "hf")])
    assert pre["sizes"]["train"] == 400 and pre["steps"] == 2 * 25
    assert set(pre["test"]) >= {"precision", "recall", "f1", "loss"}
    # TensorBoard, checkpoints, report and export exist
    assert tb_scalars(tmp_path / "pre" / "tb", "eval/f1")
    assert (tmp_path / "pre" / "checkpoints" / "latest").is_file()
    for f in ("report.png", "report.md", "report.json"):
        assert (tmp_path / "pre" / f).stat().st_size > 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForTokenClassification"] and cfg["id2label"]["0"] == "O"
    # resume of a finished run: no further steps, the same best weights, the same test metrics
    again = _run(tmp_path / "pre", flags=["--resume", "auto"])
    assert again["steps"] == pre["steps"] and again["test"] == pre["test"]


@pytest.mark.skipif(not (CKPT_FT / "latest").is_file(),
                    reason="no runs/tiny-cpu-ft checkpoint (see configs/finetune/wiki-topic.yaml)")
def test_pretrained_encoder_beats_random_on_wiki_topic(tmp_path):
    """Frozen encoder, fixed seed: the pretrained features classify held-out articles' topics better."""
    acc = {}
    for name, rnd in (("pre", "false"), ("rnd", "true")):
        out = tmp_path / name
        launch(["env", f"MASTER_PORT={free_port()}", sys.executable, "-m", "megamlm", "finetune",
                "configs/finetune/wiki-topic.yaml", f"init.checkpoint={CKPT_FT}", f"init.random={rnd}",
                f"train.output_dir={out}", "train.freeze_encoder=true", "task.max_examples=600", "task.max_len=64",
                "train.epochs=3", "train.seed=3", "checkpoint.every_evals=0", "telemetry.tensorboard=false"],
               timeout=240)
        s = json.loads((out / "summary.json").read_text())
        assert s["encoder_unchanged"] is True
        acc[name] = s["test"]["accuracy"]
    assert acc["pre"] > acc["rnd"] + MARGIN, acc
