"""slurm/pretrain.sbatch on a real one-machine Slurm 22.05 cluster (tests/e2e/slurm_cluster.py): 2 CPU
tasks through srun train and checkpoint; SIGUSR1 to the batch shell checkpoints, requeues, and the
requeued job resumes exactly; the deepspeed launcher mode trains the same; bad input fails fast; the
hostfile / dry-run / chain.sh plumbing. Skipped, with the reason, where Slurm cannot start (not root, not
installed, daemons down).

A failure here points at slurm/pretrain.sbatch (arguments, checks, signal forwarding, run_status →
requeue), slurm/hosts.sh (node list, hostfile), slurm/chain.sh, megamlm/distributed/env.py (srun's
variables), megamlm/trainer.py (StopFlag) or megamlm/pretrain.py (run_status), or at the cluster
fixture itself (slurm_cluster.py: the daemons' logs are in the failure message).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e._runs import ROOT, clean_env, read_json, tb_scalars, tiny_prepared_config
from tests.e2e.slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture

REST = """
engine: {zero_stage: 1}
train: {max_steps: 16, log_every: 1, eval_every: 0}
checkpoint: {every_steps: 3, keep_last: 10}
"""
STEPS = 16
# 2 tasks on the 2-CPU node, one thread each; no GPUs (the script's defaults ask for 8)
# and a 10-minute limit with the warning signal 5 s before it (the script's 600 s would fire at once)
TWO_TASKS = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=10", "--signal=B:USR1@5")
SCRIPT = str(ROOT / "slurm" / "pretrain.sbatch")


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    return tiny_prepared_config(tmp_path_factory.mktemp("slurm"), REST, micro=32)


def job_env(run_dir: Path | None = None, **extra: str) -> dict:
    env = clean_env(threads=1)  # OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu, no launcher variables
    env["MEGAMLM_PYTHON"] = sys.executable
    if run_dir is not None:
        env["MEGAMLM_RUN_DIR"] = str(run_dir)
    env.update(extra)
    return env


def submit(cluster, tmp: Path, *args: str, opts=TWO_TASKS, **env: str) -> int:
    run_dir = env.pop("run_dir", None)
    return cluster.sbatch(*opts, f"--output={tmp}/%j.log", SCRIPT, *args, env=job_env(run_dir, **env), cwd=ROOT)


def log_of(tmp: Path, jobid: int) -> str:
    f = tmp / f"{jobid}.log"
    return f.read_text(errors="replace") if f.exists() else "(no log)"


def losses(run_dir: Path) -> dict[int, float]:
    return tb_scalars(run_dir / "tb", "train/loss")


def assert_done(cluster, info: dict, tmp: Path, jobid: int, state="COMPLETED", exit_code="0:0") -> None:
    assert (info.get("JobState"), info.get("ExitCode")) == (state, exit_code), (
        f"job {jobid}: {info.get('JobState')} {info.get('ExitCode')}\n--- job log\n{log_of(tmp, jobid)[-6000:]}\n"
        f"{cluster.logs()}")


@pytest.fixture(scope="module")
def reference(slurm_cluster, cfg_file, tmp_path_factory):  # noqa: F811
    """The uninterrupted 2-task srun job."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    t0 = time.monotonic()
    j = submit(slurm_cluster, tmp, str(cfg_file), run_dir=tmp / "run")
    info = slurm_cluster.wait(j, timeout=300)
    assert_done(slurm_cluster, info, tmp, j)
    return tmp / "run", log_of(tmp, j), time.monotonic() - t0


def test_sbatch_trains_with_one_srun_task_per_rank(reference):
    run, log, _ = reference
    assert "world size 2, MASTER_ADDR" in log and "launcher srun" in log
    assert "0: " in log and "rank 0 of 2 data-parallel" in log  # srun --label; both tasks in one world
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert tb_scalars(run / "tb", "train/tokens_per_second")
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    st = read_json(run / "checkpoints" / f"step{STEPS:08d}" / "train_state.json")
    assert st["step"] == STEPS and st["consumed_samples"] == STEPS * 64
    assert (run / "run_status").read_text().split() == ["complete", str(STEPS), f"step{STEPS:08d}"]
    assert "run complete: complete 16" in log


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes_exactly(slurm_cluster, cfg_file, reference,  # noqa: F811
                                                                       tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@600 sends before the time limit) the moment the
    step-3 checkpoint is complete: the shell forwards it to both tasks, they checkpoint at a step
    boundary and exit 0, the shell requeues the job; the requeued job (same id, same run folder) resumes
    with --resume auto: per-step losses and the final data position equal the uninterrupted run's."""
    ref_run = reference[0]
    run = tmp_path / "run"
    j = submit(slurm_cluster, tmp_path, str(cfg_file), run_dir=run)
    trigger = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not trigger.exists():
        info = slurm_cluster.job(j)
        assert info.get("JobState") in ("PENDING", "RUNNING"), log_of(tmp_path, j)[-4000:]
        assert time.monotonic() < deadline, log_of(tmp_path, j)[-4000:]
        time.sleep(0.005)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(j))
    info = slurm_cluster.wait(j, timeout=300, until=lambda i: i.get("Restarts", "0") != "0"
                              and i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"))
    assert_done(slurm_cluster, info, tmp_path, j)
    log = log_of(tmp_path, j)
    assert info["Restarts"] == "1", log[-4000:]
    assert "received SIGUSR1" in log and "preempted: checkpoint" in log and "requeueing job" in log
    stopped_at = int(log.split("preempted: checkpoint step")[1][:8])
    assert 3 <= stopped_at < STEPS, f"the signal landed after the run ended (step {stopped_at})"
    assert f"job {j} (restart 1)" in log and f"resumed from {run}/checkpoints/step{stopped_at:08d}" in log
    a, b = losses(ref_run), losses(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[k] for k in range(1, STEPS + 1)] == pytest.approx([a[k] for k in range(1, STEPS + 1)], abs=1e-6)
    sa = read_json(ref_run / "checkpoints" / f"step{STEPS:08d}" / "train_state.json")
    sb = read_json(run / "checkpoints" / f"step{STEPS:08d}" / "train_state.json")
    assert sa["loader"] == sb["loader"]
    assert sa["consumed_samples"] == sb["consumed_samples"] == STEPS * 64
    assert sa["consumed_tokens"] == sb["consumed_tokens"]
    assert (run / "run_status").read_text().split()[0] == "complete"


def test_deepspeed_launcher_mode_under_srun_trains_the_same(slurm_cluster, cfg_file, reference, tmp_path):  # noqa: F811
    """MEGAMLM_LAUNCHER=deepspeed: one `deepspeed --no_ssh --node_rank=$SLURM_NODEID --hostfile` per node
    under srun, with the hostfile generated from the allocation; same losses as one srun task per rank."""
    run = tmp_path / "run"
    j = submit(slurm_cluster, tmp_path, str(cfg_file), run_dir=run, MEGAMLM_LAUNCHER="deepspeed")
    assert_done(slurm_cluster, slurm_cluster.wait(j, timeout=300), tmp_path, j)
    log = log_of(tmp_path, j)
    assert "--no_ssh" in log and "--node_rank=0" in log and "dist_world_size=2" in log
    assert (run / "hostfile").read_text() == f"{slurm_cluster.node} slots=2\n"
    a, b = losses(reference[0]), losses(run)
    assert sorted(b) == sorted(a)
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], abs=1e-5)


def test_a_task_count_that_does_not_fit_the_config_fails_fast(slurm_cluster, cfg_file, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    j = submit(slurm_cluster, tmp_path, str(cfg_file), "engine.global_batch_size=96", run_dir=tmp_path / "run")
    info = slurm_cluster.wait(j, timeout=120)
    assert_done(slurm_cluster, info, tmp_path, j, state="FAILED", exit_code="2:0")
    log = log_of(tmp_path, j)
    assert "global_batch_size=96 is not a multiple" in log, log[-3000:]
    assert "does not fit this allocation (world size 2" in log
    assert "command:" not in log and "Traceback" not in log  # no rank was started
    assert time.monotonic() - t0 < 60


def test_a_missing_config_fails_fast(slurm_cluster, tmp_path):  # noqa: F811
    j = submit(slurm_cluster, tmp_path, str(tmp_path / "nope.yaml"))
    info = slurm_cluster.wait(j, timeout=60)
    assert_done(slurm_cluster, info, tmp_path, j, state="FAILED", exit_code="2:0")
    assert f"error: config file '{tmp_path}/nope.yaml' not found" in log_of(tmp_path, j)


def test_deepspeed_pdsh_dry_run_writes_the_hostfile_and_prints_the_command(slurm_cluster, cfg_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    j = submit(slurm_cluster, tmp_path, str(cfg_file), run_dir=run, MEGAMLM_LAUNCHER="deepspeed-pdsh",
               MEGAMLM_DRY_RUN="1")
    assert_done(slurm_cluster, slurm_cluster.wait(j, timeout=60), tmp_path, j)
    log = log_of(tmp_path, j)
    assert "-m deepspeed.launcher.runner --launcher=pdsh" in log and f"--hostfile={run}/hostfile" in log
    assert f"--master_addr={slurm_cluster.node}" in log and "--module megamlm pretrain" in log
    assert "--resume auto" in log and "dry run: nothing started" in log
    assert (run / "hostfile").read_text() == f"{slurm_cluster.node} slots=2\n"
    assert not (run / "tb").exists()


def hosts_sh(cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = cluster.env(clean_env())
    e.update(env)
    return subprocess.run(["bash", str(ROOT / "slurm" / "hosts.sh"), *args], env=e, capture_output=True, text=True,
                          timeout=60)


def test_hostfile_for_several_nodes_and_an_unresolvable_node_list(slurm_cluster, tmp_path):  # noqa: F811
    r = hosts_sh(slurm_cluster, "hostfile", str(tmp_path / "h"), SLURM_JOB_NODELIST="localhost,vm[1-2]",
                 SLURM_GPUS_ON_NODE="8")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h").read_text() == "localhost slots=8\nvm1 slots=8\nvm2 slots=8\n"
    r = hosts_sh(slurm_cluster, "hostfile", str(tmp_path / "h"), SLURM_JOB_NODELIST="n[01-02]",
                 SLURM_TASKS_PER_NODE="4(x2)")
    assert (tmp_path / "h").read_text() == "n01 slots=4\nn02 slots=4\n"
    r = hosts_sh(slurm_cluster, "master", SLURM_JOB_NODELIST="nosuchhost[1-2]")
    assert r.returncode == 2
    assert "the first host of the allocation, 'nosuchhost1'" in r.stderr and "does not resolve" in r.stderr
    assert "(SLURM_JOB_NODELIST='nosuchhost[1-2]')" in r.stderr
    r = hosts_sh(slurm_cluster, "master", SLURM_JOB_NODELIST="")
    assert r.returncode == 2 and "SLURM_JOB_NODELIST is not set" in r.stderr


def test_chain_submits_jobs_that_each_wait_for_the_one_before(slurm_cluster, cfg_file, tmp_path):  # noqa: F811
    r = subprocess.run(["bash", str(ROOT / "slurm" / "chain.sh"), "3", "--hold", *TWO_TASKS,
                        f"--output={tmp_path}/%j.log", "--", str(cfg_file)], cwd=ROOT,
                       env=slurm_cluster.env(job_env()), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    try:
        assert len(ids) == 3 and f"run folder runs/cfg-{ids[0]}" in r.stderr
        deps = [slurm_cluster.job(i).get("Dependency") for i in ids]
        assert deps == ["(null)", f"afterany:{ids[0]}(unfulfilled)", f"afterany:{ids[1]}(unfulfilled)"]
    finally:
        slurm_cluster.run("scancel", *map(str, ids), check=False)
