"""ELECTRA (Clark et al. 2020): replaced-token detection. A small generator fills the masked positions; the
main encoder, the discriminator, classifies every real token as original or replaced.

The step, on one :class:`megamlm.data.batch.Batch` (the loader's masking: ELECTRA's 85% [MASK] / 15% kept by
default, any masking scheme):

1. the generator reads the masked input: the discriminator's embeddings (token, position and segment tables,
   LayerNorm: shared), a projection to its width where the widths differ, its blocks, an MLM head back to
   the embedding width and the decoder tied to the word embedding, on the masked rows only → the MLM loss
   terms, and one id per masked row sampled from its softmax (Gumbel-max in fp32, ``temperature``; from the
   loss's own logits, no gradient through the sample);
2. the corrupted input: the masked positions hold the samples (a sample equal to the original counts as
   original);
3. the discriminator (``encoder``, the network kept for fine-tuning) reads it, and its head gives one logit
   per token → the BCE terms over every real token ([CLS] and [SEP] included, padding never).

The loss is ``gen_weight · mlm_sum / N_masked + disc_weight · disc_sum / N_real`` with the step's global
counts (:func:`megamlm.objectives.weighted_sum`). The layout of the parameters is Hugging Face's
``ElectraForMaskedLM`` (generator, with ``embedding_size`` the discriminator's width) and
``ElectraForPreTraining`` (discriminator) sharing one embedding module.
"""

from __future__ import annotations

import torch
from torch import nn

from megamlm.model.encoder import Encoder, activation_fn, init_bert_weights
from megamlm.model.heads import MLMHead
from megamlm.model.inputs import attention_mask_or_none, check_batch
from megamlm.model.terms import LossTerms, disc_terms, row_terms
from megamlm.ops import IGNORE_INDEX

__all__ = ["Generator", "DiscriminatorHead", "ElectraModel", "corrupt"]


class Generator(nn.Module):
    """The small masked-LM encoder on the shared embeddings: ``project`` (embedding width → its width, absent
    when they are equal), ``encoder`` (its blocks, no embeddings of its own), ``mlm_head`` (dense back to the
    embedding width, GELU, LayerNorm, the tied decoder: Hugging Face's generator head)."""

    def __init__(self, embed_width: int, width: int, num_layers: int, num_heads: int, ffn: int, model_cfg,
                 word_embedding: nn.Parameter, n_predicted: int | None):
        super().__init__()
        m = model_cfg
        self.project = nn.Linear(embed_width, width) if width != embed_width else None
        self.encoder = Encoder(1, width, num_layers, num_heads, ffn, m.max_position_embeddings, m.type_vocab_size,
                               m.dropout, m.attention_dropout, m.layer_norm_eps, m.norm_position, m.activation,
                               m.init_std, embeddings=False)
        if self.project is not None:
            init_bert_weights(self.project, m.init_std)
        self.mlm_head = MLMHead(embed_width, m.layer_norm_eps, "gelu", word_embedding, n_predicted, m.init_std,
                                in_features=width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, segments=None) -> torch.Tensor:
        """Embedded inputs x [B, T, E] → the generator's hidden states [B, T, width]."""
        if self.project is not None:
            x = self.project(x)
        return self.encoder.run_layers(x, attn_mask, segments)


class DiscriminatorHead(nn.Module):
    """dense → activation → one logit per token (replaced vs original): Hugging Face's
    ``ElectraDiscriminatorPredictions``."""

    def __init__(self, hidden: int, activation: str, init_std: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation_fn(activation)
        self.dense_prediction = nn.Linear(hidden, 1)
        init_bert_weights(self, init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] → logits [B, T]."""
        return self.dense_prediction(self.act(self.dense(hidden))).squeeze(-1)


def corrupt(input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, sampled: torch.Tensor):
    """The discriminator's input and labels: (ids [B, T] with the sampled ids at the masked ``positions`` (flat
    into B·T; rows whose target is ``IGNORE_INDEX`` keep their id), replaced [B, T] bool: the id differs from
    the original)."""
    valid = targets != IGNORE_INDEX  # [N]
    flat = input_ids.reshape(-1)
    fill = torch.where(valid, sampled, flat.index_select(0, positions))  # [N]
    ids = flat.index_copy(0, positions, fill).view_as(input_ids)  # [B, T]
    replaced = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    replaced.index_copy_(0, positions, valid & (sampled != targets))
    return ids, replaced.view_as(input_ids)


class ElectraModel(nn.Module):
    """Generator + discriminator (``encoder``, the main encoder) + discriminator head; ``forward(batch)`` →
    :class:`LossTerms` with the terms ``mlm`` (the generator's, over the masked positions) and ``disc`` (over
    every real token, with the counts behind precision and recall). ``pair_head`` is None: ELECTRA has no
    sentence-pair task."""

    pair = "none"
    pair_head = None

    def __init__(self, encoder: Encoder, generator: Generator, activation: str = "gelu", init_std: float = 0.02,
                 temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"objective.sampling_temperature={temperature!r} must be > 0")
        self.encoder = encoder
        self.generator = generator
        self.disc_head = DiscriminatorHead(encoder.hidden_size, activation, init_std)
        self.temperature = float(temperature)
        self.vocab_group = None

    @property
    def mlm_head(self) -> MLMHead:
        """The generator's MLM head (where the tied decoder lives, as in :class:`PretrainingModel`)."""
        return self.generator.mlm_head

    @property
    def real_vocab_size(self) -> int:
        return self.generator.mlm_head.decoder.n_predicted

    def _generate(self, batch):
        """The generator on the masked input → (per-row loss [N], argmax [N], sampled ids [N])."""
        segments = getattr(batch, "segments", None)
        mask = None if segments is not None else attention_mask_or_none(batch)
        x, attn_mask = self.encoder.embed(batch.input_ids, batch.token_type_ids, mask, segments)
        hg = self.generator(x, attn_mask, segments)  # [B, T, Hg]
        return self.generator.mlm_head(hg, batch.mlm_positions, labels=batch.mlm_targets,
                                       temperature=self.temperature)

    def _discriminate(self, batch, ids: torch.Tensor) -> torch.Tensor:
        segments = getattr(batch, "segments", None)
        if segments is not None:
            h = self.encoder(ids, batch.token_type_ids, segments=segments)
        else:
            h = self.encoder(ids, batch.token_type_ids, attention_mask_or_none(batch))
        return self.disc_head(h)  # [B, T]

    def logits(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generator MLM logits [N, V_real] at the masked rows, the discriminator's input ids [B, T] made from
        this call's samples, its logits [B, T]): for parity tests against Hugging Face."""
        check_batch(self, batch)
        segments = getattr(batch, "segments", None)
        mask = None if segments is not None else attention_mask_or_none(batch)
        x, attn_mask = self.encoder.embed(batch.input_ids, batch.token_type_ids, mask, segments)
        mlm = self.generator.mlm_head(self.generator(x, attn_mask, segments), batch.mlm_positions)
        _, _, sampled = self._generate(batch)
        ids, _ = corrupt(batch.input_ids, batch.mlm_positions, batch.mlm_targets, sampled)
        return mlm, ids, self._discriminate(batch, ids)

    def forward(self, batch) -> LossTerms:
        check_batch(self, batch)
        per_row, pred, sampled = self._generate(batch)  # [N] fp32, [N], [N]
        terms = LossTerms()
        terms.add("mlm", *row_terms(per_row, pred, batch.mlm_targets))
        ids, replaced = corrupt(batch.input_ids, batch.mlm_positions, batch.mlm_targets, sampled)  # [B, T] x 2
        real = None if getattr(batch, "segments", None) is not None else batch.attention_mask
        loss, n, correct, counts = disc_terms(self._discriminate(batch, ids), replaced, real)
        terms.add("disc", loss, n, correct, **counts)
        return terms


def build_electra(model_cfg, objective_cfg, rows: int, real_vocab_size: int | None,
                  check_inputs: bool = False) -> ElectraModel:
    """The ELECTRA model from its config sections (``rows``: embedding rows)."""
    m, o = model_cfg, objective_cfg
    if o.pair != "none":
        raise ValueError(f"objective.pair={o.pair!r}: ELECTRA has no sentence-pair task; set objective.pair: none")
    encoder = Encoder.from_config(m, rows, check_inputs=check_inputs)
    width, layers, heads, ffn = o.generator_shape(m.hidden_size, m.num_layers)
    generator = Generator(m.hidden_size, width, layers, heads, ffn, m,
                          encoder.embeddings.word_embeddings.weight, real_vocab_size)
    return ElectraModel(encoder, generator, m.activation, m.init_std, o.sampling_temperature)
