"""Fused CPU kernels, in C (``cpu_kernels.c``), compiled at first use and called through ctypes:

* dropout (:func:`dropout_mul`, :func:`dropout_add`) with the mask generated inside the kernel from a
  seed and each element's index (a counter-based stream, SplitMix64): never drawn into memory, never
  stored for backward (the backward regenerates it), one pass over the data;
* the feed-forward's bias + exact GELU with its derivative (:func:`bias_gelu`), and the backward's
  multiply with the bias gradient (:func:`mul_colsum`);
* the post-LN residual ``LayerNorm(r + dropout(x + bias))`` and its backward
  (:func:`residual_layer_norm`);
* the cross-entropy over ``logits + bias`` with the row argmax (:func:`cross_entropy_forward`);
* multi-head attention with dropout, tile by tile (:func:`attention_forward`): one (head, sequence)
  at a time on one thread, its scores, softmax, dropout and both products while the [T, T] tile is
  in cache, q/k/v read in place from the fused projection, y written with heads merged. Its small
  gemms call torch's own BLAS ``sgemm_`` (exported by x86 wheels, checked at load):
  :func:`attention_available` is False where there is none. The packed form
  (:func:`attention_segments_forward`) is the same kernel: one tile per (segment, head) over that
  segment's own rows of a flat [N, 3H] stream, no padding computed; a padded batch is the case of
  equal segments.

On CPU, torch's ``dropout`` draws ``bernoulli_`` from the serial mt19937 generator and the
residual add is another pass: for the small bench model dropout was ~10% of the training step.
Here ``residual + dropout(x)`` is one pass with the random bits computed in registers
(:func:`dropout_add`), ~6× faster than mask + multiply + add in torch.

Large calls run on OpenMP threads: the library is built with ``-fopenmp`` and its ``libgomp.so.1``
resolves to the copy torch already loaded, so kernels and torch ops share one thread pool (if the
kernels resolve another runtime than torch's, they stay serial rather than oversubscribe).

The C source (``cpu_kernels.c``) is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``)
into ``$MEGAMLM_KERNEL_DIR`` (default ``~/.cache/megamlm/kernels``), keyed by a hash of the source,
the flags, the compiler and the CPU's instruction-set flags (so a shared home on a mixed cluster
never loads a binary built for another CPU); concurrent ranks compile to temporary files and
rename (:mod:`megamlm.ops.kernel_build`). Without a compiler (or with ``MEGAMLM_CPU_KERNELS=0``) :func:`available` is False and the
model falls back to torch ops with a numpy-drawn mask (same distribution, another stream).

The stream, specified in torch ops by :func:`keep_mask_reference` (tests check the kernel against it
bit for bit): word ``w = mix64(seed + (w + 1)·G)``; element ``i`` is kept iff the int16 in bits
``16·(i mod 4)`` … of word ``i // 4`` is ≥ ``round(p·65536) − 32768``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import torch

from megamlm.ops import kernel_build

log = logging.getLogger(__name__)

__all__ = ["available", "set_enabled", "uses_openmp", "set_parallel_words", "draw_seed", "threshold",
           "unavailable_reason", "dropout_mul", "dropout_add", "keep_mask_reference", "bias_gelu", "mul_colsum",
           "residual_layer_norm", "residual_layer_norm_backward", "cross_entropy_forward",
           "cross_entropy_backward", "attention_available", "attention_forward", "attention_backward",
           "segment_prob_offsets", "attention_segments_forward", "attention_segments_backward"]

_VERSION = 9  # megamlm_kernels_version() of the source this module speaks to
_GOLDEN = 0x9E3779B97F4A7C15

_lock = threading.Lock()
_lib = None  # the loaded library, False once loading failed
_enabled = os.environ.get("MEGAMLM_CPU_KERNELS", "1") != "0"
_why = ""  # why loading failed


def _load():
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        try:
            _lib = kernel_build.load(_VERSION)
        except Exception as e:  # noqa: BLE001 -- any failure means: use the torch fallback
            global _why
            _why = str(e) or type(e).__name__
            log.warning("megamlm CPU kernels unavailable (%s); using torch ops", e)
            _lib = False
        return _lib


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    if not _enabled:
        return "turned off (MEGAMLM_CPU_KERNELS=0)" if os.environ.get("MEGAMLM_CPU_KERNELS") == "0" else "turned off"
    return "" if _load() else _why


def available() -> bool:
    """Whether the compiled kernels are in use (compiles them on the first call)."""
    return _enabled and bool(_load())


def set_enabled(enabled: bool) -> bool:
    """Turn the kernels on or off (tests of the fallback path); returns the previous setting."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


def draw_seed() -> int:
    """A mask seed: one draw of torch's global CPU generator (so ``torch.manual_seed`` fixes masks)."""
    return int(torch.empty((), dtype=torch.int64).random_()) & ((1 << 64) - 1)


def threshold(p: float) -> int:
    """The int16 threshold: an element is kept iff its 16 random bits, as int16, are >= this."""
    return round(p * 65536) - 32768


def _run(name: str, tensors: list[torch.Tensor], out: torch.Tensor, start: int, seed: int, p: float) -> None:
    _lib_fn(name, out.dtype)(*(t.data_ptr() for t in tensors), out.data_ptr(), start, out.numel(), seed,
                             threshold(p), 1.0 / (1.0 - p))


def uses_openmp() -> bool:
    """Whether the loaded kernels run large calls on (torch's) OpenMP threads."""
    return available() and bool(_lib.megamlm_kernels_openmp()) and kernel_build.shares_torch_openmp(_lib)


def set_parallel_words(words: int) -> int:
    """Calls of at least ``words`` 64-bit words (4 elements each) use the OpenMP threads; returns the
    previous setting (for tests)."""
    if not available():
        raise RuntimeError("megamlm CPU kernels are unavailable")
    return int(_lib.megamlm_set_parallel_words(words))


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous():
        raise ValueError(f"{name}: the CPU kernels take contiguous float32/float64 CPU tensors, got "
                         f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
    if like is not None and (t.dtype != like.dtype or t.shape != like.shape):
        raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)} does not match {like.dtype} {tuple(like.shape)}")


def dropout_mul(x: torch.Tensor, p: float, seed: int, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x · keep / (1 - p)`` with the mask of stream ``seed`` at elements ``start …`` (``out`` may be x)."""
    _check("x", x)
    out = torch.empty_like(x) if out is None else out
    _check("out", out, x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    _run("dropout_mul", [x], out, start, seed, p)
    return out


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, start: int = 0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + x · keep / (1 - p)`` in one pass (``out`` may be x or residual)."""
    _check("x", x)
    _check("residual", residual, x)
    out = torch.empty_like(x) if out is None else out
    _check("out", out, x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    _run("dropout_add", [x, residual], out, start, seed, p)
    return out


def _rows_cols(name: str, a: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    _check(name, a)
    if a.dim() < 1:
        raise ValueError(f"{name}: needs at least one dimension, got a scalar")
    cols = a.shape[-1]
    if bias is not None:
        _check("bias", bias)
        if bias.dtype != a.dtype or bias.shape != (cols,):
            raise ValueError(f"bias {bias.dtype} {tuple(bias.shape)} does not match {name}'s last dimension "
                             f"{cols} ({a.dtype})")
    return (a.numel() // cols if cols else 0), cols


def _lib_fn(name: str, dtype: torch.dtype):
    lib = _lib or _load()
    if not lib:
        raise RuntimeError("megamlm CPU kernels are unavailable (see the warning logged when loading them)")
    return getattr(lib, f"megamlm_{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def bias_gelu(a: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None, derivative: bool = False):
    """Exact (erf) GELU of ``a + bias`` (bias over the last dimension, or None), one pass; ``out`` may
    be ``a``. float32: ATen's erf approximation (|error| ≤ 1.5e-7); float64: libm's erf. With
    ``derivative``: (gelu, gelu'(a + bias)) from the same pass, the latter for :func:`mul_colsum`."""
    rows, cols = _rows_cols("a", a, bias)
    out = torch.empty_like(a) if out is None else out
    _check("out", out, a)
    deriv = torch.empty_like(a) if derivative else None
    bias = a.new_zeros(cols) if bias is None else bias  # (the kernel's loop always adds one: it vectorizes)
    _lib_fn("bias_gelu", a.dtype)(a.data_ptr(), bias.data_ptr(), out.data_ptr(), 0 if deriv is None else deriv.data_ptr(),
                                  rows, cols)
    return (out, deriv) if derivative else out


def mul_colsum(grad: torch.Tensor, deriv: torch.Tensor, colsum: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad · deriv, its sum over all but the last dimension or None), one pass (the sums accumulated
    in float64): the gradients of :func:`bias_gelu` for ``a`` and ``bias`` given its derivative."""
    rows, cols = _rows_cols("deriv", deriv, None)
    _check("grad", grad, deriv)
    out = torch.empty_like(deriv)
    bias_sum = torch.zeros(cols, dtype=torch.float64) if colsum else None
    rc = _lib_fn("mul_colsum", deriv.dtype)(grad.data_ptr(), deriv.data_ptr(), out.data_ptr(),
                                            0 if bias_sum is None else bias_sum.data_ptr(), rows, cols)
    if rc:
        raise MemoryError(f"mul_colsum: no memory for the per-thread column sums ({cols} columns)")
    return out, None if bias_sum is None else bias_sum.to(deriv.dtype)


def residual_layer_norm(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                        norm_bias: torch.Tensor, eps: float, p: float, seed: int):
    """Post-LN residual in one pass: ``z = residual + dropout(x + bias)`` (mask of stream ``seed``;
    p = 0 keeps all) and ``y = LayerNorm(z)`` over the last dimension.
    Returns (y, z, mean [rows], rstd [rows]); the last three are what the backward needs."""
    rows, cols = _rows_cols("x", x, bias)
    _check("residual", residual, x)
    for name, t in (("weight", weight), ("norm bias", norm_bias)):
        _check(name, t)
        if t.shape != (cols,) or t.dtype != x.dtype:
            raise ValueError(f"LayerNorm {name} {t.dtype} {tuple(t.shape)} does not match [{cols}] {x.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    y, z = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = x.new_empty(rows), x.new_empty(rows)
    bias = x.new_zeros(cols) if bias is None else bias  # (the kernel's loop always adds one: it vectorizes)
    _lib_fn("residual_ln", x.dtype)(x.data_ptr(), bias.data_ptr(), residual.data_ptr(),
                                    weight.data_ptr(), norm_bias.data_ptr(), z.data_ptr(), y.data_ptr(),
                                    mean.data_ptr(), rstd.data_ptr(), rows, cols, seed, threshold(p), 1.0 / (1.0 - p),
                                    eps)
    return y, z, mean, rstd


def residual_layer_norm_backward(grad_y: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                 weight: torch.Tensor, p: float, seed: int, bias_grad: bool = True):
    """Gradients of :func:`residual_layer_norm`: (grad of z = of the residual, grad of x, of the
    LayerNorm weight, of its bias, of ``bias`` or None), one pass over the rows (column sums in
    float64)."""
    rows, cols = _rows_cols("z", z, None)
    _check("grad_y", grad_y, z)
    grad_z, grad_x = torch.empty_like(z), torch.empty_like(z)
    sums = torch.zeros(3, cols, dtype=torch.float64)
    rc = _lib_fn("residual_ln_backward", z.dtype)(
        grad_y.data_ptr(), z.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.data_ptr(), grad_z.data_ptr(),
        grad_x.data_ptr(), sums[0].data_ptr(), sums[1].data_ptr(), sums[2].data_ptr() if bias_grad else 0, rows, cols,
        seed, threshold(p), 1.0 / (1.0 - p))
    if rc:
        raise MemoryError(f"residual_layer_norm_backward: no memory for the per-thread column sums ({cols} columns)")
    sums = sums.to(z.dtype)
    return grad_z, grad_x, sums[0], sums[1], sums[2] if bias_grad else None


def _ce_check(x: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"cross-entropy kernel: float32 [N, V] logits, got {x.dtype} {tuple(x.shape)}")
    _check("logits", x)
    if labels.dtype != torch.int64 or labels.shape != x.shape[:1] or not labels.is_contiguous():
        raise ValueError(f"cross-entropy kernel: int64 labels [{x.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if bias is None:
        return x.new_zeros(x.shape[1])
    _check("bias", bias)
    if bias.dtype != torch.float32 or bias.shape != x.shape[1:]:
        raise ValueError(f"bias {bias.dtype} {tuple(bias.shape)} does not match the logits' [{x.shape[1]}]")
    return bias


def cross_entropy_forward(x: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int):
    """Per-row cross-entropy of ``x + bias`` (float32 [N, V], bias [V] or None) against ``labels``:
    (loss [N], 0 on ignored rows; lse [N]; first argmax [N]). Reads the logits only."""
    bias = _ce_check(x, bias, labels)
    N, V = x.shape
    loss, lse = x.new_empty(N), x.new_empty(N)
    argmax = torch.empty(N, dtype=torch.int64)
    _lib_fn("ce_forward", torch.float32)(x.data_ptr(), bias.data_ptr(), labels.data_ptr(), ignore_index,
                                         loss.data_ptr(), lse.data_ptr(), argmax.data_ptr(), N, V)
    return loss, lse, argmax


def cross_entropy_backward(x: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, grad_rows: torch.Tensor,
                           labels: torch.Tensor, ignore_index: int, out: torch.Tensor | None = None,
                           bias_grad: bool = False):
    """(grad of the logits [N, V], written to ``out``, which may be x; grad of the bias [V] or None)
    for per-row loss gradients ``grad_rows`` [N] (float32; use 0 on ignored rows)."""
    bias_t = _ce_check(x, bias, labels)
    N, V = x.shape
    out = torch.empty_like(x) if out is None else out
    _check("out", out, x)
    bias_sum = torch.zeros(V, dtype=torch.float64) if bias_grad else None
    rc = _lib_fn("ce_backward", torch.float32)(x.data_ptr(), bias_t.data_ptr(), lse.contiguous().data_ptr(),
                                               grad_rows.contiguous().data_ptr(), labels.data_ptr(), ignore_index,
                                               out.data_ptr(), 0 if bias_sum is None else bias_sum.data_ptr(), N, V)
    if rc:
        raise MemoryError(f"cross_entropy_backward: no memory for the per-thread column sums ({V} columns)")
    return out, None if bias_sum is None else bias_sum.float()


def attention_available() -> bool:
    """Whether :func:`attention_forward` can run: the kernels are in use and have torch's sgemm."""
    return available() and bool(_lib.megamlm_has_sgemm())


def _attention_check(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    if qkv.dtype != torch.float32 or qkv.dim() != 3 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"attention kernel: float32 qkv [B, T, 3·heads·head_dim] with {num_heads} heads, got "
                         f"{qkv.dtype} {tuple(qkv.shape)}")
    _check("qkv", qkv)
    B, T, H3 = qkv.shape
    if max(T, H3) >= 1 << 31:
        raise ValueError(f"attention kernel: sequence {T} or width {H3} exceeds the BLAS's 32-bit sizes")
    return B, T, num_heads, H3 // (3 * num_heads)


def _attention_bias(bias: torch.Tensor | None, qkv: torch.Tensor) -> int:
    if bias is None:
        return 0
    _check("bias", bias)
    if bias.dtype != torch.float32 or bias.shape != qkv.shape[2:]:
        raise ValueError(f"bias: float32 [{qkv.shape[2]}] (q | k | v), got {bias.dtype} {tuple(bias.shape)}")
    return bias.data_ptr()


def _tiles_forward(qkv: torch.Tensor, bias_ptr: int, mask_add: torch.Tensor | None, cu: torch.Tensor,
                   offs: torch.Tensor, max_seqlen: int, nh: int, hd: int, p: float, seed: int):
    """The one attention kernel over the sequences ``cu`` of ``qkv`` [N, 3H] (a batch [B, T] is the
    case of B sequences of T): (y [N, H], probs flat [nh · offs[-1]])."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    N = cu[-1].item()
    y, probs = qkv.new_empty(N, nh * hd), qkv.new_empty(nh * int(offs[-1]))
    rc = _lib_fn("attention_forward", torch.float32)(
        qkv.data_ptr(), bias_ptr, 0 if mask_add is None else mask_add.data_ptr(), cu.data_ptr(), offs.data_ptr(),
        probs.data_ptr(), y.data_ptr(), cu.numel() - 1, max_seqlen, nh, hd, hd ** -0.5, seed, threshold(p),
        1.0 / (1.0 - p))
    _attention_rc(rc, max_seqlen)
    return y, probs


def _tiles_backward(grad_y: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, bias: torch.Tensor | None,
                    bias_grad: bool, cu: torch.Tensor, offs: torch.Tensor, max_seqlen: int, nh: int, hd: int,
                    p: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward of :func:`_tiles_forward`, for ``grad_y`` shaped as its y; ``what`` names the caller."""
    _check("grad_y", grad_y)
    _check("probs", probs)
    H3 = qkv.shape[-1]
    if grad_y.shape != qkv.shape[:-1] + (nh * hd,) or probs.numel() != nh * int(offs[-1]) \
            or grad_y.dtype != qkv.dtype or probs.dtype != qkv.dtype:
        raise ValueError(f"{what} backward: grad_y {tuple(grad_y.shape)} / probs {tuple(probs.shape)} do not "
                         f"match qkv {tuple(qkv.shape)} with {nh} heads")
    bias_ptr = _attention_bias(bias, qkv.view(1, -1, H3))
    if bias_grad and bias is None:
        raise ValueError(f"{what} backward: bias_grad=True needs the bias")
    grad = torch.empty_like(qkv)
    bias_sum = torch.zeros(H3, dtype=torch.float64) if bias_grad else None
    rc = _lib_fn("attention_backward", torch.float32)(
        qkv.data_ptr(), bias_ptr, cu.data_ptr(), offs.data_ptr(), probs.data_ptr(), grad_y.data_ptr(),
        grad.data_ptr(), 0 if bias_sum is None else bias_sum.data_ptr(), cu.numel() - 1, max_seqlen, nh, hd, hd ** -0.5,
        seed, threshold(p), 1.0 / (1.0 - p))
    _attention_rc(rc, max_seqlen)
    return grad, None if bias_sum is None else bias_sum.float()


@functools.lru_cache(maxsize=64)
def _batch_sequences(B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch as the kernel's sequences: (cu = s·T, offs = s·T²), s = 0 … B."""
    s = torch.arange(B + 1, dtype=torch.int64)
    return s * T, s * (T * T)


def attention_forward(qkv: torch.Tensor, mask_add: torch.Tensor | None, num_heads: int, p: float, seed: int,
                      bias: torch.Tensor | None = None):
    """Multi-head attention with dropout from the fused projection: q, k, v = ``qkv`` [B, T, 3H]
    (float32, columns q | k | v) + ``bias`` [3H] (or None; applied inside the kernel, see the C
    source). Returns (y [B, T, H] with heads merged, probs [nh, B, T, T] for the backward).
    ``mask_add`` [B, T] additive (0 attend, -inf padding) or None; dropout ``p`` with the mask of
    stream ``seed`` over ``probs`` as one tensor; scale 1/√head_dim."""
    B, T, nh, hd = _attention_check(qkv, num_heads)
    if mask_add is not None:
        _check("mask_add", mask_add)
        if mask_add.dtype != torch.float32 or mask_add.shape != (B, T):
            raise ValueError(f"mask_add: float32 [{B}, {T}], got {mask_add.dtype} {tuple(mask_add.shape)}")
    bias_ptr = _attention_bias(bias, qkv)
    cu, offs = _batch_sequences(B, T)
    y, probs = _tiles_forward(qkv, bias_ptr, mask_add, cu, offs, T, nh, hd, p, seed)
    return y.view(B, T, nh * hd), probs.view(nh, B, T, T)


def attention_backward(grad_y: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor, num_heads: int, p: float,
                       seed: int, bias: torch.Tensor | None = None,
                       bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the gradient of ``qkv`` [B, T, 3H], and of ``bias`` [3H] or None) for ``grad_y`` [B, T, H],
    given the forward's inputs, ``probs``, ``p`` and ``seed`` (the dropout mask is regenerated). The
    k component of the bias gradient is exactly 0 (the softmax removes a key bias)."""
    B, T, nh, hd = _attention_check(qkv, num_heads)
    if probs.shape != (nh, B, T, T):
        raise ValueError(f"attention backward: probs {tuple(probs.shape)} do not match qkv {tuple(qkv.shape)} "
                         f"with {nh} heads")
    cu, offs = _batch_sequences(B, T)
    return _tiles_backward(grad_y, qkv, probs, bias, bias_grad, cu, offs, T, nh, hd, p, seed, "attention")


def segment_prob_offsets(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Where each segment's probabilities start within a head's slice of the packed kernels' ``probs``:
    int64 [E + 1], ``Σ_{r<s} L_r²`` (the last, P, is the total); head h of segment s is at
    ``h · P + offs[s]`` (for equal segments: the layout [nh, E, L, L] of a batch)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    return torch.cat([lengths.new_zeros(1), (lengths * lengths).cumsum(0)])


def _segments_check(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int):
    """(N, nh, hd, cu as contiguous int64, prob offsets) after checking the packed layout."""
    if qkv.dtype != torch.float32 or qkv.dim() != 2 or qkv.shape[1] % (3 * num_heads):
        raise ValueError(f"packed attention kernel: float32 qkv [N, 3·heads·head_dim] with {num_heads} heads, got "
                         f"{qkv.dtype} {tuple(qkv.shape)}")
    _check("qkv", qkv)
    N, H3 = qkv.shape
    cu = cu_seqlens.to(torch.int64).contiguous()
    if cu.device.type != "cpu" or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens: a CPU tensor [segments + 1], got {tuple(cu.shape)} on {cu.device}")
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != N or bool((lengths <= 0).any()) or int(lengths.max()) > max_seqlen:
        raise ValueError(f"cu_seqlens {cu.tolist()} must rise strictly from 0 to N={N} in steps of at most "
                         f"max_seqlen={max_seqlen}")
    if max(max_seqlen, H3) >= 1 << 31 or max_seqlen * max_seqlen >= 1 << 40:
        raise ValueError(f"packed attention kernel: segment length {max_seqlen} or width {H3} is too large")
    return N, num_heads, H3 // (3 * num_heads), cu, segment_prob_offsets(cu)


def attention_segments_forward(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                               p: float, seed: int, bias: torch.Tensor | None = None):
    """Packed attention: qkv [N, 3H] (float32, columns q | k | v, without ``bias`` [3H] or None) holds the
    segments ``cu_seqlens`` [E + 1] (0 … N, increasing, none longer than ``max_seqlen``) back to back; a
    token attends only to its segment's. The kernel of :func:`attention_forward` (a batch is the case of
    equal segments). Returns (y [N, H] with heads merged, probs: flat, segment s and head h an [L, L]
    tile at ``h · P + offs[s]`` (:func:`segment_prob_offsets`), which is also the tile's place in the
    dropout stream of ``seed``)."""
    N, nh, hd, cu, offs = _segments_check(qkv, cu_seqlens, max_seqlen, num_heads)
    return _tiles_forward(qkv, _attention_bias(bias, qkv.view(1, N, -1)), None, cu, offs, max_seqlen, nh, hd, p,
                          seed)


def attention_segments_backward(grad_y: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor,
                                cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, p: float, seed: int,
                                bias: torch.Tensor | None = None,
                                bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the gradient of ``qkv`` [N, 3H], and of ``bias`` [3H] or None) of :func:`attention_segments_forward`
    for ``grad_y`` [N, H], given its inputs, ``probs``, ``p`` and ``seed`` (the mask is regenerated)."""
    N, nh, hd, cu, offs = _segments_check(qkv, cu_seqlens, max_seqlen, num_heads)
    if probs.dim() != 1:
        raise ValueError(f"packed attention backward: probs must be flat, got {tuple(probs.shape)}")
    return _tiles_backward(grad_y, qkv, probs, bias, bias_grad, cu, offs, max_seqlen, nh, hd, p, seed,
                           "packed attention")


def _attention_rc(rc: int, T: int) -> None:
    if rc == -1:
        raise MemoryError(f"attention kernel: no memory for the per-thread [{T}, {T}] scratch")
    if rc:
        raise RuntimeError("attention kernel: no sgemm attached (check attention_available() first)")


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (wrapping multiply, logical shifts)."""
    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    def wrap(c):  # an unsigned 64-bit constant as the int64 with the same bits
        return c - (1 << 64) if c >= 1 << 63 else c

    z = (z ^ shr(z, 30)) * wrap(0xBF58476D1CE4E5B9)
    z = (z ^ shr(z, 27)) * wrap(0x94D049BB133111EB)
    return z ^ shr(z, 31)


def keep_mask_reference(n: int, p: float, seed: int, start: int = 0) -> torch.Tensor:
    """The mask stream in plain torch ops: [n] bool, True where elements ``start … start + n - 1`` are
    kept. The specification the kernels are tested against (slow: for tests)."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    seed_i64 = seed - (1 << 64) if seed >= 1 << 63 else seed
    gold = _GOLDEN - (1 << 64)
    # seed + (w + 1)·G, wrapping: computed as seed + w·G + G in int64
    words = _mix64(((i // 4 + 1) * gold) + seed_i64)
    lane16 = (words >> (16 * (i % 4))) & 0xFFFF
    as_int16 = torch.where(lane16 >= 1 << 15, lane16 - (1 << 16), lane16)
    return as_int16 >= threshold(p)
