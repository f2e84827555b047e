"""Pretraining objectives → :class:`LossTerms`; :func:`combine` turns summed terms into the loss.

The loss says what it divides by. Each objective returns *sums* (loss summed over its targets, the
number of targets, the number predicted correctly), never a mean: a micro-batch does not know how
many targets the whole optimizer step has. The trainer sums ``n_targets`` over all micro-batches of
the step and over the data-parallel group (megamlm/ARCHITECTURE.md, seam 6) and calls :func:`combine` with those
global counts, so that the step's gradient is that of

    total = sum_mlm / N_mlm_global + pair_loss_weight * sum_pair / N_pair_global

(ELECTRA: ``gen_weight * sum_mlm / N_mlm_global + disc_weight * sum_disc / N_real_tokens_global``;
:func:`weighted_sum` with :func:`objective_weights` and :func:`step_denominators` is the general form.)

whatever the micro-batch split or the number of ranks. Everything stays a tensor: no host sync in
the forward / loss path (``LossTerms.to_floats`` syncs, for logging only).

Cross-entropy goes through :func:`megamlm.parallel.vocab.vocab_parallel_cross_entropy` (fp32,
per row); with a vocab-parallel group the MLM logits are the rank's vocabulary slice.
"""

from __future__ import annotations

import torch

from megamlm.model.terms import LossTerms, pair_terms, row_terms
from megamlm.parallel.vocab import IGNORE_INDEX, vocab_parallel_cross_entropy

__all__ = ["LossTerms", "mlm_terms", "pair_terms", "combine", "weighted_sum", "objective_weights",
           "step_denominators", "batch_denominators"]


def mlm_terms(logits: torch.Tensor, targets: torch.Tensor, group=None, ignore_index: int = IGNORE_INDEX,
              logits_are_scratch: bool = False, bias: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (or the rank's slice [N, V/t] with ``group``) at the masked rows, targets [N] →
    (loss sum fp32, number of targets int64, number correct int64). Rows labelled ``ignore_index``
    count nowhere. Accuracy is argmax == target (ties to the smallest id), the argmax coming from the
    cross-entropy's row-max pass. ``logits_are_scratch``: nothing else reads the logits after this
    call, so the backward may reuse their storage. ``bias``: the decoder's bias when the logits come
    without it (single rank, scratch logits: the loss adds it chunk by chunk)."""
    per_row, pred = vocab_parallel_cross_entropy(logits, targets, group, ignore_index,
                                                 inplace_backward=logits_are_scratch,
                                                 with_argmax=True, bias=bias)  # [N] fp32, [N]
    return row_terms(per_row, pred, targets, ignore_index)


def objective_weights(objective_cfg) -> dict[str, float]:
    """The weight of each loss term in the total, from the objective's config: ``mlm`` (ELECTRA: the
    generator's, ``gen_weight``), ``pair`` (``pair_loss_weight``), ``disc`` (ELECTRA, ``disc_weight``)."""
    o = objective_cfg
    electra = getattr(o, "name", "mlm") == "electra"
    return {"mlm": o.gen_weight if electra else 1.0, "pair": o.pair_loss_weight, "disc": o.disc_weight}


def step_denominators(targets, pairs, tokens) -> dict:
    """What each loss term divides by, from the step's global counts: the MLM targets, the pair examples, and
    for the ELECTRA discriminator the real tokens."""
    return {"mlm": targets, "pair": pairs, "disc": tokens}


def batch_denominators(batches) -> dict:
    """:func:`step_denominators` of host batches alone (one process, no all-reduce): the sums of their
    MLM targets, pair examples and real tokens."""
    return step_denominators(sum(b.n_targets for b in batches),
                             sum(b.n_examples for b in batches if b.pair_labels is not None),
                             sum(b.n_tokens for b in batches))


def weighted_sum(terms: LossTerms, denominators: dict, weights: dict | None = None) -> torch.Tensor:
    """``Σ_k weights[k] · loss_sum[k] / denominators[k]`` over the terms ``terms`` holds (a missing weight is
    1); the denominators are the step's global counts (ints, or tensors already all-reduced; clamped to
    ≥ 1), as :func:`combine` explains."""
    total = None
    for name in terms.loss_sum:
        denom = denominators.get(name)
        if denom is None:
            raise ValueError(f"LossTerms has a {name!r} term but no {name}_denominator was given")
        if isinstance(denom, torch.Tensor):
            denom = denom.to(torch.float32).clamp(min=1)
        else:
            denom = float(max(denom, 1))
        term = terms.loss_sum[name] / denom
        w = (weights or {}).get(name, 1.0)
        if w != 1.0:
            term = term * w
        total = term if total is None else total + term
    if total is None:
        raise ValueError("LossTerms is empty: no objective to combine")
    return total


def combine(terms: LossTerms, mlm_denominator, pair_denominator=None,
            pair_loss_weight: float = 1.0) -> torch.Tensor:
    """The loss to back-propagate for these terms:
    ``loss_sum["mlm"] / mlm_denominator + pair_loss_weight * loss_sum["pair"] / pair_denominator``.

    Denominators are the *global* counts of the optimizer step: ``n_targets`` summed over all its
    micro-batches and all data-parallel ranks (ints, or tensors already all-reduced; clamped to ≥ 1).
    Called per micro-batch with the step's counts, the micro-batch losses add up to the step's mean
    loss, so summing gradients over micro-batches and ranks gives the gradient of the step's loss.
    Note: engines that *average* gradients over ranks and micro-batches (DeepSpeed divides by the
    data-parallel size and by gradient_accumulation_steps) need the result multiplied by
    ``dp_size * grad_accum_steps`` to keep that meaning; that is the engine's business.
    With the local counts of a single micro-batch this is the per-batch mean, the number HF reports.
    """
    return weighted_sum(terms, {"mlm": mlm_denominator, "pair": pair_denominator}, {"pair": pair_loss_weight})

