"""The only reader of the launchers' environment: one :class:`DistEnv` for torchrun, the deepspeed
launcher, mpirun (Open MPI, MPICH/PMI) and Slurm's srun.

Precedence: ``RANK``/``WORLD_SIZE`` (torchrun, deepspeed) → ``OMPI_COMM_WORLD_*`` (Open MPI) →
``PMI_*`` (MPICH, Intel MPI) → ``SLURM_PROCID``/``SLURM_NTASKS`` (srun) → a single process.
``MASTER_ADDR`` / ``MASTER_PORT`` are taken when set; otherwise under Slurm the first host of the
allocation and a port derived from the job id; under MPI with all ranks on one host the loopback
address; under MPI across hosts rank 0's address is broadcast with mpi4py. :func:`export` writes the
result back as the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` variables that torch and
DeepSpeed read, so the rest of the code never looks at a launcher again.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from megamlm.errors import MegamlmError


class DistEnvError(MegamlmError, RuntimeError):
    """The launcher's environment is inconsistent or incomplete."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | deepspeed | env | mpi | slurm

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistEnvError(f"environment variable {key}={env[key]!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("node[01-03,07],gpu5") → host names, as ``scontrol show hostnames``."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + item)
    return hosts


def _slurm_master(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistEnvError("under Slurm but SLURM_JOB_NODELIST is not set: cannot find the first host "
                           "(set MASTER_ADDR yourself)")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise DistEnvError(f"cannot resolve the Slurm node list {nodelist!r} to a host")
    return hosts[0]


def _local_host_is_loopback(addr: str) -> bool:
    return addr in ("localhost", "127.0.0.1", "::1") or addr.startswith("127.")


def from_environ(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (``os.environ`` by default) into a :class:`DistEnv`."""
    env = os.environ if env is None else env
    port_default = 29500
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env else
                    "deepspeed" if "CROSS_RANK" in env else "env")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        lsize = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else (
            _int(env, "LOCAL_SIZE") if "LOCAL_SIZE" in env else world)
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_default
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        launcher = "mpi"
        if "OMPI_COMM_WORLD_RANK" in env:
            rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
            local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
            lsize = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        else:
            rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
            local = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else rank
            lsize = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_default
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif lsize == world:
            addr = "127.0.0.1"  # every rank on this host
        else:
            addr = _mpi_broadcast_address()
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # SLURM_STEP_ID marks an srun task. The batch shell also has SLURM_PROCID=0 and SLURM_NTASKS=N (the
        # allocation's) but no SLURM_STEP_ID (Slurm 22.05): a command it runs directly is one process.
        launcher = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        lsize = _slurm_tasks_on_node(env, world)
        addr = env.get("MASTER_ADDR") or _slurm_master(env)
        jobid = env.get("SLURM_JOB_ID", "0")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(int(jobid))
    else:
        return DistEnv()
    if not 0 <= rank < world:
        raise DistEnvError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    if not 0 <= local < max(lsize, 1):
        raise DistEnvError(f"local rank {local} is outside local world size {lsize} ({launcher} environment)")
    return DistEnv(rank, world, local, lsize, addr, port, launcher)


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a Slurm job without ``MASTER_PORT``: 10000 + job id mod 20000, in [10000, 30000),
    below Linux's ephemeral range (32768-60999 by default), where an outgoing connection could hold it.
    slurm/pretrain.sbatch derives the same."""
    return 10000 + job_id % 20000


def cuda_device_index(local_rank: int, visible: int, cuda_visible_devices: str | None = None) -> int:
    """The CUDA device of this rank among the ``visible`` ones: its local rank when it sees the node's GPUs,
    device 0 when the launcher bound one GPU to each task (Slurm ``--gpus-per-task=1`` or ``--gpu-bind``:
    ``CUDA_VISIBLE_DEVICES`` holds one device, whatever the local rank)."""
    where = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices!r})" if cuda_visible_devices is not None else ""
    if visible < 1:
        raise DistEnvError(f"no CUDA device is visible to local rank {local_rank}{where}")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise DistEnvError(f"local rank {local_rank} sees {visible} CUDA devices{where}: give each task one GPU "
                       f"(srun --gpus-per-task=1) or every task all of the node's GPUs")


def _slurm_tasks_on_node(env: Mapping[str, str], world: int) -> int:
    """This node's task count: the step's list (srun may lay out fewer tasks than the job, e.g. one
    launcher per node), else the job's, in Slurm's compressed form ("4(x2),2"), indexed by SLURM_NODEID."""
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for m in re.finditer(r"(\d+)(?:\(x(\d+)\))?", per_node):
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not counts:
        return world
    node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    return counts[node] if 0 <= node < len(counts) else counts[0]


def _mpi_broadcast_address() -> str:
    """Rank 0's host address, shared through MPI (multi-host mpirun without MASTER_ADDR)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistEnvError("mpirun across hosts without MASTER_ADDR needs mpi4py (pip install 'megamlm[mpi]'), "
                           "or export MASTER_ADDR to every rank (mpirun -x MASTER_ADDR=...)") from None
    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(addr, root=0)


def export(d: DistEnv) -> None:
    """Write the standard variables torch.distributed and DeepSpeed read (and GLOO over loopback)."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))
    if _local_host_is_loopback(d.master_addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
