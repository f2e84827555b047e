"""The data → model seam: one micro-batch of pretraining examples.

The loader builds it on the host (no device syncs later): the masked positions are computed here, once,
so the model gathers those rows and runs the vocabulary projection on them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megamlm.labels import IGNORE_INDEX  # noqa: E402,F401 (re-exported: the batch's label convention)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, after masking
    token_type_ids: torch.Tensor  # [B, T] int64, 0 for segment A (and packed text), 1 for B
    attention_mask: torch.Tensor  # [B, T] bool, True on real tokens, False on padding
    mlm_labels: torch.Tensor  # [B, T] int64, the original id where predicted, IGNORE_INDEX elsewhere
    mlm_positions: torch.Tensor  # [N] int64, flat indices into B*T of the predicted positions (row-major)
    mlm_targets: torch.Tensor  # [N] int64, mlm_labels.view(-1)[mlm_positions]
    pair_labels: torch.Tensor | None = None  # [B] int64 (NSP: 0 IsNext, 1 NotNext; SOP: 0 in order, 1 swapped)
    n_tokens: int = 0  # real (unpadded) tokens in the batch, for throughput accounting

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**out)

    @property
    def n_targets(self) -> int:
        return int(self.mlm_positions.numel())
