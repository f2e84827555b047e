"""Data-parallel × vocab-parallel layout of the ranks, and the process groups that go with it.

Vocab-parallel groups are *consecutive* ranks (they share a node, where their collectives are cheapest)::

    vp_rank = rank % vp_size        dp_rank = rank // vp_size

so with 4 ranks and ``vp_size=2``: vocab-parallel groups {0,1} {2,3}, data-parallel groups {0,2} {1,3}.
Ranks of one vocab-parallel group hold the same ``dp_rank`` and therefore read the same batches.

``dp_group`` / ``vp_group`` are the groups the model and engine use (NCCL on GPU); without vocabulary
parallelism ``dp_group`` is the default group itself (no second full mesh of connections).
``host_group`` is the one gloo group for small host-side collectives (the loader's agreement once per
``data.agree_every`` micro-batches and its state, the checkpoint's barrier and agreement): over every
rank, since the ranks of a vocab-parallel group must stop together; it never touches a device. With a
gloo default backend it is the default group; otherwise one gloo group is created (about P−1
connections per rank: 511 at 512 ranks, under the usual ``ulimit -n`` of 1024). In a single process
every group is None.

:meth:`Topology.mpu` is the object DeepSpeed takes as ``mpu`` so that ZeRO partitions and all-reduces
over the data-parallel group only, counts vocab-sharded parameters once per shard in the gradient norm
and names checkpoint files ``mp_rank_XX_*`` by vocab-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Topology", "VocabParallelMPU", "single_process_topology", "rank_layout", "build_topology"]


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    vp_rank: int = 0
    vp_size: int = 1
    dp_group: Any = None  # ranks with this vp_rank (torch.distributed ProcessGroup), None in one process
    vp_group: Any = None  # ranks with this dp_rank (None without vocabulary parallelism)
    host_group: Any = None  # gloo group over every rank, for host-side collectives (the default one on gloo)

    def __post_init__(self) -> None:
        problems = []
        if self.vp_size < 1 or self.dp_size < 1:
            problems.append(f"dp_size={self.dp_size} and vp_size={self.vp_size} must be >= 1")
        elif self.dp_size * self.vp_size != self.world_size:
            problems.append(f"dp_size={self.dp_size} x vp_size={self.vp_size} != world_size={self.world_size}")
        elif (self.dp_rank, self.vp_rank) != rank_layout(self.rank, self.world_size, self.vp_size):
            problems.append(f"rank {self.rank}: dp_rank={self.dp_rank}, vp_rank={self.vp_rank} do not follow "
                            f"the layout vp_rank = rank % vp_size, dp_rank = rank // vp_size")
        if problems:
            raise ValueError("; ".join(problems))

    def mpu(self) -> "VocabParallelMPU | None":
        """DeepSpeed's ``mpu`` for this layout; None without vocabulary parallelism (vp_size == 1)."""
        return None if self.vp_size == 1 else VocabParallelMPU(self)


class VocabParallelMPU:
    """The model-parallel unit DeepSpeed asks for: model (= tensor = vocab) parallel and data parallel.

    Exactly these methods: DeepSpeed reads them for batch arithmetic, the gradient-norm all-reduce and
    checkpoint names. No ``initialize_sequence_parallel``: with it DeepSpeed would take this object for a
    sequence-parallel unit and ignore it for model and data parallelism (megamlm/ARCHITECTURE.md, "Environment facts").
    """

    def __init__(self, topology: "Topology"):
        self._t = topology

    def get_model_parallel_rank(self) -> int:
        return self._t.vp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._t.vp_size

    def get_model_parallel_group(self):
        return self._t.vp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._t.vp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._t.vp_size

    def get_tensor_model_parallel_group(self):
        return self._t.vp_group

    def get_data_parallel_rank(self) -> int:
        return self._t.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._t.dp_size

    def get_data_parallel_group(self):
        return self._t.dp_group

    def __repr__(self) -> str:
        t = self._t
        return f"VocabParallelMPU(vp {t.vp_rank}/{t.vp_size}, dp {t.dp_rank}/{t.dp_size})"


def rank_layout(rank: int, world_size: int, vp_size: int) -> tuple[int, int]:
    """(dp_rank, vp_rank) of ``rank``; vocab-parallel groups are consecutive ranks."""
    if vp_size < 1 or world_size % vp_size:
        raise ValueError(f"world size {world_size} is not divisible by the vocab-parallel size {vp_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank // vp_size, rank % vp_size


def single_process_topology() -> Topology:
    return Topology()


def build_topology(vp_size: int = 1) -> Topology:
    """Create the groups from an initialised default process group (every rank must call this, in step).

    ``torch.distributed.new_group`` is collective over the whole world, so every rank creates every group
    in the same order and keeps its own.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return single_process_topology()
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, vp_rank = rank_layout(rank, world, vp_size)
    dp_size = world // vp_size
    host = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dp_group = vp_group = None
    if vp_size == 1:
        dp_group = dist.group.WORLD
    else:
        for v in range(vp_size):  # data-parallel groups: same vp_rank
            g = dist.new_group([d * vp_size + v for d in range(dp_size)])
            if v == vp_rank:
                dp_group = g
    for d in range(dp_size if vp_size > 1 else 0):  # vocab-parallel groups: consecutive ranks
        g = dist.new_group([d * vp_size + v for v in range(vp_size)])
        if d == dp_rank:
            vp_group = g
    return Topology(rank=rank, world_size=world, dp_rank=dp_rank, dp_size=dp_size, vp_rank=vp_rank,
                    vp_size=vp_size, dp_group=dp_group, vp_group=vp_group, host_group=host)
