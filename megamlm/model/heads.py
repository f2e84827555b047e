"""Heads on the encoder's hidden states: masked-LM (tied decoder, masked rows only) and sentence pair.

The MLM head gathers the masked rows *first* — ``hidden.view(B*T, H).index_select(0, positions)`` with
positions computed on the host by the loader — and projects only those [N, H] → [N, V]: HF computes
all B×T rows (transformers#3294), ~6× more vocabulary FLOPs at 15% masking.

The decoder weight is the word-embedding ``Parameter`` itself (tied: same storage), held by a small
module so that ZeRO-3 gathers it when the decoder runs; its training loss is the backend's
``decoder_cross_entropy`` (:mod:`megamlm.ops`), called inside that module's call. Rows ≥ ``n_predicted`` (padding added to make
the vocabulary a multiple of 128) are never projected, hence never predicted nor given probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamlm import ops as ops_layer
from megamlm.model.encoder import activation_fn, init_bert_weights
from megamlm.ops.sampling import gumbel_sample

__all__ = ["TiedDecoder", "MLMHead", "PairHead"]


class TiedDecoder(nn.Module):
    """[N, H] → [N, n_predicted] with the (tied) word-embedding weight [V, H] and its own bias [V].

    ``decoder(h)``: the logits. ``decoder(h, labels)``: the training loss of those logits, per row, with
    the row argmax (the backend's ``decoder_cross_entropy``: it may never materialise the logits as a
    fresh tensor, add the bias inside the loss and hand the tied weight's gradient to the lookup)."""

    ops = ops_layer.DEFAULT

    def __init__(self, weight: nn.Parameter, n_predicted: int | None = None):
        super().__init__()
        vocab = weight.shape[0]
        n_predicted = vocab if n_predicted is None else n_predicted
        if not 0 < n_predicted <= vocab:
            raise ValueError(f"real vocabulary size {n_predicted} must be in [1, {vocab}] (the embedding rows)")
        self.weight = weight  # the word embedding's Parameter: same storage
        weight.tied_decoder = True  # for the backend: a lookup of it may take this decoder's gradient
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.n_predicted = n_predicted

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, temperature: float | None = None):
        """h [N, H] → logits [N, V_real]; with ``labels`` [N] → (per-row loss fp32 [N], argmax [N]); with a
        ``temperature`` too, a third value: one id per row [N] sampled from softmax(logits / temperature)
        (Gumbel-max in fp32, :mod:`megamlm.ops.sampling`; from the loss's own logits, no gradient)."""
        if labels is not None and temperature is not None:
            drawn = []
            peek = lambda logits, bias: drawn.append(gumbel_sample(logits, bias, temperature))  # noqa: E731
            per_row, pred = self.ops.decoder_cross_entropy(h, self.weight, self.bias, self.n_predicted, labels,
                                                           peek=peek)
            return per_row, pred, drawn[0]
        if labels is not None:
            return self.ops.decoder_cross_entropy(h, self.weight, self.bias, self.n_predicted, labels)
        n = self.n_predicted
        w, b = (self.weight, self.bias) if n == self.weight.shape[0] else (self.weight[:n], self.bias[:n])
        return F.linear(h, w, b)  # [N, V_real]: contiguous row slices, no copy


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → tied decoder, on the masked rows only. ``in_features``: the width of
    the hidden states it reads when it differs from the embeddings' ``hidden`` (the ELECTRA generator's)."""

    def __init__(self, hidden: int, eps: float, activation: str, word_embedding: nn.Parameter,
                 n_predicted: int | None = None, init_std: float = 0.02, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or hidden, hidden)
        self.act = activation_fn(activation)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        init_bert_weights(self, init_std)
        self.decoder = TiedDecoder(word_embedding, n_predicted)  # after init: never re-initialise the tie

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None = None,
                temperature: float | None = None):
        """hidden [B, T, H], positions [N] flat indices into B*T → logits [N, V_real]; with ``labels`` [N]
        the decoder's training loss instead: (per-row loss fp32 [N], argmax [N]), and with ``temperature``
        the ids sampled per row [N] as a third value (:meth:`TiedDecoder.forward`)."""
        H = hidden.shape[-1]
        rows = hidden.reshape(-1, H).index_select(0, positions)  # [N, H]
        h = self.norm(self.act(self.dense(rows)))  # [N, H]
        if labels is None:
            return self.decoder(h)
        return self.decoder(h, labels) if temperature is None else self.decoder(h, labels, temperature)


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
