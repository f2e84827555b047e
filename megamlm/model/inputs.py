"""What the pretraining models check and derive from a batch before the encoder runs: the examples it
holds, whether it needs its attention mask, whether its fields fit the model (shared by
:mod:`megamlm.model.pretraining` and :mod:`megamlm.model.electra`)."""

from __future__ import annotations

import torch

from megamlm import ops as ops_layer

__all__ = ["examples_in", "attention_mask_or_none", "check_batch"]


def examples_in(batch) -> int:
    segments = getattr(batch, "segments", None)
    return segments.num_segments if segments is not None else int(batch.input_ids.shape[0])


def attention_mask_or_none(batch) -> torch.Tensor | None:
    """The batch's [B, T] mask, or None when it certainly has no padding (then SDPA runs unmasked).

    Decided without a device sync: ``batch.n_tokens == B*T`` (the loader's host count of real tokens),
    or for a CPU mask by reading it (cheap, no device; not under torch.compile). Otherwise the mask is
    passed (always correct)."""
    mask = batch.attention_mask
    if mask is None:
        return None
    if getattr(batch, "n_tokens", 0) and batch.n_tokens == batch.input_ids.numel():
        return None
    if ops_layer.host_readable(mask) and bool(mask.all()):
        return None
    return mask


def check_batch(model, batch) -> None:
    """ValueError naming the field for a batch the model cannot take: shapes, the pair labels its pair head
    needs, masked positions and targets in range (read on CPU tensors, or with ``check_inputs``)."""
    ids = batch.input_ids
    pos, tgt = batch.mlm_positions, batch.mlm_targets
    if pos.dim() != 1 or tgt.shape != pos.shape:
        raise ValueError(f"mlm_positions {tuple(pos.shape)} and mlm_targets {tuple(tgt.shape)} must be "
                         f"two [N] vectors")
    if model.pair_head is not None:
        if batch.pair_labels is None:
            raise ValueError(f"objective.pair={model.pair!r} but the batch has no pair_labels")
        n = examples_in(batch)
        if batch.pair_labels.shape != (n,):
            raise ValueError(f"pair_labels has shape {tuple(batch.pair_labels.shape)}; expected "
                             f"[{n}] (one per example)")
    check_values = ops_layer.host_readable(pos) or (model.encoder.check_inputs and not torch.compiler.is_compiling())
    if check_values and pos.numel():
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= ids.numel():
            raise ValueError(f"mlm_positions holds {hi if hi >= ids.numel() else lo}, outside the "
                             f"flattened batch [0, {ids.numel()})")
        valid = tgt[tgt != ops_layer.IGNORE_INDEX]
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            n = model.real_vocab_size
            if lo < 0 or hi >= n:
                raise ValueError(f"MLM target id {hi if hi >= n else lo} is outside the real vocabulary "
                                 f"[0, {n}) (padded rows are never targets)")

