"""Checkpoint folders: what a run may resume from, start fresh in, delete and rename.

A failure here points at megamlm/checkpoint.py: ``resolve_resume`` (a fresh run into a used folder,
``latest`` against the ``COMPLETE`` markers), ``prune`` (retention never deletes what the run did not
write), ``save`` (``COMPLETE`` before ``latest``; a complete checkpoint is never replaced) or
``move_old_run``. The save tests use a real DeepSpeed engine in a spawned gloo process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megamlm import checkpoint as ckpt
from megamlm.checkpoint import CheckpointError, resolve_resume
from tests._spawn import spawn


def make(d: Path, *steps: int, complete: bool = True, latest: int | None = None) -> Path:
    """Step folders as a save leaves them (a file inside, COMPLETE when complete), and ``latest``."""
    d.mkdir(parents=True, exist_ok=True)
    for s in steps:
        f = d / ckpt.tag_for(s)
        f.mkdir(parents=True, exist_ok=True)
        (f / "train_state.json").write_text("{}")
        if complete:
            (f / ckpt.COMPLETE).write_text(ckpt.tag_for(s) + "\n")
    if latest is not None:
        (d / ckpt.LATEST).write_text(ckpt.tag_for(latest) + "\n")
    return d


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    d = make(tmp_path / "ck", 500, 1000, 1500, latest=1500)
    for resume in (None, "none"):
        with pytest.raises(CheckpointError) as e:
            resolve_resume(resume, d)
        msg = str(e.value)
        assert "already holds checkpoints" in msg and "step00001500" in msg
        assert "--resume auto" in msg and "train.output_dir" in msg and "--move-old-run" in msg
    assert ckpt.step_folders(d) == ["step00000500", "step00001000", "step00001500"]  # nothing touched
    # an empty or absent folder, or one with only an interrupted first save, starts fresh
    assert resolve_resume(None, tmp_path / "absent") is None
    assert resolve_resume(None, make(tmp_path / "partial", 3, complete=False)) is None
    # a `latest` file alone (its checkpoint deleted by hand) is still a run
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        resolve_resume(None, make(tmp_path / "latest-only", latest=7))


def test_auto_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    d = make(tmp_path / "a", 3, 6, latest=6)
    assert resolve_resume("auto", d) == "step00000006"
    # a save interrupted after COMPLETE, before `latest` moved: the newer complete one wins, and says so
    make(d, 9)
    with caplog.at_level(logging.WARNING, logger="megamlm.checkpoint"):
        assert resolve_resume("auto", d) == "step00000009"
    assert "step00000009 is complete and newer" in caplog.text
    # no `latest` at all (the first save interrupted there)
    assert resolve_resume("auto", make(tmp_path / "b", 4)) == "step00000004"
    assert resolve_resume("auto", tmp_path / "none-yet") is None


def test_latest_on_a_missing_step_is_refused_offering_the_newest_complete(tmp_path, caplog):
    d = make(tmp_path / "ck", 3, 6, latest=9)
    make(d, 12, complete=False)  # an interrupted save beside them is named in the log
    with caplog.at_level(logging.WARNING, logger="megamlm.checkpoint"):
        with pytest.raises(CheckpointError) as e:
            resolve_resume("auto", d)
    assert "'step00000009', a folder that does not exist" in str(e.value)
    assert "--resume step00000006" in str(e.value)
    assert "step00000012 (no COMPLETE marker: an interrupted save)" in caplog.text


def test_an_explicit_tag_with_newer_checkpoints_beside_it_is_refused(tmp_path):
    d = make(tmp_path / "ck", 3, 6, 9, latest=9)
    with pytest.raises(CheckpointError, match=r"holds newer checkpoints \(step00000006, step00000009\)"):
        resolve_resume("step00000003", d)
    assert resolve_resume("step00000009", d) == "step00000009"
    assert resolve_resume(str(d / "step00000009"), d) == "step00000009"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume("step00000004", d)


def test_retention_keeps_the_current_and_never_touches_newer_folders(tmp_path):
    d = make(tmp_path / "ck", 1, 2, 3, 4, 20)  # 20: newer than the current (never deleted by retention)
    make(d, 5, complete=False)
    ckpt.prune(d, keep_last=2, current="step00000004")
    # newest two complete up to step 4 kept (3, 4); incomplete 5 is newer than the current: kept too
    assert ckpt.step_folders(d) == ["step00000003", "step00000004", "step00000005", "step00000020"]
    make(d, 6)
    (d / "step00000004" / ckpt.COMPLETE).unlink()  # a crash in the middle of an earlier removal
    ckpt.prune(d, keep_last=1, current="step00000006")
    assert ckpt.step_folders(d) == ["step00000006", "step00000020"]


def test_move_old_run_moves_the_runs_files_deletes_nothing_and_keeps_what_the_run_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "r"
    make(out / "checkpoints", 3, latest=3)
    (out / "tb").mkdir()
    (out / "run_status").write_text("complete step00000003\n")
    (out / "shards").mkdir()
    (out / "shards" / "manifest.json").write_text("{}")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "spm.model").write_text("model")
    outside = make(tmp_path / "elsewhere" / "ck", 5, latest=5)
    moved = ckpt.move_old_run(out, outside, inputs=[out / "shards", out / "tokenizer" / "spm.model", ""],
                              stamp="T0")
    old = out.with_name("r.old-T0")
    assert moved == [old / "checkpoints", old / "run_status", old / "tb", outside.with_name("ck.old-T0")]
    assert (old / "checkpoints" / "step00000003" / ckpt.COMPLETE).is_file()
    assert (outside.with_name("ck.old-T0") / "step00000005" / ckpt.COMPLETE).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["shards", "tokenizer"] and not outside.exists()
    assert (out / "tokenizer" / "spm.model").read_text() == "model"
    make(out / "checkpoints", 4)  # a second move in the same second does not collide
    assert ckpt.move_old_run(out, out / "checkpoints", stamp="T0") == [
        out.with_name("r.old-T0-1") / n for n in ("checkpoints", "shards", "tokenizer")]
    with pytest.raises(CheckpointError, match="current folder"):
        ckpt.move_old_run(".", "./checkpoints")


def test_move_old_run_refuses_before_moving_when_the_checkpoints_hold_an_input(tmp_path):
    out = tmp_path / "r"
    make(out / "checkpoints", 3, latest=3)
    (out / "tb").mkdir()
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(CheckpointError, match="step00000003, which this run reads, lies in the checkpoint folder"):
        ckpt.move_old_run(out, out / "checkpoints", inputs=[out / "checkpoints" / "step00000003"], stamp="T0")
    assert sorted(str(p) for p in out.rglob("*")) == before and not out.with_name("r.old-T0").exists()


def test_resume_from_another_runs_checkpoint_folder_is_refused(tmp_path):
    mine, other = make(tmp_path / "a" / "checkpoints", 2, latest=2), make(tmp_path / "b" / "checkpoints", 2, latest=2)
    with pytest.raises(CheckpointError, match="not in this run's checkpoint folder .* --init-from"):
        ckpt.resolve_resume(str(other / "step00000002"), mine)
    assert ckpt.resolve_resume(str(mine / "step00000002"), mine) == "step00000002"


# --------------------------------------------------------------------------- save, with a real engine
def _save_twice_failing_at(rank, world, folder: str, fail_at: str):
    """Save step 1, then step 2 with the write of ``fail_at`` (COMPLETE or latest) failing like a full disk."""
    import deepspeed
    import torch

    model = torch.nn.Linear(4, 2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config={"train_batch_size": 1, "zero_optimization": {"stage": 0}})
    kw = dict(rank=rank, config_yaml="model: {}\n", tokenizer_path=None, keep_last=3, barrier=lambda: None)
    ckpt.save(engine, folder, ckpt.TrainState(step=1), **kw)
    real = ckpt._write_text_atomic

    def failing(path, text):
        if Path(path).name == fail_at:
            raise OSError(28, "No space left on device")
        real(path, text)

    ckpt._write_text_atomic = failing
    try:
        ckpt.save(engine, folder, ckpt.TrainState(step=2), **kw)
    except OSError:
        pass
    else:
        raise AssertionError("the injected failure did not happen")
    finally:
        ckpt._write_text_atomic = real
    with pytest.raises(CheckpointError, match="already a complete checkpoint"):
        ckpt.save(engine, folder, ckpt.TrainState(step=1), **kw)  # never replaced
    return True


@pytest.mark.parametrize("fail_at", [ckpt.COMPLETE, ckpt.LATEST])
def test_a_save_failing_between_complete_and_latest_leaves_latest_on_the_previous(fail_at, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    d = tmp_path / "ck"
    spawn(_save_twice_failing_at, 1, (str(d), fail_at))
    assert (d / ckpt.LATEST).read_text().strip() == "step00000001"
    assert ckpt.is_complete(d, "step00000001")
    assert ckpt.is_complete(d, "step00000002") == (fail_at == ckpt.LATEST)
    # what --resume auto does next: the newest *complete* checkpoint
    assert resolve_resume("auto", d) == ("step00000002" if fail_at == ckpt.LATEST else "step00000001")
