"""Heads on the encoder's hidden states: masked-LM (tied decoder, masked rows only) and sentence pair.

The MLM head gathers the masked rows *first* — ``hidden.view(B*T, H).index_select(0, positions)`` with
positions computed on the host by the loader — and projects only those [N, H] → [N, V]: HF computes
all B×T rows (transformers#3294), ~6× more vocabulary FLOPs at 15% masking.

The decoder weight is the word-embedding ``Parameter`` itself (tied: same storage), held by a small
module so that ZeRO-3 gathers it when the decoder runs. Rows ≥ ``n_predicted`` (padding added to make
the vocabulary a multiple of 128) are never projected, hence never predicted nor given probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm.model.encoder import activation_fn, init_bert_weights

__all__ = ["TiedDecoder", "MLMHead", "PairHead"]


class TiedDecoder(nn.Module):
    """[N, H] → [N, n_predicted] with the (tied) word-embedding weight [V, H] and its own bias [V]."""

    def __init__(self, weight: nn.Parameter, n_predicted: int | None = None):
        super().__init__()
        vocab = weight.shape[0]
        n_predicted = vocab if n_predicted is None else n_predicted
        if not 0 < n_predicted <= vocab:
            raise ValueError(f"real vocabulary size {n_predicted} must be in [1, {vocab}] (the embedding rows)")
        self.weight = weight  # the word embedding's Parameter: same storage
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.n_predicted = n_predicted

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.n_predicted == self.weight.shape[0]:
            return F.linear(h, self.weight, self.bias)  # [N, V]
        n = self.n_predicted
        return F.linear(h, self.weight[:n], self.bias[:n])  # [N, V_real]: contiguous row slices, no copy


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → tied decoder, on the masked rows only."""

    def __init__(self, hidden: int, eps: float, activation: str, word_embedding: nn.Parameter,
                 n_predicted: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation_fn(activation)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        init_bert_weights(self, init_std)
        self.decoder = TiedDecoder(word_embedding, n_predicted)  # after init: never re-initialise the tie

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], positions [N] flat indices into B*T → logits [N, V_real]."""
        H = hidden.shape[-1]
        rows = hidden.reshape(-1, H).index_select(0, positions)  # [N, H]
        return self.decoder(self.norm(self.act(self.dense(rows))))  # [N, V_real]


class PairHead(nn.Module):
    """tanh pooler on [CLS] → 2 classes (NSP: is-next / not-next; SOP: in order / swapped)."""

    def __init__(self, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)
        init_bert_weights(self, init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] → logits [B, 2]."""
        pooled = torch.tanh(self.pooler(hidden[:, 0]))  # [B, H]
        return self.classifier(pooled)  # [B, 2]
