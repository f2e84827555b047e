"""Vocab-parallel collectives and layers: the word embedding and the tied decoder split along the vocabulary.

Each rank of a vocab-parallel group of size vp holds the contiguous rows ``[r * V/vp, (r + 1) * V/vp)`` of
the (padded) vocabulary. Everything else in the model is replicated over the group, and the ranks of a
group see the same batch, so the hidden states are the same on each of them.

Collectives (Megatron ``core/tensor_parallel/mappings.py`` style: tiny autograd Functions, a public
snake_case wrapper, the group always explicit, a size-1 group — or ``None`` — returns the input)::

    copy_to_vocab_parallel_region(x, group)      forward identity,   backward all-reduce (sum)
    reduce_from_vocab_parallel_region(x, group)  forward all-reduce, backward identity

:class:`VocabParallelEmbedding`: ids outside the rank's rows look up zero; the reduce completes the
lookup; its backward needs no collective (each rank gets the full output gradient and scatters it into
its own rows).

:class:`VocabParallelDecoder`: [N, H] → local logits [N, V/vp] with the (tied) local embedding rows and
the local bias. Its input goes through the copy: the replicated layers below must receive the gradient
of *all* vocabulary columns, each rank only computes that of its own. Padded rows (ids ≥ the real
vocabulary size) are set to −inf in the logits: exactly zero probability, never the argmax, zero
gradient — the same numbers as the single-rank decoder, which slices to the real rows.

Parameters sharded here carry ``tensor_model_parallel = True`` (and Megatron's ``partition_dim = 0``,
``partition_stride = 1``): DeepSpeed then counts the replicated ones once in the gradient norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.parallel.groups import group_size_rank
from megamlm.parallel.vocab import vocab_parallel_cross_entropy, vocab_parallel_sample

__all__ = ["copy_to_vocab_parallel_region", "reduce_from_vocab_parallel_region", "mark_vocab_parallel",
           "vocab_range", "mask_padded_columns_", "VocabParallelEmbedding", "VocabParallelDecoder",
           "VOCAB_SHARDED_PARAMS", "VOCAB_TIED_PARAMS", "parallelize_vocab", "vocab_parallel_layout"]


def _all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    out = x.clone(memory_format=torch.contiguous_format)  # never write the caller's tensor
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _CopyToVocabParallelRegion(torch.autograd.Function):
    """Forward identity; backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce_sum(grad, ctx.group), None


class _ReduceFromVocabParallelRegion(torch.autograd.Function):
    """Forward sums over the group; backward identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_vocab_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """x replicated over ``group`` → the same x; its gradient is summed over the group in backward."""
    if group_size_rank(group)[0] == 1:
        return x
    return _CopyToVocabParallelRegion.apply(x, group)


def reduce_from_vocab_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums over ``group`` → their sum (a new tensor); the gradient passes through unchanged."""
    if group_size_rank(group)[0] == 1:
        return x
    return _ReduceFromVocabParallelRegion.apply(x, group)


def mark_vocab_parallel(p: nn.Parameter) -> nn.Parameter:
    """Tag a vocab-sharded parameter for DeepSpeed (``is_model_parallel_parameter``) and Megatron tools."""
    p.tensor_model_parallel = True
    p.partition_dim = 0
    p.partition_stride = 1
    return p


def vocab_range(vocab_size: int, group) -> tuple[int, int]:
    """[start, end) of this rank's rows of a ``vocab_size``-row vocabulary split over ``group``."""
    size, rank = group_size_rank(group)
    if vocab_size % size:
        raise ValueError(f"the vocabulary ({vocab_size} rows) is not divisible by the vocab-parallel size {size}")
    rows = vocab_size // size
    return rank * rows, (rank + 1) * rows


def mask_padded_columns_(local_logits: torch.Tensor, vocab_start: int, real_vocab_size: int) -> torch.Tensor:
    """Set the columns of global ids ≥ ``real_vocab_size`` to −inf, in place (autograd-safe on a fresh
    tensor: their gradient becomes 0). local_logits [N, V/vp] holds ids from ``vocab_start``."""
    n_real = min(max(real_vocab_size - vocab_start, 0), local_logits.shape[-1])
    if n_real < local_logits.shape[-1]:
        local_logits[:, n_real:] = float("-inf")
    return local_logits


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)`` whose rows are split over ``group``; this rank
    holds ``weight`` [V/vp, H] for ids ``[vocab_start, vocab_end)``. Same output as the full table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings  # the global (padded) vocabulary: what the encoder checks ids against
        self.embedding_dim = embedding_dim
        self.group = group
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, group)
        rows = self.vocab_end - self.vocab_start
        if weight is None:
            weight = torch.empty(rows, embedding_dim)
            nn.init.normal_(weight)
        if tuple(weight.shape) != (rows, embedding_dim):
            raise ValueError(f"weight has shape {tuple(weight.shape)}; this rank holds [{rows}, {embedding_dim}]")
        self.weight = nn.Parameter(weight)
        if group_size_rank(group)[0] > 1:
            mark_vocab_parallel(self.weight)

    @classmethod
    def from_full(cls, full_weight: torch.Tensor, group) -> "VocabParallelEmbedding":
        """This rank's rows of a full [V, H] table (identical on every rank: same seed)."""
        V, H = full_weight.shape
        s, e = vocab_range(V, group)
        emb = cls(V, H, group, full_weight.detach()[s:e].clone())
        emb.weight.requires_grad_(full_weight.requires_grad)
        return emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size_rank(self.group)[0] == 1:
            return F.embedding(input_ids, self.weight)  # [..., H]
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [...]
        local = torch.where(outside, torch.zeros_like(input_ids), input_ids - self.vocab_start)  # [...]
        out = F.embedding(local, self.weight)  # [..., H]; its backward needs the ids only
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # [..., H] partial: the rows this rank holds
        return reduce_from_vocab_parallel_region(out, self.group)  # [..., H]

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"vocab-parallel size {group_size_rank(self.group)[0]}")


class VocabParallelDecoder(nn.Module):
    """[N, H] → local logits [N, V/vp] with the tied local embedding rows ``weight`` [V/vp, H] and the local
    ``bias`` [V/vp]; columns of ids ≥ ``n_predicted`` (vocabulary padding) are −inf. The counterpart of
    :class:`megamlm.model.heads.TiedDecoder` (same attribute names, so the same parameter names)."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor, n_predicted: int, vocab_start: int, group):
        super().__init__()
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias {tuple(bias.shape)} does not match the local weight {tuple(weight.shape)}")
        self.weight = weight  # the VocabParallelEmbedding's Parameter: same storage
        self.bias = nn.Parameter(bias)  # [V/vp]
        self.n_predicted = n_predicted  # the real (global) vocabulary size
        self.vocab_start = vocab_start
        self.group = group
        if group_size_rank(group)[0] > 1:
            mark_vocab_parallel(self.bias)

    @classmethod
    def tied_to(cls, embedding: VocabParallelEmbedding, full_bias: torch.Tensor,
                n_predicted: int) -> "VocabParallelDecoder":
        """Tied to ``embedding`` (its rows and group), keeping this rank's slice of the full bias [V]."""
        s, e = embedding.vocab_start, embedding.vocab_end
        dec = cls(embedding.weight, full_bias.detach()[s:e].clone(), n_predicted, s, embedding.group)
        dec.bias.requires_grad_(full_bias.requires_grad)
        return dec

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, temperature: float | None = None):
        """h [N, H] → local logits [N, V/vp]; with ``labels`` [N] (global ids) → their vocab-parallel training
        loss, as by :class:`~megamlm.model.heads.TiedDecoder`: (per-row loss fp32 [N], global argmax [N]); with
        ``temperature`` too, the ids sampled over the whole vocabulary [N] as a third value
        (:func:`~megamlm.parallel.vocab.vocab_parallel_sample`)."""
        h = copy_to_vocab_parallel_region(h, self.group)  # [N, H]; backward: sum over the vocabulary slices
        logits = F.linear(h, self.weight, self.bias)  # [N, V/vp]
        logits = mask_padded_columns_(logits, self.vocab_start, self.n_predicted)  # [N, V/vp]
        if labels is None:
            return logits
        drawn = None
        if temperature is not None:  # before the loss, whose backward may reuse the logits' storage
            drawn = vocab_parallel_sample(logits.detach(), self.vocab_start, self.n_predicted, temperature, self.group)
        per_row, pred = vocab_parallel_cross_entropy(logits, labels, self.group, inplace_backward=True,
                                                     with_argmax=True)
        return (per_row, pred) if drawn is None else (per_row, pred, drawn)

    def extra_repr(self) -> str:
        return (f"local rows {tuple(self.weight.shape)} from id {self.vocab_start}, real vocabulary "
                f"{self.n_predicted}")


# ---------------------------------------------------------------------------------------------------------
# Applying vocabulary parallelism to a finished model

#: Tensors of the pretraining model split along the vocabulary: name → dim; concatenated in vp-rank order
#: they give the padded [V, H] / [V]. Every other tensor is replicated over the vocab-parallel group.
VOCAB_SHARDED_PARAMS: dict[str, int] = {"encoder.embeddings.word_embeddings.weight": 0,
                                        "mlm_head.decoder.bias": 0,
                                        "generator.mlm_head.decoder.bias": 0}  # ELECTRA's decoder
#: Tied aliases (not tensors of their own): rebuild them from their source after merging, as for t=1.
#: In a checkpoint ``mlm_head.decoder.weight`` appears as each rank's [V/vp, H] embedding rows in the stage
#: 0–2 ``module`` dict, and DeepSpeed records the tie in ``shared_params`` on global rank 0's file only.
VOCAB_TIED_PARAMS: dict[str, str] = {"mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight",
                                     "generator.mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}


def parallelize_vocab(model, topology):
    """Split a finished :class:`megamlm.model.pretraining.PretrainingModel` (or ELECTRA model: its generator's
    decoder, ``model.mlm_head``) along the vocabulary, in place.

    The word embedding becomes a :class:`~megamlm.parallel.layers.VocabParallelEmbedding` holding this
    rank's rows of the full, identically seeded table (so every vocab-parallel size starts from the same
    weights); the MLM decoder becomes a :class:`~megamlm.parallel.layers.VocabParallelDecoder` tied to it
    with this rank's slice of the bias (its training loss is the vocab-parallel cross-entropy over the
    group); both are tagged ``tensor_model_parallel``; ``model.vocab_group`` is set. With ``topology.vp_size == 1`` the model
    is returned unchanged. Call it before the engine wraps the model. Returns the model.
    """
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
