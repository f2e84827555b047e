"""The CPU backend's dropout (:class:`megamlm.ops.cpu.CpuOps` ``dropout`` / ``dropout_add``).

* CPU fp32/fp64 with the compiled kernels (:mod:`megamlm.ops.cpu_kernels`): the mask is generated
  inside the kernel from a seed and each element's index, regenerated in backward (nothing stored),
  and a block's ``residual + dropout(x)`` is one pass (:func:`dropout_add`).
* CPU without them (no C compiler), or other dtypes: a float mask from numpy-drawn bits
  (:func:`_keep_mask`), cheaper than ``bernoulli_``.
* Accelerators and ``torch.compile``: ``F.dropout`` (what the torch backend always runs).

Every path draws its randomness from torch's global generator (one seed per call), so
``torch.manual_seed`` fixes the masks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megamlm.ops import cpu_kernels

__all__ = ["dropout", "dropout_add", "keep_mask"]

_BITS_HELPER = None  # one helper thread for :func:`_random_bits`, made on first use


def _random_bits(n_words: int) -> list[torch.Tensor]:
    """Uniform random bits, ``n_words`` int64 in all, as one or two tensors (to be used in order): a
    function of torch's global generator state (one draw of it seeds the rest, so
    ``torch.manual_seed`` fixes the result).

    The bits come from numpy's SFC64 (``random_raw``: 64 bits per draw, ~2 ns), not torch's CPU
    generator (mt19937 through ``random_``, ~5 ns per int64 and serial); large draws are split in two
    halves filled at once, here and on a helper thread (numpy releases the GIL), from two streams of
    one seed sequence."""
    global _BITS_HELPER
    seed = int(torch.empty((), dtype=torch.int64).random_())  # [0, 2^63): one draw of the global generator
    if n_words < (1 << 16) or torch.get_num_threads() < 2:
        return [torch.from_numpy(np.random.SFC64([seed, 0]).random_raw(n_words).view(np.int64))]
    if _BITS_HELPER is None:
        from concurrent.futures import ThreadPoolExecutor

        _BITS_HELPER = ThreadPoolExecutor(1, thread_name_prefix="megamlm-dropout-bits")
    half = n_words // 2
    other = _BITS_HELPER.submit(np.random.SFC64([seed, 2]).random_raw, n_words - half)
    first = np.random.SFC64([seed, 1]).random_raw(half)
    return [torch.from_numpy(first.view(np.int64)), torch.from_numpy(other.result().view(np.int64))]


def _keep_mask(shape, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dropout mask [shape]: 1/(1-p) where kept, 0 where dropped, in ``dtype``.

    16 random bits per element from :func:`_random_bits` (4 elements per 64-bit draw) instead of
    ``bernoulli_``, which costs ~5× more on CPU; keep probability 1 - p up to 2⁻¹⁶. The comparison
    writes the float mask directly (``ge(..., out=float)``): a bool mask would cost a bool → float
    conversion at every use, as ``x * bool`` and ``where`` are slow paths on CPU."""
    n = 1
    for d in shape:
        n *= d
    threshold = round(p * 65536) - 32768  # P(int16 >= threshold) = 1 - p
    keep = torch.empty(n, dtype=dtype)  # 1.0 kept, 0.0 dropped
    start = 0
    for bits in _random_bits((n + 3) // 4):
        m = min(4 * bits.numel(), n - start)
        torch.ge(bits.view(torch.int16)[:m], threshold, out=keep[start:start + m])
        start += m
    return keep.view(shape).mul_(1.0 / (1.0 - p))


def _mask_dtype(x: torch.Tensor) -> torch.dtype:
    # the scale 1/(1-p) is not exact in bf16/fp16: their masks stay fp32 (the product is cast once)
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class _CPUDropout(torch.autograd.Function):
    """Dropout with the numpy-drawn mask of :func:`_keep_mask` (saved as float, scale included: one
    multiply forward, one backward): the fallback where the compiled kernels are unavailable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = _keep_mask(x.shape, p, _mask_dtype(x))  # [x.shape] 1/(1-p) or 0
        ctx.save_for_backward(keep)
        return torch.mul(x, keep, out=torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep, out=torch.empty_like(grad)), None


class _KernelDropout(torch.autograd.Function):
    """x · keep / (1 - p) by :func:`cpu_kernels.dropout_mul`; only the seed is kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = cpu_kernels.draw_seed(), p
        return cpu_kernels.dropout_mul(x.contiguous(), p, ctx.seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return cpu_kernels.dropout_mul(grad.contiguous(), ctx.p, ctx.seed), None


class _KernelDropoutAdd(torch.autograd.Function):
    """residual + x · keep / (1 - p) in one pass (:func:`cpu_kernels.dropout_add`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = cpu_kernels.draw_seed(), p
        return cpu_kernels.dropout_add(x.contiguous(), residual.contiguous(), p, ctx.seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        return cpu_kernels.dropout_mul(grad, ctx.p, ctx.seed), grad, None


def _use_kernels(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling() and cpu_kernels.available())


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` semantics. CPU fp32/fp64 tensors take the compiled kernel (mask from a seed, not
    stored), other CPU tensors :class:`_CPUDropout`, accelerators ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if _use_kernels(x):
        return _KernelDropout.apply(x, p)
    if x.device.type != "cpu" or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return _CPUDropout.apply(x, p)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``residual + dropout(x)``: one fused pass on CPU fp32/fp64 (the residual connection of a block)."""
    if training and 0.0 < p < 1.0 and x.shape == residual.shape and x.dtype == residual.dtype and _use_kernels(x):
        return _KernelDropoutAdd.apply(x, residual, p)
    return residual + dropout(x, p, training)


keep_mask = _keep_mask  # the stored float mask (public name, for the attention fallback and tests)
