"""Process-group helpers of the parallel layers: size and rank of a group (``None`` = no parallelism),
and an in-place all-reduce."""

from __future__ import annotations

import torch

__all__ = ["group_size_rank", "all_reduce"]


def group_size_rank(group) -> tuple[int, int]:
    """(size, rank) of a process group; ``None`` (no vocabulary parallelism) is (1, 0)."""
    if group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """``t`` all-reduced in place over ``group`` with ``op``; returns it."""
    import torch.distributed as dist

    dist.all_reduce(t, op=op, group=group)
    return t
