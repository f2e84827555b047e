"""Vocabulary parallelism: cross-entropy and argmax over logits split along the vocabulary.

Each rank of a vocab-parallel group holds the logits of a contiguous slice of the vocabulary,
``local_logits [N, V/t]`` for ids ``[rank * V/t, (rank + 1) * V/t)``; every rank holds the same labels.

``group=None`` means *no vocabulary parallelism* (not the default world group): the plain fp32
log-softmax path (``_CrossEntropy``: row-chunked, equal to ``F.cross_entropy`` in fp32). A group of
size 1 short-circuits to the same path.

The recipe (Megatron ``tensor_parallel/cross_entropy.py``): compute in fp32; all-reduce the row max,
the sum of exponentials and the target logit over the group; the backward needs no collective
(softmax minus the one-hot of the target, on the local slice). ``ignore_index`` rows give loss 0 and
gradient 0. The caller's logits are never mutated. The output is per row: the objective chooses the
reduction.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "group_size_rank", "vocab_parallel_cross_entropy", "vocab_parallel_argmax"]


def group_size_rank(group) -> tuple[int, int]:
    """(size, rank) of a process group; ``None`` (no vocabulary parallelism) is (1, 0)."""
    if group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=op, group=group)
    return t


_CHUNK_BYTES = 4 << 20  # row chunks of ~4 MB fp32 for the single-rank passes (cache- and malloc-friendly)


class _CrossEntropy(torch.autograd.Function):
    """Single-rank fp32 cross-entropy per row, in row chunks so that no [N, V] temporary is allocated
    besides the gradient: forward saves the logits (a reference when already fp32) and the row
    log-sum-exp; backward writes exp(logits - lse) · g - onehot · g chunk by chunk. Same result as
    ``F.cross_entropy(logits.float(), labels, reduction="none")`` with ~half its passes over [N, V]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool):
        x = logits.float()  # [N, V]; not written to in forward
        N, V = x.shape
        step = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
        lse = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
        for s in range(0, N, step):
            xc = x[s:s + step]  # [c, V]
            m = xc.amax(dim=-1, keepdim=True)  # [c, 1]
            lse[s:s + step] = torch.sub(xc, m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
        valid = labels != ignore_index  # [N]
        safe = torch.where(valid, labels, torch.zeros_like(labels))  # [N]
        target = x.gather(1, safe.unsqueeze(-1)).squeeze(-1)  # [N]
        loss = torch.where(valid, lse - target, torch.zeros_like(lse))  # [N]
        ctx.save_for_backward(x, lse, safe, valid)
        ctx.input_dtype = logits.dtype
        ctx.inplace = inplace_backward or x is not logits  # our own fp32 copy may always be reused
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, lse, safe, valid = ctx.saved_tensors
        N, V = x.shape
        g = (grad_loss * valid).to(torch.float32)  # [N], 0 on ignored rows
        grad = x if ctx.inplace else torch.empty_like(x)  # [N, V]
        step = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
        for s in range(0, N, step):
            e = s + step
            torch.sub(x[s:e], lse[s:e].unsqueeze(-1), out=grad[s:e]).exp_().mul_(g[s:e].unsqueeze(-1))
        grad[torch.arange(N, device=x.device), safe] -= g  # softmax - onehot, scaled
        return grad.to(ctx.input_dtype), None, None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row CE over vocab-sharded logits; collectives in forward only."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, group, ignore_index: int):
        import torch.distributed as dist

        size, rank = group_size_rank(group)
        n_local = local_logits.shape[-1]
        start = rank * n_local
        logits = local_logits.float()  # [N, V/t] fp32 (a copy unless already fp32: never written below)

        row_max = logits.max(dim=-1).values  # [N]
        if size > 1:
            _all_reduce(row_max, dist.ReduceOp.MAX, group)
        shifted = logits - row_max.unsqueeze(-1)  # [N, V/t], our own tensor from here on

        valid = labels != ignore_index  # [N]
        local_label = labels - start  # [N]
        in_slice = valid & (local_label >= 0) & (local_label < n_local)  # [N]
        local_label = torch.where(in_slice, local_label, torch.zeros_like(local_label))  # [N]
        target = shifted.gather(1, local_label.unsqueeze(-1)).squeeze(-1) * in_slice  # [N]
        exp = shifted.exp_()  # [N, V/t]
        sum_exp = exp.sum(dim=-1)  # [N]
        if size > 1:
            _all_reduce(target, dist.ReduceOp.SUM, group)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        loss = torch.where(valid, torch.log(sum_exp) - target, torch.zeros_like(target))  # [N]

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # [N, V/t]
        ctx.save_for_backward(softmax, local_label, in_slice, valid)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_label, in_slice, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == label_i]; written into the saved softmax (the graph
        # is freed after backward, as in Megatron: no retain_graph through this Function).
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_label] -= in_slice.to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, group=None,
                                 ignore_index: int = IGNORE_INDEX, inplace_backward: bool = False) -> torch.Tensor:
    """local_logits [N, V/t] (any float dtype), labels [N] global ids → per-row fp32 loss [N]
    (0 where ``labels == ignore_index``).

    The logits are never written in forward. ``inplace_backward=True`` lets the single-rank backward
    write the gradient into fp32 logits' storage (saves an [N, V] buffer); only for logits that
    nothing reads after the loss, e.g. those the model makes for the loss alone."""
    if local_logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != local_logits.shape[0]:
        raise ValueError(f"expected local_logits [N, V] and labels [N], got {tuple(local_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    size, _ = group_size_rank(group)
    if size == 1:
        return _CrossEntropy.apply(local_logits, labels, ignore_index, inplace_backward)
    return _VocabParallelCrossEntropy.apply(local_logits, labels, group, ignore_index)


@torch.no_grad()
def vocab_parallel_argmax(local_logits: torch.Tensor, group=None) -> torch.Tensor:
    """Global argmax id per row [N] of vocab-sharded logits; ties go to the smallest id, as torch."""
    size, rank = group_size_rank(group)
    if size == 1:
        return local_logits.argmax(dim=-1)
    import torch.distributed as dist

    n_local = local_logits.shape[-1]
    local_max, local_idx = local_logits.float().max(dim=-1)  # [N], [N]
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)  # [N]
    big = torch.iinfo(torch.int64).max
    cand = torch.where(local_max == global_max, local_idx + rank * n_local,
                       torch.full_like(local_idx, big))  # [N]
    return _all_reduce(cand, dist.ReduceOp.MIN, group)
