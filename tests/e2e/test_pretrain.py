"""`megamlm pretrain` end to end on the real default corpus: launchers, TensorBoard, checkpoints, exact
resume after SIGKILL, preemption by SIGTERM, fail-fast checks.

A failure here points at megamlm/pretrain.py and megamlm/trainer.py (the loop, the stop flag), at
megamlm/checkpoint.py (what a checkpoint holds, `latest`), at megamlm/distributed/env.py (a launcher's
variables), or at the loader's resumable state (megamlm/data/loader.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e._runs import (BIN, ROOT, clean_env, final_weights, free_port, launch, read_json, tb_scalars,
                             tiny_prepared_config)

REST = """
train: {max_steps: 8, log_every: 1, eval_every: 4, eval_batches: 2}
checkpoint: {every_steps: 3, keep_last: 5}
"""
STEPS = 8


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    return tiny_prepared_config(tmp_path_factory.mktemp("pretrain"), REST)


def pretrain_cmd(launcher: str, cfg: Path, out: Path, *over: str) -> list[str]:
    args = ["pretrain", str(cfg), f"train.output_dir={out}", *over]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megamlm", *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()), "--no_local_rank",
                "--module", "megamlm", *args]
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--bind-to", "none", "--mca", "btl", "self,vader",
                "--mca", "oob_tcp_if_include", "lo", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", "DS_ACCELERATOR",
                "-x", "GLOO_SOCKET_IFNAME", "-x", f"MASTER_PORT={free_port()}", "-np", "2",
                sys.executable, "-m", "megamlm", *args]
    if launcher == "single":
        return [sys.executable, "-m", "megamlm", *args]
    raise ValueError(launcher)


def mpirun_missing() -> str:
    if shutil.which("mpirun") is None:
        return "mpirun not installed (tools/setup.sh installs Open MPI where apt-get runs as root)"
    return ""


@pytest.fixture(scope="module")
def reference(cfg_file, tmp_path_factory):
    """The uninterrupted 2-rank run (torchrun, ZeRO 1): per-step losses and final weights; steps 2-3 traced
    by the profiler (which changes nothing else)."""
    out = tmp_path_factory.mktemp("ref")
    r = launch(pretrain_cmd("torchrun", cfg_file, out, "engine.zero_stage=1", "train.profile_steps=[2,3]"))
    return out, r


def losses(out: Path) -> dict[int, float]:
    return tb_scalars(out / "tb", "train/loss")


def test_demo_run_trains_logs_and_checkpoints(reference):
    out, r = reference
    assert "held-out MLM accuracy:" in r.stdout and "done: step 8" in r.stdout
    assert "kernels: cpu (" in r.stderr  # the ops backend, said once at start
    tb = out / "tb"
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for tag in ("train/mlm_loss", "train/pair_loss", "train/mlm_accuracy", "train/pair_accuracy", "train/lr",
                "train/grad_norm", "train/loss_scale", "train/tokens_per_second", "train/samples_per_second",
                "train/padding_share", "train/examples_per_micro_batch", "train/tokens_per_step",
                "train/mfu", "train/memory_gb", "train/skipped_steps", "train/data_dropped_batches", "eval/mlm_loss",
                "train/step_ms_max", "train/step_ms_min", "train/data_wait_ms_max", "train/data_wait_ms_min",
                "train/slowest_rank", "train/memory_gb_max",
                "eval/mlm_accuracy", "eval/pair_accuracy"):
        assert tb_scalars(tb, tag), f"no TensorBoard scalar {tag}"
    assert sorted(tb_scalars(tb, "eval/mlm_loss")) == [0, 4, 8]
    # Per step: the counts' all-reduce, and the loader's agreement once per data.agree_every (16)
    # micro-batches (was one per micro-batch + 1); gloo on CPU, so each is a host sync too.
    coll, syncs = tb_scalars(tb, "train/collectives_per_step"), tb_scalars(tb, "train/host_syncs_per_step")
    assert coll == syncs and sorted(coll) == list(range(1, STEPS + 1))
    assert statistics.median(coll.values()) == 1 and sum(coll.values()) / STEPS <= 1.5, coll
    # Across ranks, gathered at each log line: the spread is real (two processes never take equal time)
    lo, hi = tb_scalars(tb, "train/step_ms_min"), tb_scalars(tb, "train/step_ms_max")
    assert all(0 < lo[s] <= hi[s] for s in lo) and set(tb_scalars(tb, "train/slowest_rank").values()) <= {0.0, 1.0}
    assert all(m >= n for m, n in zip(tb_scalars(tb, "train/memory_gb_max").values(),
                                      tb_scalars(tb, "train/memory_gb").values()))
    trace = json.loads((out / "profile" / "rank0_steps2-3.json").read_text())
    assert len(trace["traceEvents"]) > 100 and not (out / "profile" / "rank1_steps2-3.json").exists()
    lr = tb_scalars(tb, "train/lr")
    assert lr[2] == pytest.approx(2e-3) and lr[8] < lr[3]  # warm-up then linear decay
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags, hparams = set(), set()
    for f in tb.glob("events*"):
        acc = EventAccumulator(str(f), size_guidance={"tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"])
        try:
            hparams |= set(acc.PluginTagToContent("hparams"))
        except KeyError:
            pass
    assert "config/text_summary" in tags  # the resolved config as text
    assert "_hparams_/session_start_info" in hparams  # and as hparams, with the final metrics
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step00000008"
    assert sorted(p.name for p in ck.glob("step*")) == ["step00000003", "step00000006", "step00000008"]
    st = read_json(ck / "step00000008" / "train_state.json")
    assert st["step"] == 8 and st["consumed_samples"] == 8 * 16 and st["consumed_tokens"] > 0
    assert (ck / "step00000008" / "tokenizer" / "spm.model").is_file()
    assert (ck / "step00000008" / "config.yaml").is_file()


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
def test_launchers_give_the_same_losses(launcher, cfg_file, reference, tmp_path):
    if launcher == "mpirun" and mpirun_missing():
        pytest.skip(mpirun_missing())
    ref_out, _ = reference
    launch(pretrain_cmd(launcher, cfg_file, tmp_path, "engine.zero_stage=1", "train.eval_every=0"))
    got, ref = losses(tmp_path), losses(ref_out)
    assert sorted(got) == sorted(ref)
    assert [got[k] for k in sorted(got)] == pytest.approx([ref[k] for k in sorted(ref)], abs=1e-5)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (ranks, their DataLoader workers), parents first."""
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int, sig: int) -> list[int]:
    """``sig`` to the launcher and every process below it; their pids. Not a killpg: torchrun starts each
    rank in its own session, so a signal to the launcher's process group alone leaves the ranks running."""
    procs = [pid, *_descendants(pid)]
    for p in procs:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return procs


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _run_until(cmd: list[str], trigger, sig: int, whole_group: bool, timeout: float = 240):
    """Start cmd, poll ``trigger()`` every 5 ms, then send ``sig`` to the launcher and every process below
    it, or else to the launcher's first child alone (one rank); return (returncode, output, sent). Every
    process of the run is gone when it returns."""
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    sent, procs = False, []
    while p.poll() is None and time.monotonic() < deadline:
        if not sent and trigger():
            if whole_group:
                procs = _kill_tree(p.pid, sig)
            else:
                os.kill(_children(p.pid)[0], sig)
            sent = True
        time.sleep(0.005)
    if p.poll() is None:
        procs += _kill_tree(p.pid, signal.SIGKILL)
    rc = p.wait(timeout=120)
    end = time.monotonic() + 60
    while not all(_gone(q) for q in procs):  # a killed launcher's ranks are orphans now: wait for them by pid
        assert time.monotonic() < end, f"processes {[q for q in procs if not _gone(q)]} outlived the kill"
        time.sleep(0.01)
    log.seek(0)
    return rc, log.read(), sent


KILL_OVER = ("train.max_steps=12", "data.micro_batch_size=32", "train.eval_every=0")


ELECTRA = ("objective.name=electra", "objective.pair=none", "objective.generator_hidden_fraction=0.5")


@pytest.mark.parametrize("stage,packing,objective", [(1, False, "mlm"), (2, False, "mlm"), (3, False, "mlm"),
                                                     (2, True, "mlm"), (2, False, "electra")])
def test_sigkill_at_an_arbitrary_step_then_resume_is_exact(stage, packing, objective, cfg_file, tmp_path,
                                                           tmp_path_factory):
    """Uninterrupted vs killed with SIGKILL (all ranks, the moment the step-6 checkpoint is complete, so in
    the middle of a later step) and resumed with --resume auto: the same loss at every step, the same final
    weights, the same data position; padded, and packed (data.packing: micro-batches of whole examples
    in one row, no padding); and ELECTRA, whose generator samples from the RNG streams the checkpoint saves."""
    over = (f"engine.zero_stage={stage}", *KILL_OVER, f"data.packing={str(packing).lower()}",
            *(ELECTRA if objective == "electra" else ()))
    full = tmp_path_factory.mktemp(f"full{stage}{'p' if packing else ''}{objective}")
    launch(pretrain_cmd("torchrun", cfg_file, full, *over))
    ck = tmp_path / "checkpoints"
    rc, log, sent = _run_until(pretrain_cmd("torchrun", cfg_file, tmp_path, *over),
                               lambda: (ck / "step00000006" / "COMPLETE").exists(), signal.SIGKILL, whole_group=True)
    assert sent and rc != 0, log[-3000:]
    killed_at = (ck / "latest").read_text().strip()
    assert killed_at in ("step00000006", "step00000009"), killed_at  # never the end: it was killed mid-run
    launch(pretrain_cmd("torchrun", cfg_file, tmp_path, *over) + ["--resume", "auto"])
    a, b = losses(full), losses(tmp_path)
    assert sorted(b) == list(range(1, 13))
    assert [b[k] for k in range(1, 13)] == pytest.approx([a[k] for k in range(1, 13)], abs=1e-6)
    wa, wb = final_weights(full / "checkpoints"), final_weights(ck)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    sa = read_json(full / "checkpoints" / "step00000012" / "train_state.json")
    sb = read_json(ck / "step00000012" / "train_state.json")
    assert sa["loader"] == sb["loader"] and sa["consumed_samples"] == sb["consumed_samples"]
    assert sa["consumed_tokens"] == sb["consumed_tokens"]
    pad, per_micro = tb_scalars(full / "tb", "train/padding_share"), tb_scalars(full / "tb", "train/examples_per_micro_batch")
    if packing:  # no padding, and more examples than 32 rows fit in 32 x 64 tokens of short examples
        assert sa["consumed_samples"] > 12 * 64 and set(pad.values()) == {0.0}
        assert min(per_micro.values()) >= 32 and max(per_micro.values()) > 32
        assert sa["loader"]["packing"] == 32 * 64
    else:
        assert sa["consumed_samples"] == 12 * 64 and min(pad.values()) > 0 and set(per_micro.values()) == {32.0}
    for name in ("batches", "tokens", "targets", "documents", "examples", "blocks"):  # continue across the resume
        da, db = tb_scalars(full / "tb", f"train/data_{name}"), tb_scalars(tmp_path / "tb", f"train/data_{name}")
        assert da[12] > 0 and [db[k] for k in range(1, 13)] == [da[k] for k in range(1, 13)], name


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_continues(cfg_file, tmp_path, tmp_path_factory):
    """SIGTERM to one rank (Slurm signals every task; one is the hard case): every rank finishes the step,
    one checkpoint is written, the run exits 0; the resumed run's losses equal an uninterrupted run's."""
    over = ("engine.zero_stage=1", *KILL_OVER, "checkpoint.every_steps=0")
    full = tmp_path_factory.mktemp("full-term")
    launch(pretrain_cmd("torchrun", cfg_file, full, *over))
    cmd = pretrain_cmd("torchrun", cfg_file, tmp_path, *over)
    rc, log, sent = _run_until(cmd, lambda: len(losses(tmp_path)) >= 2 if (tmp_path / "tb").exists() else False,
                               signal.SIGTERM, whole_group=False)
    assert sent and rc == 0, log[-3000:]
    assert "preempted: checkpoint" in log
    ck = tmp_path / "checkpoints"
    stopped_at = int((ck / "latest").read_text().strip()[4:])
    assert 2 <= stopped_at < 12
    launch(cmd + ["--resume", "auto"])
    a, b = losses(full), losses(tmp_path)
    assert [b[k] for k in range(1, 13)] == pytest.approx([a[k] for k in range(1, 13)], abs=1e-6)


def test_a_signal_while_the_loader_waits_saves_the_position_before_the_step(cfg_file, tmp_path, tmp_path_factory):
    """SIGTERM to data-parallel rank 0 inside its loader, at the end of an epoch that falls between a step's
    two micro-batches (the loader, not the step, sees the stop): both ranks stop together without a step,
    the checkpoint is of the last step with the data position before the step's first micro-batch, and
    the resumed run equals an uninterrupted one: losses, data counters, final data position."""
    import re

    from tests.unit.test_shards import write_text_corpus

    small = tmp_path_factory.mktemp("small")
    write_text_corpus(small / "c.txt", 240)  # an epoch of a few steps
    launch([sys.executable, "-m", "megamlm", "make-shards", str(cfg_file), "--input", str(small / "c.txt"),
            "--source", "text", "--output", str(small / "shards"), "--workers", "1", "--no-progress"])
    over = (f"data.shards_dir={small / 'shards'}", "train.max_steps=14", "data.micro_batch_size=16",
            "engine.global_batch_size=64", "train.eval_every=0", "checkpoint.every_steps=0")  # 2 micro-batches a step
    full = tmp_path_factory.mktemp("full-loader-stop")
    r = launch(pretrain_cmd("torchrun", cfg_file, full, *over))
    per_epoch = [int(n) for n in re.findall(r"rank0\]megamlm\.data\.loader: epoch \d+ done: (\d+) batches", r.stderr)]
    ends = [sum(per_epoch[:e + 1]) for e in range(len(per_epoch))]
    epoch = next(e for e, c in enumerate(ends) if c % 2 == 1 and c < 2 * 13)  # ends mid-step, before the last
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "e2e" / "run_signal.py"), str(epoch), "--", "pretrain", str(cfg_file),
           f"train.output_dir={tmp_path}", *over]
    r = launch(cmd)
    assert "preempted while reading data: checkpoint" in r.stderr, r.stderr[-3000:]
    ck = tmp_path / "checkpoints"
    stopped_at = ends[epoch] // 2  # the steps done before the one whose second micro-batch met the stop
    assert (ck / "latest").read_text().strip() == f"step{stopped_at:08d}"
    assert sorted(losses(tmp_path)) == list(range(1, stopped_at + 1))
    launch(pretrain_cmd("torchrun", cfg_file, tmp_path, *over) + ["--resume", "auto"])
    a, b = losses(full), losses(tmp_path)
    assert [b[k] for k in range(1, 15)] == pytest.approx([a[k] for k in range(1, 15)], abs=1e-6)
    for name in ("batches", "tokens", "documents", "epochs"):
        da, db = tb_scalars(full / "tb", f"train/data_{name}"), tb_scalars(tmp_path / "tb", f"train/data_{name}")
        assert [db[k] for k in range(1, 15)] == [da[k] for k in range(1, 15)], name
    sa = read_json(full / "checkpoints" / "step00000014" / "train_state.json")
    sb = read_json(ck / "step00000014" / "train_state.json")
    assert sa["loader"] == sb["loader"] and sa["consumed_samples"] == sb["consumed_samples"] > 0


def test_token_budget_in_a_single_process(cfg_file, tmp_path):
    """train.max_tokens alone: one process (no launcher) stops at the first step past the budget."""
    launch(pretrain_cmd("single", cfg_file, tmp_path, "train.max_steps=0", "train.max_tokens=3000",
                        "train.eval_every=0", "checkpoint.every_steps=0"), threads=2)
    st = read_json(tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
                   / "train_state.json")
    per_step = st["consumed_tokens"] / st["step"]
    assert 3000 <= st["consumed_tokens"] < 3000 + per_step * 1.5, st
    assert sorted(losses(tmp_path)) == list(range(1, st["step"] + 1))


def test_compiled_blocks_train_and_resume_exactly(cfg_file, tmp_path):
    """engine.compile=true (inductor on this CPU, dropout on): a run resumed from its step-2 checkpoint logs
    the losses of the run that went on (the compiled dropout's RNG is restored with the rest)."""
    over = ["engine.compile=true", "engine.zero_stage=1", "train.max_steps=4", "train.eval_every=0",
            "checkpoint.every_steps=2", "model.num_layers=1"]  # one block: one compilation per process
    full = tmp_path / "full"
    r = launch(pretrain_cmd("single", cfg_file, full, *over), threads=2)
    assert "encoder blocks under torch.compile" in r.stderr
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step00000002", part / "checkpoints" / "step00000002")
    (part / "checkpoints" / "latest").write_text("step00000002")
    launch(pretrain_cmd("single", cfg_file, part, *over) + ["--resume", "auto"], threads=2)
    a, b = losses(full), losses(part)
    assert sorted(b) == [3, 4] and [b[3], b[4]] == pytest.approx([a[3], a[4]], abs=1e-6)


def test_bad_setups_fail_before_any_process_group(cfg_file, tmp_path):
    r = subprocess.run(pretrain_cmd("single", cfg_file, tmp_path, "engine.global_batch_size=12",
                                    f"data.shards_dir={tmp_path}/none"), cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "global_batch_size=12 is not a multiple" in r.stderr
    assert "no manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(pretrain_cmd("single", cfg_file, tmp_path, "--resume", "step00000099"), cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr
    env = {**clean_env(), "MEGAMLM_CPU_KERNELS": "0"}  # as on a machine without a C compiler
    r = subprocess.run(pretrain_cmd("single", cfg_file, tmp_path, "engine.kernels=cpu"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "engine.kernels=cpu: the CPU kernels cannot be built here" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "checkpoints").exists()


def test_resume_refuses_another_model_shape(cfg_file, reference, tmp_path):
    ref_out, _ = reference
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    r = subprocess.run(pretrain_cmd("single", cfg_file, tmp_path, "model.hidden_size=32", "--resume", "auto"),
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "from another model shape: model.hidden_size: checkpoint 64, config 32" in r.stderr


def test_resume_refuses_other_shards_before_any_work(cfg_file, reference, tmp_path):
    """A checkpoint's loader position over another corpus (here: the same folder with one train shard
    dropped from its manifest) is refused before the engine, naming both folders; nothing is written."""
    from megamlm.config import load_config

    ref_out, _ = reference
    shutil.copytree(ref_out / "checkpoints", tmp_path / "checkpoints")
    other = tmp_path / "other-shards"
    shutil.copytree(load_config(cfg_file).data.shards_dir, other)
    man = json.loads((other / "manifest.json").read_text())
    man["splits"]["train"]["shards"] = man["splits"]["train"]["shards"][:-1]
    (other / "manifest.json").write_text(json.dumps(man))
    before = _tree(tmp_path / "checkpoints")
    r = subprocess.run(pretrain_cmd("single", cfg_file, tmp_path, f"data.shards_dir={other}", "--resume", "auto"),
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"and this run reads other shards ({other}: data.shards_dir)" in r.stderr and "Traceback" not in r.stderr
    assert _tree(tmp_path / "checkpoints") == before


def _tree(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_used_folder_is_refused_and_move_old_run_keeps_it(cfg_file, reference, tmp_path):
    """The demo's folder run again without --resume: refused before any work, every checkpoint kept
    byte for byte; --move-old-run moves the old run's files aside, keeps the tokenizer and shards that live
    in the run folder (as configs/bert-base.yaml has them) and trains fresh."""
    from megamlm.config import load_config

    ref_out, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints", run / "checkpoints")
    (run / "tb").mkdir()
    (run / "tb" / "events.out.tfevents.old").write_bytes(b"old events")
    before = _tree(run)
    cfg = load_config(cfg_file)
    shutil.copytree(cfg.data.shards_dir, run / "shards")
    (run / "tokenizer").mkdir()
    for f in Path(cfg.tokenizer.model).parent.glob(Path(cfg.tokenizer.model).stem + ".*"):
        shutil.copy2(f, run / "tokenizer" / f.name)
    inputs = (f"data.shards_dir={run / 'shards'}", f"tokenizer.model={run / 'tokenizer' / Path(cfg.tokenizer.model).name}")
    kept = {k: v for k, v in _tree(run).items() if k.startswith(("shards/", "tokenizer/"))}
    for extra in ([], ["--resume", "none"]):
        r = subprocess.run(pretrain_cmd("single", cfg_file, run, "train.max_steps=3", *inputs, *extra), cwd=ROOT,
                           env=clean_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "already holds checkpoints" in r.stderr and "--resume auto" in r.stderr and "Traceback" not in r.stderr
        assert _tree(run) == {**before, **kept}
    launch(pretrain_cmd("single", cfg_file, run, "train.max_steps=1", "train.eval_every=0", *inputs,
                        "--move-old-run"), threads=2)
    (old,) = tmp_path.glob("run.old-*")
    assert _tree(old) == before
    assert {k: v for k, v in _tree(run).items() if k.startswith(("shards/", "tokenizer/"))} == kept
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000001"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000001"]


def test_resume_on_another_data_parallel_size_goes_through_the_universal_checkpoint(cfg_file, reference, tmp_path):
    """The 2-rank reference's checkpoint at step 6 resumed by one process: converted (once, logged with its
    time and peak memory), the loader's rest redistributed, training on to step 8. With a ZeRO partition
    missing the resume is refused naming it, before anything is written."""
    ref_out, _ = reference  # saved by 2 data-parallel ranks at ZeRO 1

    def at_step_6(run: Path) -> Path:
        shutil.copytree(ref_out / "checkpoints", run / "checkpoints")
        for f in (run / "checkpoints").glob("step*"):
            if f.name > "step00000006":
                shutil.rmtree(f)
        (run / "checkpoints" / "latest").write_text("step00000006\n")
        return run

    broken = at_step_6(tmp_path / "broken")
    (broken / "checkpoints" / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    r = subprocess.run(pretrain_cmd("single", cfg_file, broken, "--resume", "auto", "engine.zero_stage=1"), cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "its ZeRO partitions zero_pp_rank_1_mp_rank_00_optim_states.pt are missing" in r.stderr
    assert "Traceback" not in r.stderr and not (broken / "checkpoints" / "universal").exists()
    run = at_step_6(tmp_path / "run")
    # what a conversion killed midway leaves (its temporary folder; a folder without COMPLETE): replaced, and
    # the checkpoint it converts is never touched
    junk = run / "checkpoints" / "universal"
    (junk / "step00000006.tmp").mkdir(parents=True)
    (junk / "step00000006.tmp" / "half.pt").write_bytes(b"x")
    (junk / "step00000006").mkdir()
    (junk / "step00000006" / "stale.pt").write_bytes(b"x")
    source = _tree(run / "checkpoints" / "step00000006")
    r = launch(pretrain_cmd("single", cfg_file, run, "--resume", "auto", "engine.zero_stage=1"), threads=2)
    log = r.stdout + r.stderr
    assert "was saved by 2 data-parallel rank(s), this run has 1" in log and "converter peak RSS" in log
    assert "resumed with 1 x 1: the" in log
    assert (run / "checkpoints" / "universal" / "step00000006" / "COMPLETE").is_file()
    assert not (junk / "step00000006.tmp").exists() and not (junk / "step00000006" / "stale.pt").exists()
    assert _tree(run / "checkpoints" / "step00000006") == source
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000008"
    assert all(math.isfinite(v) for v in losses(run).values()) and sorted(losses(run))[-1] == 8


def test_resume_on_another_worker_count_carries_the_loader_position_over(cfg_file, tmp_path):
    """data.num_workers 1 -> 2 between runs (one process): the resume is not refused, goes on in the same
    epoch with the rest redistributed (logged; every example once is test_loader.py's proof), and the loader's
    counters continue from the checkpoint's."""
    quiet = ("train.eval_every=0", "checkpoint.every_steps=3")
    launch(pretrain_cmd("single", cfg_file, tmp_path, "train.max_steps=3", *quiet), threads=2)
    first = read_json(tmp_path / "checkpoints" / "step00000003" / "train_state.json")["loader"]
    r = launch(pretrain_cmd("single", cfg_file, tmp_path, "train.max_steps=6", "data.num_workers=2", "--resume",
                            "auto", *quiet), threads=2)
    assert "resumed with 1 x 2: the" in r.stdout + r.stderr and "are redistributed" in r.stdout + r.stderr
    second = read_json(tmp_path / "checkpoints" / "step00000006" / "train_state.json")["loader"]
    assert first["num_workers"] == 1 and second["num_workers"] == 2 and second["epoch"] == first["epoch"] == 0
    assert second["plan"] is not None and len(second["plan"]) == 2
    assert second["ranks"][0]["stats"]["batches"] == 2 * first["ranks"][0]["stats"]["batches"]
