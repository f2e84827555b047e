"""Single-rank cross-entropy per row, fp32, in row chunks (no [N, V] temporary besides the gradient),
with the row argmax from the row-max pass and an optional bias added inside the loss: the op
``cross_entropy`` of both backends (:class:`CrossEntropy`; the CPU backend lets it take the compiled
kernel). The row-max helpers (:func:`block_max`, :func:`first_argmax`) also serve the vocab-parallel
loss in :mod:`megamlm.parallel.vocab`.
"""

from __future__ import annotations

import torch

from megamlm.ops import cpu_kernels

from megamlm.labels import IGNORE_INDEX  # noqa: E402 (re-exported)

__all__ = ["IGNORE_INDEX", "CHUNK_BYTES", "DEVICE_CHUNK_BYTES", "chunk_rows", "BLOCK", "block_max", "first_argmax", "CrossEntropy", "kernel_fits",
           "cross_entropy"]


CHUNK_BYTES = 4 << 20  # row chunks of ~4 MB fp32 for the single-rank passes (cache- and malloc-friendly)
#: on an accelerator a chunk is a few kernel launches, not a cache's worth: ~256 MB chunks, one or two per loss
#: at BERT sizes (4 MB chunks made ~270 launches of amax alone per BERT-base step on an H200, 2026-12-04)
DEVICE_CHUNK_BYTES = 256 << 20
BLOCK = 128  # columns per block of the row-max pass (:func:`block_max`)


def chunk_rows(x: torch.Tensor, cols: int) -> int:
    """Rows per chunk of the chunked passes over fp32 rows of ``cols`` columns on ``x``'s device:
    :data:`CHUNK_BYTES` on the CPU, :data:`DEVICE_CHUNK_BYTES` elsewhere."""
    budget = CHUNK_BYTES if x.device.type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // (4 * max(cols, 1)))


def block_max(x: torch.Tensor) -> torch.Tensor:
    """x [c, V] → the max of each block of ``BLOCK`` columns [c, ceil(V / BLOCK)] (last block shorter).
    As fast as the plain row max (one vectorised pass); its max is the row max, and it locates the
    row's first maximum cheaply (:func:`first_argmax`)."""
    c, V = x.shape
    full = V // BLOCK * BLOCK
    out = torch.empty(c, -(-V // BLOCK), dtype=x.dtype, device=x.device)  # [c, nb]
    if full:
        torch.amax(x[:, :full].unflatten(1, (-1, BLOCK)), dim=-1, out=out[:, :full // BLOCK])
    if full < V:
        out[:, -1] = x[:, full:].amax(dim=-1)
    return out


def first_argmax(x: torch.Tensor, block_max: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """The first column holding ``row_max`` in each row of x [N, V] — ``x.argmax(-1)`` (ties to the smallest
    id) for ``row_max`` the row max — from :func:`block_max`'s [N, nb] without another pass over x: the
    first block whose max is the row max, then the first match among that block's ``BLOCK`` columns
    (gathered, [N, BLOCK]). Rows where nothing equals ``row_max`` (a NaN) give an arbitrary id."""
    N, V = x.shape
    hit = block_max == row_max.unsqueeze(-1)  # [N, nb]
    block = hit.to(torch.uint8).argmax(dim=-1)  # [N] first block holding the max (argmax: first of ties)
    cols = (block.unsqueeze(-1) * BLOCK + torch.arange(BLOCK, device=x.device)).clamp_(max=V - 1)  # [N, B]
    offset = (x.gather(1, cols) == row_max.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)  # [N]
    return block * BLOCK + offset  # clamped repeats of column V-1 come after it: never first


class CrossEntropy(torch.autograd.Function):
    """Single-rank fp32 cross-entropy per row, in row chunks so that no [N, V] temporary is allocated
    besides the gradient: forward saves the logits (a reference when already fp32) and the row
    log-sum-exp; backward writes exp(logits - lse) · g - onehot · g chunk by chunk. Same result as
    ``F.cross_entropy(logits.float(), labels, reduction="none")`` with ~half its passes over [N, V].
    With ``with_argmax`` it also returns the row argmax (non-differentiable), found from the row-max
    pass (:func:`first_argmax`) instead of a separate ``argmax``, which is ~10× slower on CPU."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool,
                with_argmax: bool, bias: torch.Tensor | None, kernels: bool):
        x = logits.float()  # [N, V]; not written to in forward (but for ``bias`` on the torch path)
        N, V = x.shape
        if bias is not None and not (inplace_backward and x is logits):
            raise ValueError("a bias for the cross-entropy needs fp32 scratch logits (inplace_backward=True)")
        ctx.input_dtype = logits.dtype
        ctx.inplace = inplace_backward or x is not logits  # our own fp32 copy may always be reused
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]
        ctx.ignore_index = ignore_index
        ctx.kernel = kernels and kernel_fits(x, labels)
        if ctx.kernel:  # one read-only pass per row (max, then log-sum-exp and argmax), bias added on the fly
            labels = labels.contiguous()
            loss, lse, pred = cpu_kernels.cross_entropy_forward(x, bias, labels, ignore_index)
            # the bias' values as of now: under ZeRO-3 a parameter is released (emptied) after its module's
            # call, before this backward runs; a detached alias keeps the values for the backward
            ctx.save_for_backward(x, lse, labels, labels != ignore_index, None if bias is None else bias.detach())
        else:
            if bias is not None:
                x = x.detach()  # written in place below; the caller's logits are scratch (read by nothing else)
            step = chunk_rows(x, V)
            lse = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
            bmax = torch.empty(N, -(-V // BLOCK), dtype=torch.float32, device=x.device)  # [N, nb]
            for s in range(0, N, step):
                xc = x[s:s + step]  # [c, V]
                if bias is not None:  # the decoder's bias, added here while the chunk is in cache
                    xc.add_(bias)
                bmax[s:s + step] = block_max(xc)
                m = bmax[s:s + step].amax(dim=-1, keepdim=True)  # [c, 1] row max
                lse[s:s + step] = torch.sub(xc, m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
            valid = labels != ignore_index  # [N]
            safe = torch.where(valid, labels, torch.zeros_like(labels))  # [N]
            target = x.gather(1, safe.unsqueeze(-1)).squeeze(-1)  # [N]
            loss = torch.where(valid, lse - target, torch.zeros_like(lse))  # [N]
            ctx.save_for_backward(x, lse, safe, valid, None)
            pred = first_argmax(x, bmax, bmax.amax(dim=-1)) if with_argmax else None  # [N]
        if not with_argmax:
            return loss
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        x, lse, safe, valid, bias = ctx.saved_tensors
        N, V = x.shape
        g = (grad_loss * valid).to(torch.float32)  # [N], 0 on ignored rows
        grad = x if ctx.inplace else torch.empty_like(x)  # [N, V]
        if ctx.kernel:  # softmax - onehot, scaled, and the bias' column sums, in one pass
            grad, grad_bias = cpu_kernels.cross_entropy_backward(x, bias, lse, g, safe, ctx.ignore_index, out=grad,
                                                                 bias_grad=ctx.bias_grad)
        else:
            grad_bias = softmax_minus_onehot(x, lse, g, safe, grad, bias_grad=ctx.bias_grad)
        return grad.to(ctx.input_dtype), None, None, None, None, grad_bias, None


def softmax_minus_onehot(x: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, labels: torch.Tensor,
                         out: torch.Tensor, onehot_weight: torch.Tensor | None = None,
                         bias_grad: bool = False) -> torch.Tensor | None:
    """The cross-entropy gradient of logits ``x`` [N, V] (fp32) into ``out`` (may be ``x``):
    ``out = g · (exp(x - lse) - onehot(labels) · onehot_weight)``, row by row in chunks of
    :func:`chunk_rows` (on a CPU each chunk stays in cache); ``lse`` [N] the rows' log-sum-exp, ``g`` [N] the row
    weights (0 on ignored rows), ``onehot_weight`` [N] or None (1: a vocab-parallel rank passes 0 for
    labels outside its slice). With ``bias_grad``: also the column sums of ``out`` [V] (the gradient of a
    bias added to ``x``), taken while each chunk is in cache; else None."""
    N, V = x.shape
    step = chunk_rows(x, V)
    grad_bias = torch.zeros(V, dtype=torch.float32, device=x.device) if bias_grad else None
    for s in range(0, N, step):
        e = s + step
        torch.sub(x[s:e], lse[s:e].unsqueeze(-1), out=out[s:e]).exp_().mul_(g[s:e].unsqueeze(-1))
        if grad_bias is not None:
            grad_bias += out[s:e].sum(0)
    hot = g if onehot_weight is None else g * onehot_weight
    out[torch.arange(N, device=x.device), labels] -= hot
    if grad_bias is not None:
        grad_bias.index_add_(0, labels, -hot)  # the onehot term of the column sums
    return grad_bias


def kernel_fits(x: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the compiled CPU kernel can take this loss (float32 CPU logits, int64 labels, kernels built)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and labels.dtype == torch.int64
            and not torch.compiler.is_compiling() and cpu_kernels.available())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  inplace_backward: bool = False, with_argmax: bool = False, bias: torch.Tensor | None = None,
                  kernels: bool = False):
    """logits [N, V] (any float dtype), labels [N] → per-row fp32 loss [N] (0 on ``ignore_index`` rows), and
    with ``with_argmax`` the row argmax [N] (ties to the smallest id). ``inplace_backward``: the backward may
    write the gradient into fp32 logits' storage (logits made for the loss alone). ``bias`` [V] (fp32
    scratch logits, ``inplace_backward``): added to the logits chunk by chunk inside the loss, its gradient
    summed in the backward's chunk loop. ``kernels``: take the compiled CPU kernel where it fits."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return CrossEntropy.apply(logits, labels, ignore_index, inplace_backward, with_argmax, bias, kernels)
