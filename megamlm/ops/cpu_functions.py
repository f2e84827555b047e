"""Autograd functions of the CPU backend (:class:`megamlm.ops.cpu.CpuOps`), each around the compiled
kernels of :mod:`megamlm.ops.cpu_kernels` with a hand-written backward:

* attention with dropout straight from the fused qkv projection: :class:`TileAttention` (float32, one
  cached (head, sequence) tile at a time per thread), :class:`SegmentTileAttention` (its packed form:
  one tile per (segment, head) of a flat stream, no padding) and :class:`CPUAttention` (head-by-head gemms on
  strided views; float64, or without the tile kernel); :func:`attention_with_dropout` is the formula in
  torch ops (autocast, bf16);
* :class:`BiasGelu`: the feed-forward's bias + exact GELU, its derivative from the same pass;
* :class:`ResidualLayerNorm`: the post-LN ``LayerNorm(r + dropout(x + bias))``, the mask from a seed;
* the tied vocabulary: :class:`TiedLookup` (the word-embedding lookup that takes the decoder's weight
  gradient from a :class:`TiedGrad`) and :class:`LinearInWorkspace` (the training logits in a reused
  :class:`Workspace`).

``nn.Linear`` + ``F.gelu`` on CPU costs the bias twice per step: ``addmm`` first copies the bias into
every row of the [tokens, ffn] output (and the gemm then reads it back), and the backward sums the
output gradient over rows in a separate pass; :class:`BiasGelu` takes ``(x Wᵀ, b)`` and returns the bias
gradient from the multiply pass of its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamlm.ops import cpu_kernels
from megamlm.ops.cpu_dropout import _keep_mask, dropout

__all__ = ["TiedGrad", "TiedLookup", "Workspace", "LinearInWorkspace", "attention_with_dropout", "CPUAttention",
           "TileAttention", "SegmentTileAttention", "BiasGelu", "ResidualLayerNorm"]


class TiedGrad:
    """Carries the tied decoder's weight gradient to the word-embedding lookup of the same forward.

    The tied weight [V, H] gets two gradients: the decoder's dense one and the lookup's B·T rows.
    Left to autograd, the lookup's is a zeroed [V, H] (filled, scattered into) and the two are summed:
    three more passes over V·H per step (~15 ms of a 550 ms step for the bench model on CPU). With a
    ``TiedGrad``, the decoder's backward leaves its gradient here instead of returning it, and the
    lookup's backward (which autograd runs after it: the decoder consumes what the lookup produced)
    adds its rows into that tensor and returns the sum as the weight's only gradient."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: torch.Tensor | None = None


class TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)``; backward returns the decoder's gradient left in ``tied`` (or zeros)
    plus the looked-up rows' gradients, added in place."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, tied: TiedGrad) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        grad_w, ctx.tied.grad = ctx.tied.grad, None
        if grad_w is None:  # the decoder did not run (or returned its gradient itself)
            grad_w = grad.new_zeros(ctx.weight_shape)
        grad_w.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))  # [V, H] += rows
        return None, grad_w, None


def attention_with_dropout(q, k, v, attn_mask, p: float) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) with dropout, times v; what SDPA's math path does, with :func:`dropout`.
    The reference for :class:`CPUAttention`; runs where that one does not (autocast, bf16)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [B, nh, T, T]
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # mask [B, 1, 1, T]
    probs = dropout(torch.softmax(scores, dim=-1), p, True)  # [B, nh, T, T]
    return torch.matmul(probs, v)  # [B, nh, T, hd]


class CPUAttention(torch.autograd.Function):
    """Attention with dropout on CPU, fp32/fp64, straight from the fused projection: qkv [B, T, 3H]
    (columns q, k, v, each nh × hd) → y [B, T, H] (heads merged), with a hand-written backward.

    Head by head with 3-D ``bmm`` on strided views: a head's q, k, v are [B, T, hd] slices of qkv
    with row stride 3H, which MKL's batched gemm reads in place, so nothing is copied to split the
    heads (the 4-D ``matmul`` of :func:`attention_with_dropout` copies kᵀ and v, its backward stacks
    and copies the q, k, v gradients, and the head merge copies y). The 1/√hd scale is the gemm's
    alpha; dropout multiplies by the compiled kernel's mask (:mod:`cpu_kernels`: from a seed, regenerated
    in backward) or, without the kernels, a float mask drawn once for all heads ([nh, B, T, T]). Saved
    for backward: qkv and the probabilities (and that mask); the dropped probabilities are recomputed.
    ``mask_add``: None or [B, 1, T] additive (0 attend, -inf padding)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, mask_add: torch.Tensor | None, num_heads: int, p: float):
        B, T, H3 = qkv.shape
        nh, hd = num_heads, H3 // (3 * num_heads)
        scale = hd ** -0.5
        q, k, v = qkv.view(B, T, 3, nh, hd).unbind(2)  # each [B, T, nh, hd] (strided views)
        # dropout: the kernel's mask stream (seed; head h covers elements [h·B·T², (h+1)·B·T²)), or a
        # stored float mask [nh, B, T, T] where the kernels are unavailable
        seed = cpu_kernels.draw_seed() if cpu_kernels.available() else None
        keep = _keep_mask((nh, B, T, T), p, qkv.dtype) if seed is None else None
        scores = qkv.new_empty(B, T, T)  # scratch, reused per head
        y = qkv.new_empty(nh, B, T, hd)
        probs = []
        for h in range(nh):
            kt = k[:, :, h].transpose(1, 2)  # [B, hd, T]
            if mask_add is None:
                torch.baddbmm(scores, q[:, :, h], kt, beta=0.0, alpha=scale, out=scores)  # [B, T, T]
            else:
                torch.baddbmm(mask_add.expand(B, T, T), q[:, :, h], kt, alpha=scale, out=scores)
            probs.append(torch.softmax(scores, dim=-1))  # [B, T, T]
            if seed is None:
                torch.mul(probs[h], keep[h], out=scores)  # dropped probabilities
            else:
                cpu_kernels.dropout_mul(probs[h], p, seed, h * B * T * T, out=scores)
            torch.bmm(scores, v[:, :, h], out=y[h])  # [B, T, hd]
        ctx.save_for_backward(qkv, *probs, *(() if keep is None else (keep,)))
        ctx.scale, ctx.seed, ctx.p, ctx.nh = scale, seed, p, nh
        return y.permute(1, 2, 0, 3).reshape(B, T, nh * hd)  # [B, T, H]: the one copy, merging heads

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        qkv, *probs = ctx.saved_tensors
        nh, seed, p = ctx.nh, ctx.seed, ctx.p
        keep = probs.pop() if seed is None else None
        B, T, H3 = qkv.shape
        hd = H3 // (3 * nh)
        q, k, v = qkv.view(B, T, 3, nh, hd).unbind(2)  # each [B, T, nh, hd]
        g = grad_y.reshape(B, T, nh, hd)  # [B, T, nh, hd]
        grad = qkv.new_empty(3, nh, B, T, hd)  # dq, dk, dv per head, contiguous for the gemm outputs
        dropped = qkv.new_empty(B, T, T)  # scratch
        dprobs = qkv.new_empty(B, T, T)  # scratch
        for h in range(nh):
            gy = g[:, :, h]  # [B, T, hd] (strided)
            start = h * B * T * T
            if seed is None:
                torch.mul(probs[h], keep[h], out=dropped)  # [B, T, T] the dropped probabilities again
            else:
                cpu_kernels.dropout_mul(probs[h], p, seed, start, out=dropped)
            torch.bmm(dropped.transpose(1, 2), gy, out=grad[2, h])  # dv = droppedᵀ gy
            torch.bmm(gy, v[:, :, h].transpose(1, 2), out=dprobs)  # d dropped [B, T, T]
            if seed is None:
                dprobs.mul_(keep[h])  # d probs
            else:
                cpu_kernels.dropout_mul(dprobs, p, seed, start, out=dprobs)
            ds = torch._softmax_backward_data(dprobs, probs[h], -1, qkv.dtype)  # d scores [B, T, T]
            torch.baddbmm(grad[0, h], ds, k[:, :, h], beta=0.0, alpha=ctx.scale, out=grad[0, h])  # dq
            torch.baddbmm(grad[1, h], ds.transpose(1, 2), q[:, :, h], beta=0.0, alpha=ctx.scale,
                          out=grad[1, h])  # dk
        return grad.permute(2, 3, 0, 1, 4).reshape(B, T, H3), None, None, None  # [B, T, 3H]


class TileAttention(torch.autograd.Function):
    """Attention with dropout on CPU, float32, by :func:`cpu_kernels.attention_forward`: each (head,
    sequence) tile's scores, softmax, dropout and products in one pass on one thread while the tile
    is in cache; qkv [B, T, 3H] read in place, y [B, T, H] written with heads merged, and the backward
    writes the qkv gradient in place of its layout (no split or merge copies). ``bias``: the qkv
    projection's bias (or None), which the projection then leaves out: the kernel applies it per tile
    at O(T·hd) cost (no broadcast copy before the projection's gemm, no pass over the qkv gradient
    for its gradient; a key bias has exactly no effect through the softmax, and gets gradient 0).
    The dropout mask is the kernels' stream over the probabilities [nh, B, T, T] (that of
    :class:`CPUAttention`); saved for backward: qkv, the bias and the probabilities.
    ``mask_add``: None or [B, T] additive (0 attend, -inf padding)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor | None, mask_add: torch.Tensor | None, num_heads: int,
                p: float):
        seed = cpu_kernels.draw_seed()
        y, probs = cpu_kernels.attention_forward(qkv, mask_add, num_heads, p, seed, bias)
        # (a detached alias of the bias: its values as of now, whatever ZeRO does to the parameter later)
        ctx.save_for_backward(qkv, probs, None if bias is None else bias.detach())
        ctx.nh, ctx.p, ctx.seed = num_heads, p, seed
        return y  # [B, T, H]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        qkv, probs, bias = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[1]
        grad, grad_bias = cpu_kernels.attention_backward(grad_y.contiguous(), qkv, probs, ctx.nh, ctx.p, ctx.seed,
                                                         bias, bias_grad=need_bias)
        return grad, grad_bias, None, None, None  # [B, T, 3H], [3H]


class SegmentTileAttention(torch.autograd.Function):
    """:class:`TileAttention` over packed segments, by :func:`cpu_kernels.attention_segments_forward`:
    qkv [N, 3H] (one flat stream), ``cu_seqlens`` [E + 1] on the CPU, each (segment, head) one tile over
    that segment's rows only (no padding computed, no mask); the bias as in :class:`TileAttention`; the
    dropout mask the kernels' stream over the packed probabilities. Returns y [N, H]."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor, max_seqlen: int,
                num_heads: int, p: float):
        seed = cpu_kernels.draw_seed() if p > 0.0 else 0  # no draw without dropout: the padded path (SDPA) makes none
        cu = cu_seqlens.to(torch.int64).contiguous()
        y, probs = cpu_kernels.attention_segments_forward(qkv, cu, max_seqlen, num_heads, p, seed, bias)
        ctx.save_for_backward(qkv, probs, cu, None if bias is None else bias.detach())
        ctx.nh, ctx.p, ctx.seed, ctx.max_seqlen = num_heads, p, seed, max_seqlen
        return y  # [N, H]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        qkv, probs, cu, bias = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[1]
        grad, grad_bias = cpu_kernels.attention_segments_backward(
            grad_y.contiguous(), qkv, probs, cu, ctx.max_seqlen, ctx.nh, ctx.p, ctx.seed, bias, bias_grad=need_bias)
        return grad, grad_bias, None, None, None, None  # [N, 3H], [3H]


class BiasGelu(torch.autograd.Function):
    """gelu(a + bias); saves gelu'(a + bias) from the same kernel pass (not ``a``: the backward is a
    multiply, without a second erf and exp)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out, deriv = cpu_kernels.bias_gelu(a, bias, derivative=True)
        ctx.save_for_backward(deriv)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (deriv,) = ctx.saved_tensors
        grad_a, grad_bias = cpu_kernels.mul_colsum(grad.contiguous(), deriv, colsum=ctx.has_bias and ctx.needs_input_grad[1])
        return grad_a, grad_bias


class ResidualLayerNorm(torch.autograd.Function):
    """LayerNorm(residual + dropout(x + bias)) by :func:`cpu_kernels.residual_layer_norm`; saved for
    backward: z, the row mean and rstd, and the mask's seed (not the mask)."""

    @staticmethod
    def forward(ctx, x, bias, residual, weight, norm_bias, eps: float, p: float):
        seed = cpu_kernels.draw_seed() if p > 0.0 else 0
        y, z, mean, rstd = cpu_kernels.residual_layer_norm(x, bias, residual, weight, norm_bias, eps, p, seed)
        ctx.save_for_backward(z, mean, rstd, weight)
        ctx.p, ctx.seed, ctx.has_bias = p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, mean, rstd, weight = ctx.saved_tensors
        need_bias = ctx.has_bias and ctx.needs_input_grad[1]
        grad_z, grad_x, grad_w, grad_nb, grad_b = cpu_kernels.residual_layer_norm_backward(
            grad_y.contiguous(), z, mean, rstd, weight, ctx.p, ctx.seed, bias_grad=need_bias)
        return grad_x, grad_b, grad_z, grad_w, grad_nb, None, None


def _storage_in_use(t: torch.Tensor) -> bool:
    """Whether anything besides ``t`` holds its storage (a view, a saved tensor of a pending graph).
    Unknown → True (never reuse)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return True
    return count(t.untyped_storage()._cdata) > 2  # t's reference and the temporary storage object


class LinearInWorkspace(torch.autograd.Function):
    """``F.linear(h, w, b)`` → [N, V] written into ``holder``'s reused :class:`Workspace`; backward as
    F.linear's (with ``tied``: the weight's gradient, as full rows [weight_rows, H], left for the lookup).

    On CPU a fresh tensor above glibc's mmap threshold (at most 32 MB) is mapped anew and page-faulted
    in on every step: the bench's MLM logits (603 × 30522 fp32, 74 MB) cost ~18k faults, ~15 ms a step,
    all in the bias fill of ``addmm``. The logits exist for the loss alone (which writes their gradient
    into them), so the next step may reuse the memory once nothing holds it."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, holder: "Workspace",
                weight_rows: int, tied: TiedGrad | None = None):
        ctx.save_for_backward(h, w)
        ctx.tied, ctx.weight_rows = tied, weight_rows
        out = holder.get(h.shape[0], w.shape[0], h.dtype)  # [N, V]
        if b is None:  # the bias is the caller's (the loss adds it chunk by chunk)
            return torch.mm(h, w.t(), out=out)
        return torch.addmm(b, h, w.t(), out=out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, w = ctx.saved_tensors  # [N, H], [V, H]; grad [N, V]
        grad_h = grad.mm(w) if ctx.needs_input_grad[0] else None  # [N, H]
        grad_w = None
        if ctx.needs_input_grad[1] and ctx.tied is not None:  # left for the tied lookup, full rows
            full = grad.new_empty(ctx.weight_rows, h.shape[1])  # [V_rows, H]
            torch.mm(grad.t(), h, out=full[:w.shape[0]])
            full[w.shape[0]:].zero_()  # vocabulary padding rows: never predicted
            ctx.tied.grad = full
        elif ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(h)  # [V, H]
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None  # [V] (None when b was None)
        return grad_h, grad_w, grad_b, None, None, None


class Workspace:
    """The scratch logits' memory, kept between calls: :meth:`get` returns an [n, v] view of it, or of a
    new one when too small or still held (two forwards before a backward stay correct)."""

    def __init__(self):
        self.buf: torch.Tensor | None = None

    def get(self, n: int, v: int, dtype: torch.dtype) -> torch.Tensor:
        ws = self.buf
        if ws is None or ws.numel() < n * v or ws.dtype != dtype or _storage_in_use(ws):
            ws = self.buf = torch.empty(n * v + (n * v >> 3), dtype=dtype)  # 1/8 slack: N varies by batch
        return ws[:n * v].view(n, v)
