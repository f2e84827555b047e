"""The pretraining model (like HF ``BertForPreTraining``): encoder + MLM head + optional pair head.

``forward(batch)`` returns :class:`megamlm.model.terms.LossTerms` (sums and counts, never a mean: the
trainer divides once by the step's global counts with :func:`megamlm.objectives.combine`); the MLM term
is the decoder's own training loss (the backend's ``decoder_cross_entropy``, or the vocab-parallel
decoder's). ``logits(batch)`` returns the MLM logits at the masked rows and the pair logits, for parity
tests and evaluation.

No host sync on the way: masked positions come from the loader; whether the batch is padded is read
from ``batch.n_tokens`` (a host int) or, for CPU tensors, from the mask itself.
"""

from __future__ import annotations

import torch
from torch import nn

from megamlm.model.electra import build_electra
from megamlm.model.encoder import Encoder
from megamlm.model.heads import MLMHead, PairHead
from megamlm.model.inputs import attention_mask_or_none, check_batch
from megamlm.model.terms import LossTerms, pair_terms, row_terms

__all__ = ["PretrainingModel", "build_model", "attention_mask_or_none", "weight_decay_groups"]


class PretrainingModel(nn.Module):
    """Encoder + MLM head (tied) + pair head (``pair`` = "nsp" / "sop"; none for "none").

    ``real_vocab_size``: ids below it are real pieces; rows from there to the embedding size are
    vocabulary padding, never predicted. ``vocab_group``: the vocab-parallel process group, None
    unless a parallelize function sets it (with the decoder it swaps in).
    """

    def __init__(self, encoder: Encoder, pair: str = "nsp", real_vocab_size: int | None = None,
                 layer_norm_eps: float = 1e-12, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        if pair not in ("nsp", "sop", "none"):
            raise ValueError(f"objective.pair={pair!r}; choose 'nsp', 'sop' or 'none'")
        self.encoder = encoder
        self.pair = pair
        H = encoder.hidden_size
        self.mlm_head = MLMHead(H, layer_norm_eps, activation, encoder.embeddings.word_embeddings.weight,
                                real_vocab_size, init_std)
        self.pair_head = PairHead(H, init_std) if pair != "none" else None
        self.vocab_group = None

    @property
    def real_vocab_size(self) -> int:
        return self.mlm_head.decoder.n_predicted

    def hidden(self, batch) -> torch.Tensor:
        """Encoder output [B, T, H] for a :class:`megamlm.data.batch.Batch` ([1, N, H] packed)."""
        segments = getattr(batch, "segments", None)
        if segments is not None:
            return self.encoder(batch.input_ids, batch.token_type_ids, segments=segments)
        return self.encoder(batch.input_ids, batch.token_type_ids, attention_mask_or_none(batch))

    def pair_logits(self, h: torch.Tensor, batch) -> torch.Tensor:
        """The pair head on each example's [CLS]: logits [examples, 2] (packed: at ``cu_seqlens[:-1]``)."""
        segments = getattr(batch, "segments", None)
        if segments is not None:
            h = h[0].index_select(0, segments.cu_seqlens[:-1].long()).unsqueeze(1)  # [E, 1, H]
        return self.pair_head(h)

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(MLM logits [N, V_real] at ``batch.mlm_positions``, pair logits [B, 2] or None)."""
        check_batch(self, batch)
        h = self.hidden(batch)  # [B, T, H]
        mlm = self.mlm_head(h, batch.mlm_positions)  # [N, V_real]
        pair = self.pair_logits(h, batch) if self.pair_head is not None else None  # [examples, 2]
        return mlm, pair

    def forward(self, batch) -> LossTerms:
        check_batch(self, batch)
        h = self.hidden(batch)  # [B, T, H]
        per_row, pred = self.mlm_head(h, batch.mlm_positions, labels=batch.mlm_targets)  # [N] fp32, [N]
        terms = LossTerms()
        terms.add("mlm", *row_terms(per_row, pred, batch.mlm_targets))
        if self.pair_head is not None:
            terms.add("pair", *pair_terms(self.pair_logits(h, batch), batch.pair_labels))  # logits [examples, 2]
        return terms


def build_model(model_cfg, objective_cfg, vocab_size: int, real_vocab_size: int | None = None,
                check_inputs: bool = False):
    """The pretraining model from its config sections: a :class:`PretrainingModel`, or for
    ``objective.name: electra`` an :class:`megamlm.model.electra.ElectraModel`.

    vocab_size: the tokenizer's padded vocabulary size (used when ``model_cfg.vocab_size`` is 0);
    real_vocab_size: the tokenizer's real piece count (None = every row is real);
    check_inputs: check id ranges on accelerator inputs too (a host sync per batch; CPU inputs are
    always checked).
    """
    rows = model_cfg.vocab_size or vocab_size
    if rows < 1:
        raise ValueError(f"vocabulary size {rows} must be >= 1 (model.vocab_size or the tokenizer's)")
    if real_vocab_size is not None and real_vocab_size > rows:
        raise ValueError(f"the tokenizer has {real_vocab_size} pieces but the model only {rows} embedding rows "
                         f"(model.vocab_size={model_cfg.vocab_size})")
    if getattr(objective_cfg, "name", "mlm") == "electra":
        return build_electra(model_cfg, objective_cfg, rows, real_vocab_size, check_inputs)
    encoder = Encoder.from_config(model_cfg, rows, check_inputs=check_inputs)
    return PretrainingModel(encoder, objective_cfg.pair, real_vocab_size, model_cfg.layer_norm_eps,
                            model_cfg.activation, model_cfg.init_std)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: decay on matrices (linear and embedding weights), none on biases
    and LayerNorm parameters (every 1-d tensor). Tied parameters appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
