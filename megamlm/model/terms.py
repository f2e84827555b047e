"""What the pretraining model's forward returns: :class:`LossTerms`, sums and counts per objective (never a
mean: the trainer divides by the step's global counts with :func:`megamlm.objectives.combine`), and the
two ways of making them: :func:`row_terms` from a per-row loss and argmax, :func:`pair_terms` from
NSP / SOP logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megamlm.ops import IGNORE_INDEX

__all__ = ["LossTerms", "row_terms", "pair_terms"]


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


def row_terms(per_row: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor,
              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """per-row loss [N] (0 on ignored rows), row argmax [N], targets [N] → (loss sum fp32, number of
    targets int64, number correct int64). Rows labelled ``ignore_index`` count nowhere."""
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
