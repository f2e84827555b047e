"""Sampling from a softmax by the Gumbel-max trick, in fp32: the ELECTRA generator's replacements.

``argmax_j (logits_j / T + g_j)``, with ``g_j = -log(-log u_j)`` and ``u_j ~ U[0, 1)`` drawn from torch's
global generator (so a checkpoint's RNG states make a resume draw the same samples), is a sample of
``softmax(logits / T)``; multiplied by T it is ``argmax_j (logits_j + T g_j)``, which needs no division of the
logits. The noise is drawn for the full real vocabulary [N, V_real] whichever part of it a rank holds, so a
vocabulary split over ranks (:func:`megamlm.parallel.vocab.vocab_parallel_sample`) takes the same noise per
id and samples exactly what one rank would.
"""

from __future__ import annotations

import torch

__all__ = ["gumbel_noise", "gumbel_scores", "gumbel_sample"]


def gumbel_noise(rows: int, cols: int, device) -> torch.Tensor:
    """Standard Gumbel noise [rows, cols] fp32 (u = 0 gives -inf: never chosen; torch.rand never gives 1)."""
    g = torch.rand(rows, cols, dtype=torch.float32, device=device)
    return g.log_().neg_().log_().neg_()


def gumbel_scores(logits: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                  noise: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (+ bias [V]) + temperature x noise [N, V] in fp32, a fresh tensor (the logits are untouched)."""
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()
    if bias is not None:
        z += bias.float()
    return z.add_(noise, alpha=float(temperature))


def gumbel_sample(logits: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """One id per row [N] int64, drawn from softmax((logits + bias) / temperature) over the V columns."""
    if not temperature > 0:
        raise ValueError(f"sampling temperature {temperature!r} must be > 0 (objective.sampling_temperature)")
    N, V = logits.shape
    return gumbel_scores(logits, bias, temperature, gumbel_noise(N, V, logits.device)).argmax(dim=-1)
