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
``attention(qkv, x, num_heads, attn_mask, p)``
    x [B, T, H] → ``softmax(q kᵀ/√d + mask) · v`` with dropout ``p`` on the probabilities, heads merged
    [B, T, H] (before the output projection); q, k, v from the fused projection ``qkv(x)`` [B, T, 3H]
    (columns q, k, v, each heads × head_dim); ``attn_mask`` [B, 1, 1, T] bool (True: attend) or None.
``projection_residual_norm(linear, x, residual, norm, p, training)``
    ``norm(residual + dropout(linear(x)))``: the post-LN sublayer output.
``embedding(table, ids)``
    ``table(ids)`` [B, T, H]: the word lookup (a backend may tie its gradient to ``decoder_cross_entropy``
    of the same forward over the same weight).
``decoder_cross_entropy(h, weight, bias, n_predicted, labels, ignore_index=-100)``
    h [N, H], weight [V, H], bias [V] → (per-row fp32 loss [N], row argmax [N]) of ``F.linear(h,
    weight[:n_predicted], bias[:n_predicted])``; rows labelled ``ignore_index`` give loss 0.
``cross_entropy(logits, labels, ignore_index=-100, inplace_backward=False, with_argmax=False, bias=None)``
    per-row fp32 loss [N] (and the argmax) of logits [N, V]; see :mod:`megamlm.ops.cross_entropy`.
"""

from __future__ import annotations

import logging

import torch

from megamlm.ops import cpu_kernels
from megamlm.ops.cpu import CpuOps
from megamlm.ops.cross_entropy import IGNORE_INDEX
from megamlm.ops.modules import Embedding, LayerNorm, Linear, host_readable, zero3_partitioned
from megamlm.ops.torch_ops import TorchOps, activation_fn

log = logging.getLogger(__name__)

__all__ = ["TorchOps", "CpuOps", "DEFAULT", "KERNEL_CHOICES", "select", "use", "backend_of", "Linear", "LayerNorm",
           "Embedding", "activation_fn", "zero3_partitioned", "host_readable", "IGNORE_INDEX"]

KERNEL_CHOICES = ("auto", "torch", "cpu")

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
