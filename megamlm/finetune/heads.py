"""Classification heads on the encoder and the fine-tuning model that joins them.

* sequence: y = softmax(h_CLS W_C), W_C ∈ R^{d×K} (with ``pooler``: h_CLS → tanh(h_CLS W_p + b_p) first,
  as HF ``BertForSequenceClassification``);
* pair, ``joint``: the sequence head on [CLS] A [SEP] B [SEP]; ``concat``: A and B encoded apart,
  h_pair = concat(h_CLS(A), h_CLS(B)), y = softmax(h_pair W_P), W_P ∈ R^{2d×K};
* token: y_i = softmax(h_i W_K) per position; labels −100 where nothing is predicted (non-first
  pieces, [CLS], [SEP], padding).

Losses are returned as (sum, count): the caller divides once by the step's global count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model.encoder import Dropout, Encoder, init_bert_weights
from megamlm.ops import Segments

from megamlm.labels import IGNORE_INDEX  # noqa: E402

__all__ = ["IGNORE_INDEX", "ClsHead", "TokenHead", "FinetuneModel", "FtBatch", "Output", "loss_terms"]


@dataclass
class FtBatch:
    """input_ids / token_type_ids / attention_mask [B, T]; labels [B] (sequence, pair) or [B, T] (token);
    for pair ``concat`` the second text's tensors in ``*_b``.

    Packed (``train.packing``): the E examples back to back in one row [1, N] (token labels [1, N]),
    ``attention_mask`` None and ``segments`` where each starts (its [CLS]); ``*_b`` alike with
    ``segments_b``."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    input_ids_b: torch.Tensor | None = None
    token_type_ids_b: torch.Tensor | None = None
    attention_mask_b: torch.Tensor | None = None
    segments: Segments | None = None
    segments_b: Segments | None = None

    def to(self, device) -> "FtBatch":
        return FtBatch(*[None if t is None else t.to(device) for t in (
            self.input_ids, self.token_type_ids, self.attention_mask, self.labels, self.input_ids_b,
            self.token_type_ids_b, self.attention_mask_b, self.segments, self.segments_b)])

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Output:
    loss_sum: torch.Tensor  # scalar: sum of the per-target cross-entropies
    n_targets: torch.Tensor  # scalar: targets counted in loss_sum
    logits: torch.Tensor  # [B, K] or [B, T, K]


def loss_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the labelled rows (labels != −100) and their count."""
    K = logits.shape[-1]
    flat, y = logits.reshape(-1, K).float(), labels.reshape(-1)  # [N, K], [N]
    loss = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


class ClsHead(nn.Module):
    """[CLS] vector(s) → K logits. ``n_inputs`` = 1 (sequence, pair joint) or 2 (pair concat: W_P ∈ R^{2d×K})."""

    def __init__(self, hidden: int, num_labels: int, n_inputs: int = 1, pooler: bool = True, dropout: float = 0.1,
                 init_std: float = 0.02):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden) if pooler else None
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(n_inputs * hidden, num_labels)
        init_bert_weights(self, init_std)

    def pool(self, hidden: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """h_CLS of each example: column 0 of each row, or of a packed row [1, N, H] at ``cls`` [E]."""
        h = hidden[:, 0] if cls is None else hidden[0].index_select(0, cls)  # [B, H]: h_CLS
        return torch.tanh(self.pooler(h)) if self.pooler is not None else h  # [B, H]

    def forward(self, *hiddens: torch.Tensor, cls: tuple | None = None) -> torch.Tensor:
        """hidden [B, T, H] (one, or two for concat) → logits [B, K]; packed: ``cls`` the [CLS] indices
        of each hidden (see :meth:`pool`)."""
        cls = cls or (None,) * len(hiddens)
        h = torch.cat([self.pool(x, c) for x, c in zip(hiddens, cls)], dim=-1)  # [B, n_inputs * H]
        return self.classifier(self.dropout(h))  # [B, K]


class TokenHead(nn.Module):
    """hidden [B, T, H] → logits [B, T, K]."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, init_std: float = 0.02):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)
        init_bert_weights(self, init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))  # [B, T, K]


class FinetuneModel(nn.Module):
    """Encoder + one head; ``forward(batch)`` → :class:`Output` (loss sum, count, logits)."""

    def __init__(self, encoder: Encoder, task_type: str, num_labels: int, pair_mode: str = "joint",
                 pooler: bool = True, dropout: float = 0.1, init_std: float = 0.02):
        super().__init__()
        if task_type not in ("sequence", "pair", "token"):
            raise ValueError(f"task.type={task_type!r}; choose sequence, pair or token")
        if num_labels < 2:
            raise ValueError(f"a classification task needs >= 2 labels, got {num_labels}")
        self.encoder = encoder
        self.task_type = task_type
        self.concat = task_type == "pair" and pair_mode == "concat"
        H = encoder.hidden_size
        if task_type == "token":
            self.head = TokenHead(H, num_labels, dropout, init_std)
        else:
            self.head = ClsHead(H, num_labels, 2 if self.concat else 1, pooler, dropout, init_std)

    def freeze_encoder(self) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @property
    def encoder_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.encoder.parameters())

    def _encode(self, ids, types, mask, segments=None) -> torch.Tensor:
        if self.encoder_frozen and self.training:
            # frozen: no graph through the encoder, and no dropout in it (its weights are fixed features)
            was = self.encoder.training
            self.encoder.eval()
            with torch.no_grad():
                h = self.encoder(ids, types, mask, segments=segments)
            self.encoder.train(was)
            return h
        return self.encoder(ids, types, mask, segments=segments)  # [B, T, H] (packed: [1, N, H])

    def logits(self, b: FtBatch) -> torch.Tensor:
        """[B, K] (sequence, pair; packed: [E, K]) or [B, T, K] (token; packed: [1, N, K])."""
        h = self._encode(b.input_ids, b.token_type_ids, b.attention_mask, b.segments)  # [B, T, H]
        cls = None if b.segments is None else (b.segments.cu_seqlens[:-1].long(),)
        if self.concat:
            hb = self._encode(b.input_ids_b, b.token_type_ids_b, b.attention_mask_b, b.segments_b)  # [B, T_b, H]
            if cls is not None:
                cls = cls + (b.segments_b.cu_seqlens[:-1].long(),)
            return self.head(h, hb, cls=cls)  # [B, K]
        if self.task_type == "token":
            return self.head(h)  # [B, T, K]
        return self.head(h, cls=cls)  # [B, K]

    def forward(self, b: FtBatch) -> Output:
        logits = self.logits(b)
        loss, n = loss_terms(logits, b.labels)
        return Output(loss, n, logits)


def param_groups(model: FinetuneModel, encoder_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: encoder and head at their own learning rates, each split into decay (matrices) and
    no-decay (biases, LayerNorm); frozen parameters are left out."""
    groups = []
    for module, lr in ((model.encoder, encoder_lr), (model.head, head_lr)):
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd})
    return groups
