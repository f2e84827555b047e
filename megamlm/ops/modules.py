"""The layers the model builds with when an op may run inside them: ``nn.Linear``, ``nn.LayerNorm`` and
``nn.Embedding`` (same parameters, same state-dict keys) whose call can run an op's code inside it.

``module(x, inside=fn)`` returns ``fn(module, x)`` from within the module's own call. That is where
DeepSpeed ZeRO-3 has gathered the module's parameters (it gathers per module call and releases after),
so a fused op reads a weight and its bias there, e.g. the CPU backend's bias + GELU after the
projection's gemm. ``module(x)`` is the plain layer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "LayerNorm", "Embedding", "zero3_partitioned", "host_readable"]


def zero3_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a parameter DeepSpeed ZeRO-3 manages (gathered only inside its module's call)."""
    return hasattr(p, "ds_id")


class Linear(nn.Linear):
    """``nn.Linear``; ``linear(x, inside=fn)`` = ``fn(linear, x)`` inside the module's call."""

    def forward(self, x: torch.Tensor, inside: Callable | None = None) -> torch.Tensor:
        if inside is not None:
            return inside(self, x)
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; ``norm(x, inside=fn)`` = ``fn(norm, x)`` inside the module's call."""

    def forward(self, x: torch.Tensor, inside: Callable | None = None) -> torch.Tensor:
        if inside is not None:
            return inside(self, x)
        return super().forward(x)


class Embedding(nn.Embedding):
    """``nn.Embedding``; ``table(ids, inside=fn)`` = ``fn(table, ids)`` inside the module's call."""

    def forward(self, ids: torch.Tensor, inside: Callable | None = None) -> torch.Tensor:
        if inside is not None:
            return inside(self, ids)
        return super().forward(ids)


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values is free: a CPU tensor outside ``torch.compile`` (on an accelerator it is
    a device sync; under compile, a data-dependent graph break)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()
