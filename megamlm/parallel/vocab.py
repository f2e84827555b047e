"""Vocabulary parallelism: cross-entropy and argmax over logits split along the vocabulary, and
:func:`parallelize_vocab`, which splits a finished model's embedding and tied decoder (the layers and
collectives it swaps in live in :mod:`megamlm.parallel.layers`).

Each rank of a vocab-parallel group holds the logits of a contiguous slice of the vocabulary,
``local_logits [N, V/t]`` for ids ``[rank * V/t, (rank + 1) * V/t)``; every rank holds the same labels.

``group=None`` means *no vocabulary parallelism* (not the default world group): the plain fp32
log-softmax path (``_CrossEntropy``: row-chunked, equal to ``F.cross_entropy`` in fp32). A group of
size 1 short-circuits to the same path.

The recipe (Megatron ``tensor_parallel/cross_entropy.py``): compute in fp32; all-reduce the row max,
the sum of exponentials and the target logit over the group; the backward needs no collective
(softmax minus the one-hot of the target, on the local slice). Both paths read the logits in row
chunks and keep only the row log-sum-exp, so the peak is the logits themselves plus their gradient
(or just the logits, with ``inplace_backward``): per rank [N, V/t]. ``ignore_index`` rows give loss 0 and
gradient 0. The caller's logits are never mutated (unless ``inplace_backward``, then in backward only).
The output is per row: the objective chooses the reduction. Columns of padded vocabulary rows arrive as −inf (the vocab-parallel decoder masks them):
they get exactly zero probability and zero gradient, so the result equals the single-rank one over the
real rows only.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "VOCAB_SHARDED_PARAMS", "VOCAB_TIED_PARAMS", "group_size_rank",
           "vocab_parallel_cross_entropy", "vocab_parallel_argmax", "parallelize_vocab", "vocab_parallel_layout"]


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
_BLOCK = 128  # columns per block of the row-max pass (:func:`_block_max`)


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """x [c, V] → the max of each block of ``_BLOCK`` columns [c, ceil(V / _BLOCK)] (last block shorter).
    As fast as the plain row max (one vectorised pass); its max is the row max, and it locates the
    row's first maximum cheaply (:func:`_first_argmax`)."""
    c, V = x.shape
    full = V // _BLOCK * _BLOCK
    out = torch.empty(c, -(-V // _BLOCK), dtype=x.dtype, device=x.device)  # [c, nb]
    if full:
        torch.amax(x[:, :full].unflatten(1, (-1, _BLOCK)), dim=-1, out=out[:, :full // _BLOCK])
    if full < V:
        out[:, -1] = x[:, full:].amax(dim=-1)
    return out


def _first_argmax(x: torch.Tensor, block_max: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """The first column holding ``row_max`` in each row of x [N, V] — ``x.argmax(-1)`` (ties to the smallest
    id) for ``row_max`` the row max — from :func:`_block_max`'s [N, nb] without another pass over x: the
    first block whose max is the row max, then the first match among that block's ``_BLOCK`` columns
    (gathered, [N, _BLOCK]). Rows where nothing equals ``row_max`` (a NaN) give an arbitrary id."""
    N, V = x.shape
    hit = block_max == row_max.unsqueeze(-1)  # [N, nb]
    block = hit.to(torch.uint8).argmax(dim=-1)  # [N] first block holding the max (argmax: first of ties)
    cols = (block.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=x.device)).clamp_(max=V - 1)  # [N, B]
    offset = (x.gather(1, cols) == row_max.unsqueeze(-1)).to(torch.uint8).argmax(dim=-1)  # [N]
    return block * _BLOCK + offset  # clamped repeats of column V-1 come after it: never first


class _CrossEntropy(torch.autograd.Function):
    """Single-rank fp32 cross-entropy per row, in row chunks so that no [N, V] temporary is allocated
    besides the gradient: forward saves the logits (a reference when already fp32) and the row
    log-sum-exp; backward writes exp(logits - lse) · g - onehot · g chunk by chunk. Same result as
    ``F.cross_entropy(logits.float(), labels, reduction="none")`` with ~half its passes over [N, V].
    With ``with_argmax`` it also returns the row argmax (non-differentiable), found from the row-max
    pass (:func:`_first_argmax`) instead of a separate ``argmax``, which is ~10× slower on CPU."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool,
                with_argmax: bool = False, bias: torch.Tensor | None = None):
        x = logits.float()  # [N, V]; not written to in forward (but for ``bias`` on the torch path)
        N, V = x.shape
        if bias is not None and not (inplace_backward and x is logits):
            raise ValueError("a bias for the cross-entropy needs fp32 scratch logits (inplace_backward=True)")
        ctx.input_dtype = logits.dtype
        ctx.inplace = inplace_backward or x is not logits  # our own fp32 copy may always be reused
        ctx.n_inputs = len(ctx.needs_input_grad)  # 4 to 6: with_argmax and bias are optional
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]
        ctx.ignore_index = ignore_index
        ctx.kernel = _ce_kernel(x, labels)
        if ctx.kernel:
            from megamlm.model import cpu_kernels
  # one read-only pass per row (max, then log-sum-exp and argmax), bias added on the fly
            labels = labels.contiguous()
            loss, lse, pred = cpu_kernels.cross_entropy_forward(x, bias, labels, ignore_index)
            # the bias' values as of now: under ZeRO-3 its parameter is released (emptied) after the decoder's
            # call, and this loss runs outside that call; a detached alias keeps the values for the backward
            ctx.save_for_backward(x, lse, labels, labels != ignore_index, None if bias is None else bias.detach())
        else:
            if bias is not None:
                x = x.detach()  # written in place below; the caller's logits are scratch (read by nothing else)
            step = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
            lse = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
            block_max = torch.empty(N, -(-V // _BLOCK), dtype=torch.float32, device=x.device)  # [N, nb]
            for s in range(0, N, step):
                xc = x[s:s + step]  # [c, V]
                if bias is not None:  # the decoder's bias, added here while the chunk is in cache
                    xc.add_(bias)
                block_max[s:s + step] = _block_max(xc)
                m = block_max[s:s + step].amax(dim=-1, keepdim=True)  # [c, 1] row max
                lse[s:s + step] = torch.sub(xc, m).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))
            valid = labels != ignore_index  # [N]
            safe = torch.where(valid, labels, torch.zeros_like(labels))  # [N]
            target = x.gather(1, safe.unsqueeze(-1)).squeeze(-1)  # [N]
            loss = torch.where(valid, lse - target, torch.zeros_like(lse))  # [N]
            ctx.save_for_backward(x, lse, safe, valid, None)
            pred = _first_argmax(x, block_max, block_max.amax(dim=-1)) if with_argmax else None  # [N]
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
            from megamlm.model import cpu_kernels
            grad, grad_bias = cpu_kernels.cross_entropy_backward(x, bias, lse, g, safe, ctx.ignore_index, out=grad,
                                                                 bias_grad=ctx.bias_grad)
        else:
            step = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
            grad_bias = torch.zeros(V, dtype=torch.float32, device=x.device) if ctx.bias_grad else None
            for s in range(0, N, step):
                e = s + step
                torch.sub(x[s:e], lse[s:e].unsqueeze(-1), out=grad[s:e]).exp_().mul_(g[s:e].unsqueeze(-1))
                if grad_bias is not None:  # column sums while the chunk is in cache
                    grad_bias += grad[s:e].sum(0)
            grad[torch.arange(N, device=x.device), safe] -= g  # softmax - onehot, scaled
            if grad_bias is not None:
                grad_bias.index_add_(0, safe, -g)  # the onehot part of the column sums
        out = (grad.to(ctx.input_dtype),) + (None,) * (ctx.n_inputs - 1)
        if ctx.n_inputs == 6:
            out = out[:5] + (grad_bias,)
        return out


def _ce_kernel(x: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the single-rank loss takes the compiled CPU kernel (float32 CPU logits, int64 labels)."""
    from megamlm.model import cpu_kernels  # (not at the top: megamlm.model imports the objectives, which import us)

    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and labels.dtype == torch.int64
            and not torch.compiler.is_compiling() and cpu_kernels.available())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row CE over vocab-sharded logits; collectives in forward only. Same memory recipe as
    :class:`_CrossEntropy`: forward reads the logits in row chunks (no [N, V/t] temporary besides the
    saved reference to fp32 logits) and keeps the row log-sum-exp; backward writes
    exp(logits - lse) · g - onehot · g chunk by chunk, into the logits' storage when allowed.
    ``with_argmax``: also the global argmax id per row (ties to the smallest id, non-differentiable),
    from the row-max pass plus one all-reduce (as :func:`vocab_parallel_argmax`, without its passes)."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, labels: torch.Tensor, group, ignore_index: int,
                inplace_backward: bool = False, with_argmax: bool = False):
        import torch.distributed as dist

        size, rank = group_size_rank(group)
        x = local_logits.float()  # [N, V/t] fp32 (a copy unless already fp32); not written to in forward
        N, n_local = x.shape
        start = rank * n_local

        block_max = _block_max(x)  # [N, nb]
        local_max = block_max.amax(dim=-1)  # [N]; -inf on a rank whose columns are all padding
        row_max = local_max.clone()  # [N] global after the all-reduce
        if size > 1:
            _all_reduce(row_max, dist.ReduceOp.MAX, group)
        sum_exp = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
        step = max(1, _CHUNK_BYTES // (4 * max(n_local, 1)))
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
        pred = _first_argmax(x, block_max, local_max) + start  # [N]
        pred = torch.where(local_max == row_max, pred, torch.full_like(pred, torch.iinfo(torch.int64).max))
        if size > 1:
            _all_reduce(pred, dist.ReduceOp.MIN, group)  # smallest id among the slices' maxima
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_):
        x, lse, local_label, in_slice, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == label_i] on this rank's columns: no collective.
        N, n_local = x.shape
        g = (grad_loss * valid).to(torch.float32)  # [N], 0 on ignored rows
        grad = x if ctx.inplace else torch.empty_like(x)  # [N, V/t]
        step = max(1, _CHUNK_BYTES // (4 * max(n_local, 1)))
        for s in range(0, N, step):
            e = s + step
            torch.sub(x[s:e], lse[s:e].unsqueeze(-1), out=grad[s:e]).exp_().mul_(g[s:e].unsqueeze(-1))
        grad[torch.arange(N, device=x.device), local_label] -= g * in_slice
        return (grad.to(ctx.input_dtype),) + (None,) * (ctx.n_inputs - 1)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, group=None,
                                 ignore_index: int = IGNORE_INDEX, inplace_backward: bool = False,
                                 with_argmax: bool = False, bias: torch.Tensor | None = None):
    """local_logits [N, V/t] (any float dtype), labels [N] global ids → per-row fp32 loss [N]
    (0 where ``labels == ignore_index``); with ``with_argmax`` → (loss [N], argmax [N]): the global
    argmax id of each row, equal to :func:`vocab_parallel_argmax` (ties to the smallest id), found from
    the loss's own row-max pass, so accuracy costs no extra pass over the logits.

    The logits are never written in forward. ``inplace_backward=True`` lets the backward (single-rank
    or vocab-parallel) write the gradient into fp32 logits' storage (saves an [N, V/t] buffer); only for
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
        if bias is not None:
            return _CrossEntropy.apply(local_logits, labels, ignore_index, inplace_backward, with_argmax, bias)
        return _CrossEntropy.apply(local_logits, labels, ignore_index, inplace_backward, with_argmax)
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


# ---------------------------------------------------------------------------------------------------------
# Applying vocabulary parallelism to a finished model

#: Tensors of the pretraining model split along the vocabulary: name → dim; concatenated in vp-rank order
#: they give the padded [V, H] / [V]. Every other tensor is replicated over the vocab-parallel group.
VOCAB_SHARDED_PARAMS: dict[str, int] = {"encoder.embeddings.word_embeddings.weight": 0,
                                        "mlm_head.decoder.bias": 0}
#: Tied aliases (not tensors of their own): rebuild them from their source after merging, as for t=1.
#: In a checkpoint ``mlm_head.decoder.weight`` appears as each rank's [V/t, H] embedding rows in the stage
#: 0–2 ``module`` dict, and DeepSpeed records the tie in ``shared_params`` on global rank 0's file only.
VOCAB_TIED_PARAMS: dict[str, str] = {"mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}


def parallelize_vocab(model, topology):
    """Split a finished :class:`megamlm.model.pretraining.PretrainingModel` along the vocabulary, in place.

    The word embedding becomes a :class:`~megamlm.parallel.layers.VocabParallelEmbedding` holding this
    rank's rows of the full, identically seeded table (so every vocab-parallel size starts from the same
    weights); the MLM decoder becomes a :class:`~megamlm.parallel.layers.VocabParallelDecoder` tied to it
    with this rank's slice of the bias; both are tagged ``tensor_model_parallel``; ``model.vocab_group``
    is set so the objective's cross-entropy runs over the group. With ``topology.vp_size == 1`` the model
    is returned unchanged. Call it before the engine wraps the model. Returns the model.
    """
    from megamlm.parallel.layers import VocabParallelDecoder, VocabParallelEmbedding

    if topology.vp_size == 1:
        return model
    group = topology.vp_group
    size, rank = group_size_rank(group)
    if (size, rank) != (topology.vp_size, topology.vp_rank):
        raise ValueError(f"topology says vocab-parallel rank {topology.vp_rank} of {topology.vp_size}, its "
                         f"vp_group says {rank} of {size}")
    emb = model.encoder.embeddings.word_embeddings
    dec = model.mlm_head.decoder
    if isinstance(emb, VocabParallelEmbedding):
        raise ValueError("the model is already vocab-parallel")
    if dec.weight is not emb.weight:
        raise ValueError("the MLM decoder is not tied to the word embedding; parallelize_vocab expects the tie")
    new_emb = VocabParallelEmbedding.from_full(emb.weight, group)
    model.encoder.embeddings.word_embeddings = new_emb
    model.mlm_head.decoder = VocabParallelDecoder.tied_to(new_emb, dec.bias, dec.n_predicted)
    model.vocab_group = group
    return model


def vocab_parallel_layout(model, vp_size: int) -> dict:
    """What a checkpoint's ``vocab_parallel.json`` says: the split of the vocabulary-sharded tensors.

    Concatenating each ``sharded`` tensor of the ``mp_rank_XX_model_states.pt`` files along its dim in
    vp-rank order gives the padded [V, H] / [V]; every other tensor is replicated (tied aliases, see
    :data:`VOCAB_TIED_PARAMS`, follow their source)."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {"vocab_parallel_size": int(vp_size),
            "padded_vocab_size": int(model.encoder.vocab_size),
            "real_vocab_size": int(model.real_vocab_size),
            "sharded": {n: d for n, d in VOCAB_SHARDED_PARAMS.items() if n in names}}
