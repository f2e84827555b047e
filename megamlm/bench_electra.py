"""ELECTRA in ``megamlm bench model``: the models ``electra`` (megamlm's :class:`~megamlm.model.electra.ElectraModel`,
generator + discriminator in one step) and ``hf-electra`` (Hugging Face's composition: ``ElectraForMaskedLM`` and
``ElectraForPreTraining`` sharing one embedding module, driven by a plain loop: the generator over all B×T rows,
its samples drawn from its softmax at the masked rows, the discriminator's BCE over the real tokens), on the
same batches, with the same shapes (the generator ``--generator-fraction`` of the width, one head per 64,
FFN 4× its width, as deep as the discriminator) and the same loss (``1 · MLM + 50 · BCE``).

Their needed FLOPs (:func:`megamlm.flops.train_flops` with the generator) count both networks, so MFU and
tokens/s stay comparable with the MLM models of the same run: a ratio against ``megamlm`` is the cost of the
generator and the per-token head.
"""

from __future__ import annotations

import torch

__all__ = ["ELECTRA_MODELS", "electra_configs", "electra_flops", "electra_loss"]

ELECTRA_MODELS = ("electra", "hf-electra")
DISC_WEIGHT = 50.0


def electra_configs(o):
    """(ModelConfig, ObjectiveConfig) of the bench's ELECTRA: the bench's encoder as the discriminator."""
    from megamlm.config import ModelConfig, ObjectiveConfig

    mc = ModelConfig(vocab_size=o.vocab_size, hidden_size=o.hidden_size, num_layers=o.num_layers,
                     num_heads=o.num_heads, ffn_size=o.ffn_size, max_position_embeddings=max(512, o.seq_len),
                     dropout=o.dropout, attention_dropout=o.dropout)
    return mc, ObjectiveConfig(name="electra", pair="none", mask_token_ratio=0.85, random_token_ratio=0.0,
                               generator_hidden_fraction=o.generator_fraction, disc_weight=DISC_WEIGHT)


def electra_flops(o, batch) -> float:
    from megamlm.flops import generator_flops_shape, train_flops

    mc, oc = electra_configs(o)
    return train_flops(batch, o.hidden_size, o.num_layers, o.ffn_size, o.vocab_size, False,
                       generator_flops_shape(mc, oc))


def electra_loss(name: str, o, batches: list, backend: str = "auto"):
    """(model, loss_fn(k)) of ``name`` (``electra`` or ``hf-electra``) on ``batches``."""
    if name == "electra":
        return _megamlm(o, batches, backend)
    return _hf(o, batches)


def _megamlm(o, batches, backend):
    from megamlm import ops
    from megamlm.model import build_model
    from megamlm.objectives import objective_weights, step_denominators, weighted_sum

    mc, oc = electra_configs(o)
    model = build_model(mc, oc, o.vocab_size).to(o.device).train()
    ops.use(model, ops.select(backend, torch.device(o.device).type)[0])
    weights = objective_weights(oc)

    def loss_fn(k):
        b = batches[k]
        return weighted_sum(model(b), step_denominators(b.n_targets, None, b.n_tokens), weights)
    return model, loss_fn


def _hf(o, batches):
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    mc, oc = electra_configs(o)
    width, layers, heads, ffn = oc.generator_shape(o.hidden_size, o.num_layers)
    common = dict(vocab_size=o.vocab_size, embedding_size=o.hidden_size, max_position_embeddings=max(512, o.seq_len),
                  hidden_act="gelu", hidden_dropout_prob=o.dropout, attention_probs_dropout_prob=o.dropout,
                  layer_norm_eps=1e-12)
    disc = ElectraForPreTraining(ElectraConfig(hidden_size=o.hidden_size, num_hidden_layers=o.num_layers,
                                               num_attention_heads=o.num_heads, intermediate_size=o.ffn_size, **common))
    gen = ElectraForMaskedLM(ElectraConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                           intermediate_size=ffn, **common))
    for m in (disc, gen):
        m.config._attn_implementation = "sdpa"
    gen.electra.embeddings = disc.electra.embeddings  # shared, as the paper (and megamlm) do
    gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
    model = torch.nn.ModuleDict({"generator": gen, "discriminator": disc}).to(o.device).train()

    def loss_fn(k):
        b = batches[k]
        mask = b.attention_mask.long()
        g = gen(input_ids=b.input_ids, attention_mask=mask, token_type_ids=b.token_type_ids, labels=b.mlm_labels)
        with torch.no_grad():  # sample at the masked rows from the generator's softmax (Gumbel-max, fp32)
            logits = g.logits.reshape(-1, g.logits.shape[-1])[b.mlm_positions].float()
            u = torch.rand_like(logits)
            sampled = (logits - torch.log(-torch.log(u))).argmax(-1)
            ids = b.input_ids.reshape(-1).index_copy(0, b.mlm_positions, sampled).view_as(b.input_ids)
            labels = (ids != b.input_ids).long()
        d = disc(input_ids=ids, attention_mask=mask, token_type_ids=b.token_type_ids, labels=labels)
        return g.loss + DISC_WEIGHT * d.loss
    return model, loss_fn

