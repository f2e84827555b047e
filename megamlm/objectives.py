"""Pretraining objectives → :class:`LossTerms`; :func:`combine` turns summed terms into the loss.

The loss says what it divides by. Each objective returns *sums* (loss summed over its targets, the
number of targets, the number predicted correctly), never a mean: a micro-batch does not know how
many targets the whole optimizer step has. The trainer sums ``n_targets`` over all micro-batches of
the step and over the data-parallel group (DESIGN.md seam 6) and calls :func:`combine` with those
global counts, so that the step's gradient is that of

    total = sum_mlm / N_mlm_global + pair_loss_weight * sum_pair / N_pair_global

whatever the micro-batch split or the number of ranks. Everything stays a tensor: no host sync in
the forward / loss path (``LossTerms.to_floats`` syncs, for logging only).

Cross-entropy goes through :func:`megamlm.parallel.vocab.vocab_parallel_cross_entropy` (fp32,
per row); with a vocab-parallel group the MLM logits are the rank's vocabulary slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megamlm.parallel.vocab import IGNORE_INDEX, vocab_parallel_cross_entropy

__all__ = ["LossTerms", "mlm_terms", "pair_terms", "combine"]


@dataclass
class LossTerms:
    """Sums for one or more micro-batches, keyed by objective (``"mlm"``, ``"pair"``).

    loss_sum: fp32 scalars carrying the graph; n_targets and n_correct: int64 scalars, no graph.
    ``a + b`` sums term by term (micro-batch accumulation); :meth:`detach` drops the graph.
    """

    loss_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    n_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    n_correct: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, loss_sum: torch.Tensor, n_targets: torch.Tensor, n_correct: torch.Tensor) -> None:
        self.loss_sum[name] = loss_sum
        self.n_targets[name] = n_targets
        self.n_correct[name] = n_correct

    def __add__(self, other: "LossTerms") -> "LossTerms":
        if not isinstance(other, LossTerms):
            return NotImplemented
        if set(self.loss_sum) != set(other.loss_sum):
            raise ValueError(f"cannot add LossTerms with objectives {sorted(self.loss_sum)} and "
                             f"{sorted(other.loss_sum)}")
        out = LossTerms()
        for k in self.loss_sum:
            out.add(k, self.loss_sum[k] + other.loss_sum[k], self.n_targets[k] + other.n_targets[k],
                    self.n_correct[k] + other.n_correct[k])
        return out

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def detach(self) -> "LossTerms":
        out = LossTerms()
        for k in self.loss_sum:
            out.add(k, self.loss_sum[k].detach(), self.n_targets[k], self.n_correct[k])
        return out

    def metrics(self) -> dict[str, torch.Tensor]:
        """Mean loss and accuracy per objective as 0-d tensors (``mlm_loss``, ``mlm_accuracy``, ...);
        for a step, first sum the terms (and all-reduce them over data-parallel ranks)."""
        out = {}
        for k in self.loss_sum:
            n = self.n_targets[k].clamp(min=1).to(torch.float32)
            out[f"{k}_loss"] = self.loss_sum[k].detach().float() / n
            out[f"{k}_accuracy"] = self.n_correct[k].to(torch.float32) / n
        return out

    def to_floats(self) -> dict[str, float]:
        """:meth:`metrics` plus the counts as Python numbers (one host sync; for logging)."""
        out = {k: float(v) for k, v in self.metrics().items()}
        out.update({f"{k}_targets": float(v) for k, v in self.n_targets.items()})
        return out


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
    valid = targets != ignore_index  # [N]
    with torch.no_grad():
        correct = ((pred == targets) & valid).sum()
    return per_row.sum(), valid.sum(), correct


def pair_terms(logits: torch.Tensor, labels: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NSP / SOP: logits [B, 2], labels [B] → (loss sum fp32, number of labelled pairs, number correct)."""
    per_row = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")  # [B]
    valid = labels != ignore_index  # [B]
    with torch.no_grad():
        correct = ((logits.detach().argmax(dim=-1) == labels) & valid).sum()
    return per_row.sum(), valid.sum(), correct


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
    total = None
    for name, denom, w in (("mlm", mlm_denominator, 1.0), ("pair", pair_denominator, pair_loss_weight)):
        if name not in terms.loss_sum:
            continue
        if denom is None:
            raise ValueError(f"LossTerms has a {name!r} term but no {name}_denominator was given")
        if isinstance(denom, torch.Tensor):
            denom = denom.to(torch.float32).clamp(min=1)
        else:
            denom = float(max(denom, 1))
        part = terms.loss_sum[name] / denom
        if w != 1.0:
            part = part * w
        total = part if total is None else total + part
    if total is None:
        raise ValueError("LossTerms is empty: no objective to combine")
    return total

