"""Launcher environments → DistEnv (torchrun, deepspeed, Open MPI, MPICH/PMI, Slurm).

A failure here points at megamlm/distributed/env.py (variable precedence, Slurm host lists).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megamlm.distributed.env import (DistEnvError, cuda_device_index, expand_nodelist, from_environ,
                                     slurm_port)


def test_single_process_by_default():
    d = from_environ({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


def test_torchrun_and_deepspeed():
    base = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "2222"}
    d = from_environ({**base, "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port, d.launcher) == (
        3, 8, 1, 4, "n1", 2222, "torchrun")
    d = from_environ({**base, "CROSS_RANK": "1", "LOCAL_SIZE": "2"})
    assert d.launcher == "deepspeed" and d.local_world_size == 2


def test_openmpi_single_host_uses_loopback():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    d = from_environ(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.launcher) == (1, 2, 1, "127.0.0.1", "mpi")
    assert from_environ({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}).master_addr == "head"


def test_pmi():
    d = from_environ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})
    assert (d.rank, d.world_size, d.launcher) == (0, 2, "mpi")


def test_slurm_srun_master_from_nodelist_and_port_from_job():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456"}
    d = from_environ(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 4)
    assert d.master_addr == "gpu07" and d.master_port == 13456 and d.launcher == "slurm"


def test_torchrun_inside_slurm_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "a",
           "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "r"}
    assert from_environ(env).rank == 1


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("a1") == ["a1"]


def test_bad_values_are_named():
    with pytest.raises(DistEnvError, match="RANK='x' is not an integer"):
        from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistEnvError, match="rank 4 is outside world size 2"):
        from_environ({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(DistEnvError, match="SLURM_JOB_NODELIST is not set"):
        from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})


# ---------------------------------------------------------------- Slurm (values as Slurm 22.05 sets them)
def test_slurm_batch_shell_is_a_single_process():
    """The batch step has SLURM_PROCID/SLURM_NTASKS of the allocation but no SLURM_STEP_ID: a command the
    sbatch script runs directly (megamlm check-config) must not wait for N-1 peers."""
    batch = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2"}
    d = from_environ(batch)
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


def test_slurm_srun_task_on_one_node():
    task = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_STEP_NODELIST": "vm", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEPID": "0", "SLURM_STEP_ID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2"}
    d = from_environ(task)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr, d.master_port, d.launcher) == (
        1, 2, 1, 2, "vm", 10007, "slurm")


def test_slurm_tasks_per_node_of_this_node_and_of_the_step():
    base = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "10",
            "SLURM_TASKS_PER_NODE": "4(x2),2"}
    d = from_environ({**base, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"})
    assert d.local_world_size == 2 and d.master_addr == "n1"
    d = from_environ({**base, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert d.local_world_size == 4
    # one launcher per node (slurm/pretrain.sbatch MEGAMLM_LAUNCHER=deepspeed): the step's layout wins
    step = {**base, "SLURM_NTASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "1(x3)", "SLURM_PROCID": "2",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}
    assert from_environ(step).local_world_size == 1


def test_slurm_explicit_master_wins_and_bad_local_rank_is_named():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "a[1-2]",
           "SLURM_JOB_ID": "5", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4242", "SLURM_TASKS_PER_NODE": "1(x2)"}
    d = from_environ({**env, "SLURM_LOCALID": "0"})
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 4242)
    with pytest.raises(DistEnvError, match="local rank 1 is outside local world size 1"):
        from_environ({**env, "SLURM_LOCALID": "1"})


def test_slurm_port_stays_below_the_ephemeral_range():
    """The derived rendezvous port never lands where Linux picks outgoing ports (32768-60999 by default),
    and pretrain.sbatch derives the one the tasks do."""
    ports = {slurm_port(j) for j in range(0, 200_000, 7)}
    assert min(ports) >= 10000 and max(ports) < 30000
    script = (Path(__file__).resolve().parents[2] / "slurm" / "pretrain.sbatch").read_text()
    assert "port=$((10000 + SLURM_JOB_ID % 20000))" in script and slurm_port(123456) == 13456


@pytest.mark.parametrize("local_rank,visible,want", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (0, 1, 0), (3, 4, 3)])
def test_cuda_device_of_a_rank(local_rank, visible, want):
    """A rank takes its local rank's GPU when it sees the node's, and the one it sees when Slurm bound a
    GPU per task (--gpus-per-task=1: CUDA_VISIBLE_DEVICES of length 1, local rank 0-7)."""
    assert cuda_device_index(local_rank, visible, "3") == want


def test_cuda_device_errors_name_the_ranks_and_the_variable():
    with pytest.raises(DistEnvError, match=r"local rank 5 sees 2 CUDA devices \(CUDA_VISIBLE_DEVICES='0,1'\)"):
        cuda_device_index(5, 2, "0,1")
    with pytest.raises(DistEnvError, match=r"no CUDA device is visible to local rank 0 \(CUDA_VISIBLE_DEVICES=''\)"):
        cuda_device_index(0, 0, "")
