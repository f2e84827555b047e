"""What the pretraining model's forward returns: :class:`LossTerms`, sums and counts per objective (never a
mean: the trainer divides by the step's global counts with :func:`megamlm.objectives.combine`), and the
ways of making them: :func:`row_terms` from a per-row loss and argmax, :func:`pair_terms` from NSP / SOP
logits, :func:`disc_terms` from ELECTRA's per-token discriminator logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megamlm.ops import IGNORE_INDEX

__all__ = ["LossTerms", "row_terms", "pair_terms", "disc_terms", "metrics_from_sums"]


@dataclass
class LossTerms:
    """Sums for one or more micro-batches, keyed by objective (``"mlm"``, ``"pair"``).

    loss_sum: fp32 scalars carrying the graph; n_targets and n_correct: int64 scalars, no graph.
    ``a + b`` sums term by term (micro-batch accumulation); :meth:`detach` drops the graph.
    """

    loss_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    n_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    n_correct: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # further int64 counts, summed like the rest

    def add(self, name: str, loss_sum: torch.Tensor, n_targets: torch.Tensor, n_correct: torch.Tensor,
            **counts: torch.Tensor) -> None:
        """One objective's sums; ``counts``: further counts of it, kept as ``<name>_<key>``."""
        self.loss_sum[name] = loss_sum
        self.n_targets[name] = n_targets
        self.n_correct[name] = n_correct
        self.counts.update({f"{name}_{k}": v for k, v in counts.items()})

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
        out.counts = {k: v + other.counts[k] for k, v in self.counts.items()}
        return out

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def detach(self) -> "LossTerms":
        out = LossTerms()
        for k in self.loss_sum:
            out.add(k, self.loss_sum[k].detach(), self.n_targets[k], self.n_correct[k])
        out.counts = dict(self.counts)
        return out

    def flat(self) -> tuple[list[str], list[torch.Tensor]]:
        """(names, fp32 0-d tensors): every sum and count, in a fixed order, for one all-reduce of them all;
        :func:`metrics_from_sums` reads the reduced values back."""
        names, values = [], []
        for k in sorted(self.loss_sum):
            names += [f"{k}_loss_sum", f"{k}_targets", f"{k}_correct"]
            values += [self.loss_sum[k].detach(), self.n_targets[k], self.n_correct[k]]
        for k in sorted(self.counts):
            names.append(k)
            values.append(self.counts[k])
        return names, [v.float().reshape(()) for v in values]

    def metrics(self) -> dict[str, torch.Tensor]:
        """Mean loss and accuracy per objective as 0-d tensors (``mlm_loss``, ``mlm_accuracy``, ...) and the
        ratios of their further counts (:func:`metrics_from_sums`); for a step, first sum the terms (and
        all-reduce them over data-parallel ranks)."""
        names, values = self.flat()
        return metrics_from_sums(dict(zip(names, values)))

    def to_floats(self) -> dict[str, float]:
        """:meth:`metrics` (with the target counts) as Python numbers (one host sync; for logging)."""
        return {k: float(v) for k, v in self.metrics().items()}


def metrics_from_sums(sums: dict) -> dict:
    """Means from the sums of :meth:`LossTerms.flat` (tensors or floats): per objective ``<k>_loss``,
    ``<k>_accuracy`` and ``<k>_targets``; for the discriminator also ``disc_precision`` and ``disc_recall``
    on replaced tokens and ``replaced_share`` (of its targets, the real tokens, those the generator changed)."""
    out = {}
    for key in [k[: -len("_loss_sum")] for k in sums if k.endswith("_loss_sum")]:
        n = sums[f"{key}_targets"]
        d = n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1.0)
        out[f"{key}_loss"] = sums[f"{key}_loss_sum"] / d
        out[f"{key}_accuracy"] = sums[f"{key}_correct"] / d
        out[f"{key}_targets"] = n
    if "disc_replaced" in sums:
        replaced, flagged, caught = sums["disc_replaced"], sums["disc_flagged"], sums["disc_caught"]
        ratio = lambda a, b: a / (b.clamp(min=1) if isinstance(b, torch.Tensor) else max(b, 1.0))  # noqa: E731
        out["disc_precision"] = ratio(caught, flagged)
        out["disc_recall"] = ratio(caught, replaced)
        out["replaced_share"] = ratio(replaced, sums["disc_targets"])
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


def disc_terms(logits: torch.Tensor, replaced: torch.Tensor, real: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ELECTRA's discriminator: logits [B, T] (replaced vs original), ``replaced`` [B, T] bool (the generator
    changed the token), ``real`` [B, T] bool (True on real tokens; None: every token is real) → (BCE sum
    fp32 over the real tokens, their number, correct predictions, {replaced, flagged, caught}: replaced
    real tokens, real tokens predicted replaced, and both), padding counted nowhere."""
    per_tok = F.binary_cross_entropy_with_logits(logits.float(), replaced.to(torch.float32), reduction="none")
    with torch.no_grad():
        flagged = logits.detach() > 0
        if real is None:
            n = torch.tensor(replaced.numel(), dtype=torch.int64, device=logits.device)
        else:
            n, flagged, replaced = real.sum(), flagged & real, replaced & real
        correct = n - (flagged ^ replaced).sum()
        counts = {"replaced": replaced.sum(), "flagged": flagged.sum(), "caught": (flagged & replaced).sum()}
    loss = per_tok.sum() if real is None else per_tok.masked_fill(~real, 0.0).sum()
    return loss, n, correct, counts
