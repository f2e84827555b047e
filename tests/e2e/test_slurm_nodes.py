"""slurm/pretrain.sbatch across two hosts: a two-node Slurm cluster on this machine
(tests/e2e/slurm_cluster.py, TwoNodeSlurmCluster). Each slurmd is its own network namespace with its own
address, and the ranks talk over the bridge between them, never over loopback.

- `sbatch --nodes=2` trains with one rank on each host, MASTER_ADDR from the node list, and gets the
  losses of the same job under torchrun on one host.
- A USR1 preemption of that job, then its resubmission on one node: the ZeRO state goes through the
  universal checkpoint, the loader's position is redistributed, and the run goes on to the end.
  Losses and final weights equal a reference that did the same change of layout without Slurm.

Skipped, with the reason, where namespaces or the daemons cannot start. A failure points at the cluster
(its daemons' logs are in the message), slurm/pretrain.sbatch / slurm/hosts.sh (the node list),
megamlm/distributed/env.py, or the elastic resume (megamlm/checkpoint.py, megamlm/data/elastic.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from tests.e2e._runs import (BIN, ROOT, clean_env, final_weights, free_port, launch, tb_scalars,
                             tiny_prepared_config)
from tests.e2e.slurm_cluster import two_node_cluster  # noqa: F401 - the module fixture

# a constant learning rate after warm-up: the reference's first run, stopped by train.max_steps at the
# preemption's step, then gets the same rates as the preempted job, whose horizon is STEPS
REST = """
optim: {schedule: constant}
engine: {zero_stage: 1, global_batch_size: 32}
train: {max_steps: 8, log_every: 1, eval_every: 0}
checkpoint: {every_steps: 3, keep_last: 10}
"""
STEPS = 8
SCRIPT = str(ROOT / "slurm" / "pretrain.sbatch")
COMMON = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@5")
TWO_NODES = ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", *COMMON)
ONE_NODE = ("--nodes=1", "--ntasks=1", "--ntasks-per-node=1", *COMMON)


@pytest.fixture(scope="module")
def cluster(two_node_cluster):  # noqa: F811
    return two_node_cluster


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    return tiny_prepared_config(tmp_path_factory.mktemp("slurm2"), REST, micro=16)


def _submit(cluster, tmp: Path, opts, cfg: Path, run: Path, **env: str) -> int:
    e = clean_env(threads=1)
    e.update(MEGAMLM_PYTHON=sys.executable, MEGAMLM_RUN_DIR=str(run), GLOO_SOCKET_IFNAME="eth0", **env)
    return cluster.sbatch(*opts, f"--output={tmp}/%j.log", SCRIPT, str(cfg), env=e, cwd=ROOT)


def _log(tmp: Path, j: int) -> str:
    f = tmp / f"{j}.log"
    return f.read_text(errors="replace") if f.exists() else "(no log)"


def _done(cluster, tmp: Path, j: int, timeout: float = 300) -> str:
    info = cluster.wait(j, timeout=timeout)
    log = _log(tmp, j)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), \
        f"job {j}: {info}\n--- job log\n{log[-6000:]}\n{cluster.logs()}"
    return log


def _losses(run: Path) -> dict[int, float]:
    return tb_scalars(run / "tb", "train/loss")


def _torchrun(cfg: Path, out: Path, *over: str) -> None:
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megamlm",
            "pretrain", str(cfg), f"train.output_dir={out}", *over])


def test_two_nodes_train_with_a_rank_on_each_host_and_the_losses_of_one_host(cluster, cfg_file, tmp_path):
    run = tmp_path / "run"
    log = _done(cluster, tmp_path, _submit(cluster, tmp_path, TWO_NODES, cfg_file, run))
    assert "MASTER_ADDR mm1" in log and "world size 2" in log, log[-3000:]
    ref = tmp_path / "ref"
    _torchrun(cfg_file, ref)
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(b)], abs=1e-6)


def test_a_preempted_two_node_job_resubmitted_on_one_node_goes_on_like_the_same_change_without_slurm(
        cluster, cfg_file, tmp_path):
    run = tmp_path / "run"
    j = _submit(cluster, tmp_path, TWO_NODES, cfg_file, run, MEGAMLM_REQUEUE="0")
    trigger = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not trigger.exists():
        assert cluster.job(j).get("JobState") in ("PENDING", "RUNNING"), _log(tmp_path, j)[-4000:]
        assert time.monotonic() < deadline, _log(tmp_path, j)[-4000:]
        time.sleep(0.005)
    cluster.run("scancel", "--signal=USR1", "--batch", str(j))
    first = _done(cluster, tmp_path, j)
    assert "preempted: checkpoint" in first and "not requeued (MEGAMLM_REQUEUE=0)" in first, first[-3000:]
    stopped = int(first.split("preempted: checkpoint step")[1][:8])
    assert 3 <= stopped < STEPS, f"the signal landed after the run ended (step {stopped})"
    second = _done(cluster, tmp_path, _submit(cluster, tmp_path, ONE_NODE, cfg_file, run))
    assert "was saved by 2 data-parallel rank(s), this run has 1" in second, second[-4000:]
    assert "resumed with 1 x 1: the" in second and f"resumed from {run}/checkpoints/step{stopped:08d}" in second
    # the same change of layout without Slurm: 2 ranks to the preemption's step, then one process to the end
    ref = tmp_path / "ref"
    _torchrun(cfg_file, ref, f"train.max_steps={stopped}")
    launch([sys.executable, "-m", "megamlm", "pretrain", str(cfg_file), f"train.output_dir={ref}", "--resume",
            "auto"], threads=1)
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(b)], abs=1e-6)
    wa, wb = final_weights(ref / "checkpoints"), final_weights(run / "checkpoints")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
