"""The ops layer: every step of the model that has a fused implementation is a call to one named op of a
backend, and the model holds the backend (``module.ops``) without knowing which it is.

Backends (chosen once per model build by :func:`select`, from ``engine.kernels``, the device, the
training dtype and the ZeRO stage; :func:`use` puts one into a model):

* ``torch`` (:class:`~megamlm.ops.torch_ops.TorchOps`): plain PyTorch, the reference; what runs on CUDA
  (SDPA's flash / memory-efficient kernels) and under ``torch.compile``.
* ``cpu`` (:class:`~megamlm.ops.cpu.CpuOps`): the compiled C kernels (:mod:`megamlm.ops.cpu_kernels`,
  built at first use, cached, self-tested, sharing torch's OpenMP pool) and CPU-tuned torch code where
  they cannot be built. Each op falls back to the torch op for a call it cannot serve (not a CPU
  float32/float64 tensor, autocast, ``torch.compile``, a ZeRO-3 partitioned parameter read outside its
  module).

The contracts (shapes: B batch, T sequence, H hidden, N masked rows, V vocabulary rows). Ops that take a
module call it, so that ZeRO-3 gathers its parameters; code of theirs that reads those parameters runs
inside the call (``module(x, inside=fn)``, :mod:`megamlm.ops.modules`). Backward returns the gradient of
every tensor input and parameter, as autograd through the torch backend's op would.

``dropout(x, p, training)``
    ``F.dropout(x, p, training)``; masks drawn from torch's global generator (``torch.manual_seed``
    fixes them; the streams differ between backends).
``dropout_add(x, residual, p, training)``
    ``residual + dropout(x)``.
``linear_act(linear, x, activation)``
    ``act(linear(x))``, ``activation`` ``"gelu"`` (exact erf) or ``"gelu_tanh"``.
``attention(qkv, x, num_heads, attn_mask, p, segments=None)``
    x [B, T, H] → ``softmax(q kᵀ/√d + mask) · v`` with dropout ``p`` on the probabilities, heads merged
    [B, T, H] (before the output projection); q, k, v from the fused projection ``qkv(x)`` [B, T, 3H]
    (columns q, k, v, each heads × head_dim); ``attn_mask`` [B, 1, 1, T] bool (True: attend) or None.
    With ``segments`` (a :class:`Segments`, packed examples): x is [1, N, H], one flat stream of E
    examples back to back, ``attn_mask`` must be None, and each token attends only to the tokens of its
    own segment (nothing is computed for padding); the result is [1, N, H], each segment's rows equal to
    running that segment alone as a [1, L] batch (same dropout law, another mask stream).
``projection_residual_norm(linear, x, residual, norm, p, training)``
    ``norm(residual + dropout(linear(x)))``: the post-LN sublayer output.
``embedding(table, ids)``
    ``table(ids)`` [B, T, H]: the word lookup (a backend may tie its gradient to ``decoder_cross_entropy``
    of the same forward over the same weight).
``decoder_cross_entropy(h, weight, bias, n_predicted, labels, ignore_index=IGNORE_INDEX, peek=None)``
    h [N, H], weight [V, H], bias [V] → (per-row fp32 loss [N], row argmax [N]) of ``F.linear(h,
    weight[:n_predicted], bias[:n_predicted])``; rows labelled ``ignore_index`` give loss 0. ``peek(logits,
    bias)``, when given, is called once under no_grad with those logits before the loss reads them
    (detached; ``bias`` None when they include it, else the bias [n_predicted] to add): the ELECTRA
    generator samples from them, with no second projection.
``cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, inplace_backward=False, with_argmax=False, bias=None)``
    per-row fp32 loss [N] (and the argmax) of logits [N, V]; see :mod:`megamlm.ops.cross_entropy`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from megamlm.ops import cpu_kernels
from megamlm.ops.cpu import CpuOps
from megamlm.ops.cross_entropy import IGNORE_INDEX
from megamlm.ops.modules import Embedding, LayerNorm, Linear, host_readable, zero3_partitioned
from megamlm.ops.torch_ops import TorchOps, activation_fn

log = logging.getLogger(__name__)

__all__ = ["Segments", "TorchOps", "CpuOps", "DEFAULT", "KERNEL_CHOICES", "select", "use", "backend_of", "Linear", "LayerNorm",
           "Embedding", "activation_fn", "zero3_partitioned", "host_readable", "IGNORE_INDEX"]

KERNEL_CHOICES = ("auto", "torch", "cpu")


@dataclasses.dataclass(frozen=True)
class Segments:
    """The examples of a packed micro-batch: a flat stream of N tokens holding E segments back to back.

    ``cu_seqlens``: int32 [E + 1], 0 first, N last, strictly increasing (segment e is tokens
    ``cu_seqlens[e] … cu_seqlens[e + 1] - 1``); ``max_seqlen``: the longest segment's length, a host
    int (what the kernels size their tiles by, without reading the tensor). The values are checked here
    when the tensor is on the CPU (free); on an accelerator only the shape and dtype (reading them
    would be a device sync). ``cache``: index tensors derived from the segments by a backend, built once
    per micro-batch and shared by every layer (not a field: equality and repr ignore it)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        cu, m = self.cu_seqlens, self.max_seqlen
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            what = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"cu_seqlens must be an int32 tensor [segments + 1] (at least 2 values), got {what}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_seqlen={m!r} must be a host int >= 1")
        if not host_readable(cu):
            return
        if int(cu[0]) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        lengths = cu[1:] - cu[:-1]
        if bool((lengths <= 0).any()):
            e = int(torch.nonzero(lengths <= 0)[0])
            raise ValueError(f"cu_seqlens must be strictly increasing: cu_seqlens[{e + 1}]={int(cu[e + 1])} "
                             f"after cu_seqlens[{e}]={int(cu[e])}")
        longest = int(lengths.max())
        if longest != m:
            raise ValueError(f"max_seqlen={m} but the longest segment has {longest} tokens")

    @classmethod
    def from_lengths(cls, lengths, device: torch.device | str | None = None) -> "Segments":
        """From the segments' lengths (a list of ints >= 1, in stream order)."""
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("Segments.from_lengths: no segments (an empty list of lengths)")
        if min(lengths) < 1:
            raise ValueError(f"segment length {min(lengths)} must be >= 1 (lengths {lengths})")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        return cls(cu.to(device) if device is not None else cu, max(lengths))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Segments":
        """The same segments with ``cu_seqlens`` on ``device`` (``max_seqlen`` stays a host int)."""
        return Segments(self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> "Segments":
        return Segments(self.cu_seqlens.pin_memory(), self.max_seqlen)

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    def lengths(self) -> torch.Tensor:
        """[E] int64 (on the tensor's device)."""
        cu = self.cu_seqlens.long()
        return cu[1:] - cu[:-1]

    def segment_ids(self, n_tokens: int | None = None) -> torch.Tensor:
        """[N] int64: each token's segment. ``n_tokens`` (N, when known on the host) avoids a device sync."""
        e = torch.arange(self.num_segments, device=self.cu_seqlens.device)
        n = int(self.cu_seqlens[-1]) if n_tokens is None else n_tokens
        return torch.repeat_interleave(e, self.lengths(), output_size=n)

    def position_ids(self, n_tokens: int | None = None) -> torch.Tensor:
        """[N] int64: positions restarting at 0 in each segment."""
        seg = self.segment_ids(n_tokens)
        return torch.arange(seg.numel(), device=seg.device) - self.cu_seqlens.long()[seg]

#: The backend of a model built without one: the CPU backend, whose every op runs the torch op on
#: anything but CPU tensors (so, on an accelerator, exactly the torch backend).
DEFAULT = CpuOps()


def select(kernels: str, device_type: str, dtype: torch.dtype = torch.float32, zero_stage: int = 0):
    """(backend, description) for ``engine.kernels`` = ``kernels`` on ``device_type`` ("cpu", "cuda", ...)
    training in ``dtype`` at ``zero_stage``. ``auto`` never fails: the CPU backend on a CPU (its compiled
    kernels, or its CPU-tuned fallbacks where none can be built), the torch backend elsewhere. ``cpu``
    raises ValueError (naming the key and the reason) on another device or without compiled kernels;
    ``torch`` always works. The description says what runs, for the log and TensorBoard."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"engine.kernels={kernels!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    notes = []
    if dtype not in (torch.float32, torch.float64):
        notes.append(f"{str(dtype).removeprefix('torch.')} calls take the torch ops")
    if zero_stage == 3:
        notes.append("ZeRO-3 partitioned parameters are read only inside their modules")
    tail = f"; {', '.join(notes)}" if notes and device_type == "cpu" else ""
    if kernels == "torch":
        return TorchOps(), "torch (engine.kernels=torch)"
    if kernels == "cpu":
        if device_type != "cpu":
            raise ValueError(f"engine.kernels=cpu: the CPU kernels run on the CPU, and this run trains on "
                             f"{device_type}; use engine.kernels=auto (torch there) or torch")
        if not cpu_kernels.available():
            raise ValueError(f"engine.kernels=cpu: the CPU kernels cannot be built here "
                             f"({cpu_kernels.unavailable_reason()}); install a C compiler, or use "
                             f"engine.kernels=auto or torch")
        ops = CpuOps()
        return ops, ops.describe() + tail
    if device_type == "cpu":
        ops = CpuOps()
        return ops, ops.describe() + tail + " (auto)"
    return TorchOps(), f"torch (auto: {device_type} device)"


def use(model: torch.nn.Module, ops) -> torch.nn.Module:
    """Give every module of ``model`` that calls the ops layer (those with an ``ops`` attribute) the
    backend ``ops``; returns the model."""
    for m in model.modules():
        if hasattr(m, "ops"):
            m.ops = ops
    return model


def backend_of(model: torch.nn.Module):
    """The backend the model's modules call (the first one found; None when none calls the ops layer)."""
    return next((m.ops for m in model.modules() if hasattr(m, "ops")), None)
