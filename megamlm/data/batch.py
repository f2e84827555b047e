"""The data → model seam: one micro-batch of pretraining examples, padded or packed.

The loader builds it on the host (no device syncs later): the masked positions are computed here, once,
so the model gathers those rows and runs the vocabulary projection on them alone.

Two layouts. **Padded**: B examples in the rows of [B, T] tensors, ``attention_mask`` False on padding.
**Packed** (``data.packing``): E examples back to back in one row, [1, N] tensors with no padding at
all; ``segments`` (:class:`megamlm.ops.Segments`) says where each example starts, ``attention_mask``
is None, and every example's [CLS] is its first token (``segments.cu_seqlens[:-1]``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megamlm.labels import IGNORE_INDEX  # noqa: E402,F401 (re-exported: the batch's label convention)
from megamlm.ops import Segments


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, after masking (packed: [1, N])
    token_type_ids: torch.Tensor  # [B, T] int64, 0 for segment A (and packed text), 1 for B
    attention_mask: torch.Tensor | None  # [B, T] bool, True on real tokens, False on padding (packed: None)
    mlm_labels: torch.Tensor  # [B, T] int64, the original id where predicted, IGNORE_INDEX elsewhere
    mlm_positions: torch.Tensor  # [N] int64, flat indices into B*T of the predicted positions (row-major)
    mlm_targets: torch.Tensor  # [N] int64, mlm_labels.view(-1)[mlm_positions]
    pair_labels: torch.Tensor | None = None  # [examples] int64 (NSP: 0 IsNext, 1 NotNext; SOP: 0 in order, 1 swapped)
    n_tokens: int = 0  # real (unpadded) tokens in the batch, for throughput accounting
    segments: Segments | None = None  # packed: the examples of the one row (None: padded)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, Segments):
                v = v.to(device, non_blocking=non_blocking)
            out[f.name] = v
        return Batch(**out)

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked host memory (CUDA only), so that ``to(cuda, non_blocking=True)`` is
        an asynchronous copy; the DataLoader's pinning thread calls it through :meth:`Packet.pin_memory`."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.pin_memory() if isinstance(v, (torch.Tensor, Segments)) else v
        return Batch(**out)

    @property
    def n_targets(self) -> int:
        return int(self.mlm_positions.numel())

    @property
    def n_examples(self) -> int:
        """Examples (sequences) in the batch: B padded, E packed (a host int)."""
        return self.segments.num_segments if self.segments is not None else int(self.input_ids.shape[0])

    def example_lengths(self) -> torch.Tensor:
        """[examples] int64: each example's real tokens (reads the mask or cu_seqlens: give it the host batch)."""
        if self.segments is not None:
            return self.segments.lengths()
        return self.attention_mask.sum(dim=1)

    def cls_index(self) -> torch.Tensor | None:
        """Packed: [E] int64, each example's [CLS] in the flat row; padded: None (column 0 of every row)."""
        return None if self.segments is None else self.segments.cu_seqlens[:-1].long()


def pack(batch: Batch) -> Batch:
    """The packed layout of a padded batch: its rows' real tokens back to back in one row [1, N], the
    same examples in the same order (their masks and labels kept), ``segments`` where each starts. Host
    tensors (it reads the mask); a packed batch is returned as it is."""
    if batch.segments is not None:
        return batch
    mask = batch.attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"pack: row {int(torch.nonzero(lengths == 0)[0])} of the batch has no real token")
    if not bool((mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all()):
        raise ValueError("pack: the batch is not right-padded (a real token after padding)")
    labels = batch.mlm_labels[mask][None]  # [1, N], row-major: examples in row order
    pos = torch.nonzero(labels[0] != IGNORE_INDEX).reshape(-1)
    return Batch(input_ids=batch.input_ids[mask][None], token_type_ids=batch.token_type_ids[mask][None],
                 attention_mask=None, mlm_labels=labels, mlm_positions=pos, mlm_targets=labels[0, pos],
                 pair_labels=batch.pair_labels, n_tokens=int(lengths.sum()),
                 segments=Segments.from_lengths(lengths.tolist()))
