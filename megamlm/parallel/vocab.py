"""Vocabulary parallelism: cross-entropy and argmax over logits split along the vocabulary (the layers,
collectives and :func:`~megamlm.parallel.layers.parallelize_vocab`, which splits a finished model's
embedding and tied decoder, live in :mod:`megamlm.parallel.layers`).

Each rank of a vocab-parallel group holds the logits of a contiguous slice of the vocabulary,
``local_logits [N, V/vp]`` for ids ``[rank * V/vp, (rank + 1) * V/vp)``; every rank holds the same labels.

``group=None`` means *no vocabulary parallelism* (not the default world group): the plain fp32
log-softmax path (:func:`megamlm.ops.cross_entropy.cross_entropy`: row-chunked, equal to ``F.cross_entropy`` in fp32). A group of
size 1 short-circuits to the same path.

The recipe (Megatron ``tensor_parallel/cross_entropy.py``): compute in fp32; all-reduce the row max,
the sum of exponentials and the target logit over the group; the backward needs no collective
(softmax minus the one-hot of the target, on the local slice). Both paths read the logits in row
chunks and keep only the row log-sum-exp, so the peak is the logits themselves plus their gradient
(or just the logits, with ``inplace_backward``): per rank [N, V/vp]. ``ignore_index`` rows give loss 0 and
gradient 0. The caller's logits are never mutated (unless ``inplace_backward``, then in backward only).
The output is per row: the objective chooses the reduction. Columns of padded vocabulary rows arrive as −inf (the vocab-parallel decoder masks them):
they get exactly zero probability and zero gradient, so the result equals the single-rank one over the
real rows only.
"""

from __future__ import annotations

import torch

from megamlm.ops.cross_entropy import (IGNORE_INDEX, block_max, chunk_rows, cross_entropy, first_argmax,
                                     softmax_minus_onehot)
from megamlm.parallel.groups import all_reduce as _all_reduce, group_size_rank

__all__ = ["IGNORE_INDEX", "group_size_rank", "vocab_parallel_cross_entropy", "vocab_parallel_argmax",
           "vocab_parallel_sample"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row CE over vocab-sharded logits; collectives in forward only. Same memory recipe as
    :class:`megamlm.ops.cross_entropy.CrossEntropy`: forward reads the logits in row chunks (no [N, V/vp] temporary besides the
    saved reference to fp32 logits) and keeps the row log-sum-exp; backward writes
    exp(logits - lse) · g - onehot · g chunk by chunk, into the logits' storage when allowed.
    ``with_argmax``: also the global argmax id per row (ties to the smallest id, non-differentiable),
    from the row-max pass plus one all-reduce (as :func:`vocab_parallel_argmax`, without its passes)."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, group, ignore_index: int,
                inplace_backward: bool = False, with_argmax: bool = False):
        import torch.distributed as dist

        size, rank = group_size_rank(group)
        x = local_logits.float()  # [N, V/vp] fp32 (a copy unless already fp32); not written to in forward
        N, n_local = x.shape
        start = rank * n_local

        bmax = block_max(x)  # [N, nb]
        local_max = bmax.amax(dim=-1)  # [N]; -inf on a rank whose columns are all padding
        row_max = local_max.clone()  # [N] global after the all-reduce
        if size > 1:
            _all_reduce(row_max, dist.ReduceOp.MAX, group)
        sum_exp = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
        step = chunk_rows(x, n_local)
        for s in range(0, N, step):
            sum_exp[s:s + step] = torch.sub(x[s:s + step], row_max[s:s + step].unsqueeze(-1)).exp_().sum(dim=-1)

        valid = labels != ignore_index  # [N]
        local_label = labels - start  # [N]
        in_slice = valid & (local_label >= 0) & (local_label < n_local)  # [N]
        local_label = torch.where(in_slice, local_label, torch.zeros_like(local_label))  # [N]
        target = x.gather(1, local_label.unsqueeze(-1)).squeeze(-1)  # [N]
        target = torch.where(in_slice, target, torch.zeros_like(target))  # not `* in_slice`: -inf * 0 is nan
        if size > 1:
            _all_reduce(target, dist.ReduceOp.SUM, group)  # one rank holds each row's target
            _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        loss = torch.where(valid, torch.log(sum_exp) - (target - row_max), torch.zeros_like(target))  # [N]

        lse = torch.log(sum_exp).add_(row_max)  # [N] global log-sum-exp
        ctx.save_for_backward(x, lse, local_label, in_slice, valid)
        ctx.input_dtype = local_logits.dtype
        ctx.inplace = inplace_backward or x is not local_logits  # our own fp32 copy may always be reused
        ctx.n_inputs = len(ctx.needs_input_grad)  # 4 to 6: the flags are optional
        if not with_argmax:
            return loss
        # this slice's first maximum, as a global id; only slices holding the global max compete
        pred = first_argmax(x, bmax, local_max) + start  # [N]
        pred = torch.where(local_max == row_max, pred, torch.full_like(pred, torch.iinfo(torch.int64).max))
        if size > 1:
            _all_reduce(pred, dist.ReduceOp.MIN, group)  # smallest id among the slices' maxima
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        x, lse, local_label, in_slice, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == label_i] on this rank's columns: no collective.
        g = (grad_loss * valid).to(torch.float32)  # [N], 0 on ignored rows
        grad = x if ctx.inplace else torch.empty_like(x)  # [N, V/vp]
        softmax_minus_onehot(x, lse, g, local_label, grad, onehot_weight=in_slice)
        return (grad.to(ctx.input_dtype),) + (None,) * (ctx.n_inputs - 1)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, group=None,
                                 ignore_index: int = IGNORE_INDEX, inplace_backward: bool = False,
                                 with_argmax: bool = False, bias: torch.Tensor | None = None):
    """local_logits [N, V/vp] (any float dtype), labels [N] global ids → per-row fp32 loss [N]
    (0 where ``labels == ignore_index``); with ``with_argmax`` → (loss [N], argmax [N]): the global
    argmax id of each row, equal to :func:`vocab_parallel_argmax` (ties to the smallest id), found from
    the loss's own row-max pass, so accuracy costs no extra pass over the logits.

    The logits are never written in forward. ``inplace_backward=True`` lets the backward (single-rank
    or vocab-parallel) write the gradient into fp32 logits' storage (saves an [N, V/vp] buffer); only for
    logits that nothing reads after the loss, e.g. those the model makes for the loss alone. Columns
    set to −inf (padded vocabulary rows) get zero probability and zero gradient.

    ``bias`` [V] (single rank, fp32 scratch logits with ``inplace_backward``): the decoder's bias, added
    to the logits chunk by chunk inside the loss (instead of a broadcast copy into all N·V logits before
    it) with its gradient summed in the backward's chunk loop (instead of another pass over them)."""
    if local_logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != local_logits.shape[0]:
        raise ValueError(f"expected local_logits [N, V] and labels [N], got {tuple(local_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    size, _ = group_size_rank(group)
    if size == 1:
        return cross_entropy(local_logits, labels, ignore_index, inplace_backward, with_argmax, bias, kernels=True)
    if bias is not None:
        raise ValueError("vocab_parallel_cross_entropy: a separate bias is for the single-rank loss only")
    return _VocabParallelCrossEntropy.apply(local_logits, labels, group, ignore_index, inplace_backward,
                                            with_argmax)


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


@torch.no_grad()
def vocab_parallel_sample(local_logits: torch.Tensor, vocab_start: int, n_predicted: int, temperature: float,
                          group=None) -> torch.Tensor:
    """One id per row [N] (global ids below ``n_predicted``) drawn from softmax(logits / temperature) over the
    whole vocabulary, from this rank's slice ``local_logits`` [N, V/vp] (ids from ``vocab_start``): Gumbel-max
    per slice with the noise of the full real vocabulary (:mod:`megamlm.ops.sampling`: every rank draws the
    same [N, V_real] noise, as a single rank does), then the largest score over the group; ties go to the
    smallest id. Equal to :func:`megamlm.ops.sampling.gumbel_sample` on the gathered logits."""
    from megamlm.ops.sampling import gumbel_noise, gumbel_scores

    if not temperature > 0:
        raise ValueError(f"sampling temperature {temperature!r} must be > 0 (objective.sampling_temperature)")
    N, n_local = local_logits.shape
    noise = gumbel_noise(N, n_predicted, local_logits.device)  # [N, V_real]
    n = max(min(vocab_start + n_local, n_predicted) - vocab_start, 0)  # this slice's real columns
    scores = torch.full((N, n_local), float("-inf"), dtype=torch.float32, device=local_logits.device)
    if n:
        scores[:, :n] = gumbel_scores(local_logits[:, :n], None, temperature, noise[:, vocab_start:vocab_start + n])
    size, _ = group_size_rank(group)
    best, idx = scores.max(dim=-1)  # [N], [N]
    idx = idx + vocab_start
    if size == 1:
        return idx
    import torch.distributed as dist

    top = _all_reduce(best.clone(), dist.ReduceOp.MAX, group)  # [N]
    cand = torch.where(best == top, idx, torch.full_like(idx, torch.iinfo(torch.int64).max))
    return _all_reduce(cand, dist.ReduceOp.MIN, group)
