"""FLOP and peak accounting: the needed FLOPs of a training step and the device's measured matmul peak,
the two halves of MFU. Used by the trainer (``train/mfu``), ``megamlm pretrain`` (the peak) and
``megamlm bench`` alike; below the trainer in the stack (it imports torch only).

Needed FLOPs (:func:`train_flops`) are 3 × the forward matmul FLOPs (backward = 2 × forward):

    per layer, per real token:  2·(3H·H + H·H + 2·H·F)   (qkv, out, up, down)
    per layer, per sequence:    4·L²·H                   (QKᵀ and A·V over the L real tokens)
    per masked row:             2·H·H + 2·H·V_real        (MLM transform, decoder)
    per sequence (pair head):   2·H·H + 2·H·2             (pooler, classifier)

Embedding lookups, norms, activations and softmax count 0; padding counts 0 (it is not needed work),
nor does a vocabulary projection of unmasked rows. The peak (:func:`matmul_peak`) is the best rate of
a large square matmul in the training dtype, timed on the device the run trains on.
"""

from __future__ import annotations

import time

import torch

__all__ = ["train_flops", "matmul_peak", "sync"]


def train_flops(batch, hidden: int, num_layers: int, ffn: int, real_vocab: int, pair: bool) -> float:
    """Needed training FLOPs of one step on ``batch`` (formula in the module docstring), padded or
    packed (a sequence is an example). Reads the batch's attention mask or its segments: give it the
    host batch (on a device tensor it is a sync)."""
    H, F = hidden, ffn
    segments = getattr(batch, "segments", None)
    if segments is not None:
        lengths = segments.lengths().double()  # [E]
    else:
        lengths = batch.attention_mask.sum(dim=1).double()  # [B]
    n_tok = float(lengths.sum())
    n_masked = float(batch.mlm_positions.numel())
    fwd = num_layers * (n_tok * 2 * (4 * H * H + 2 * H * F) + float((4 * lengths ** 2 * H).sum()))
    fwd += n_masked * (2 * H * H + 2 * H * real_vocab)
    if pair:
        fwd += lengths.numel() * (2 * H * H + 4 * H)
    return 3.0 * fwd


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), before reading a clock."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 6, device: str = "cpu") -> float:
    """Best FLOP/s of an n×n×n matmul in ``dtype`` (the denominator of MFU)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 2):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
