"""Parity with Hugging Face ``BertForPreTraining`` through the key table (megamlm/model/hf_keys.py).

Same shape, weights copied megamlm → HF through the table, fp32, dropout 0: MLM logits at the masked
rows and NSP logits within 1e-5, losses within 1e-6, and after one backward the gradients (mapped
through the table) within 1e-5. A failure points at the table (a renamed or mis-split tensor), at
the encoder's numerics (post-LN order, attention scaling or masking, GELU flavour, LayerNorm eps), or
at the heads (tied decoder, its bias, the pooler). Pre-LN has no HF counterpart: the table refuses it.
"""

import pytest
import torch

from megamlm.bench import random_batch
from megamlm.config import ModelConfig, ObjectiveConfig
from megamlm.model import build_model
from megamlm.model.hf_keys import from_hf, key_table, map_grads_to_hf, to_hf
from megamlm.objectives import combine

transformers = pytest.importorskip("transformers")

V = 101


def make_pair(pair="nsp", attn="eager", padding=True, act="gelu"):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=40,
                      dropout=0.0, attention_dropout=0.0, activation=act)
    ours = build_model(cfg, ObjectiveConfig(pair=pair), V)
    # perturb biases and norms (zero / one at init) so the test sees every tensor
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    hf_cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40,
                                     hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[act],
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     layer_norm_eps=1e-12, type_vocab_size=2)
    hf_cfg._attn_implementation = attn
    hf = transformers.BertForPreTraining(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_hf(ours.state_dict()), strict=False)
    assert not unexpected
    allowed = {"bert.embeddings.position_ids"}
    if pair == "none":  # no pair head: HF keeps its own pooler and classifier
        allowed |= {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                    "cls.seq_relationship.bias"}
    assert set(missing) <= allowed, missing
    batch = random_batch(3, 16, V, mlm_probability=0.25, padding=padding, pair=pair != "none", seed=7)
    return ours, hf, batch


def hf_forward(hf, b, with_labels=True):
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask.long(), token_type_ids=b.token_type_ids)
    if with_labels:
        kw.update(labels=b.mlm_labels, next_sentence_label=b.pair_labels)
    return hf(**kw)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [True, False])
def test_logits_and_loss_parity(attn, padding):
    ours, hf, b = make_pair(attn=attn, padding=padding)
    ours.eval()
    hf.eval()
    with torch.no_grad():
        mlm, pair = ours.logits(b)
        out = hf_forward(hf, b)
        terms = ours(b)
    hf_mlm = out.prediction_logits.reshape(-1, V)[b.mlm_positions]
    torch.testing.assert_close(mlm, hf_mlm, atol=1e-5, rtol=0)
    torch.testing.assert_close(pair, out.seq_relationship_logits, atol=1e-5, rtol=0)
    loss = combine(terms, terms.n_targets["mlm"], terms.n_targets["pair"])
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=0)


def test_gelu_tanh_parity():
    ours, hf, b = make_pair(act="gelu_tanh")
    ours.eval()
    hf.eval()
    with torch.no_grad():
        mlm, pair = ours.logits(b)
        out = hf_forward(hf, b, with_labels=False)
    torch.testing.assert_close(mlm, out.prediction_logits.reshape(-1, V)[b.mlm_positions], atol=1e-5, rtol=0)


def test_pair_none_mlm_loss_parity():
    ours, hf, b = make_pair(pair="none")
    ours.eval()
    hf.eval()
    with torch.no_grad():
        terms = ours(b)
        out = hf_forward(hf, b, with_labels=False)
    ref = torch.nn.functional.cross_entropy(out.prediction_logits.reshape(-1, V), b.mlm_labels.view(-1))
    torch.testing.assert_close(combine(terms, terms.n_targets["mlm"]), ref, atol=1e-6, rtol=0)


def assert_step_parity(ours, hf, b, loss_atol: float = 1e-6, grad_atol: float = 1e-5) -> None:
    """One training step of both (train mode): equal loss, and every gradient mapped through the key table."""
    ours.train()
    hf.train()
    terms = ours(b)
    loss = combine(terms, terms.n_targets["mlm"], terms.n_targets["pair"])
    loss.backward()
    out = hf_forward(hf, b)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss, atol=loss_atol, rtol=0)
    ours_grads = map_grads_to_hf({k: p.grad for k, p in ours.named_parameters()})
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    assert set(ours_grads) == set(hf_grads)
    for k, g in hf_grads.items():
        torch.testing.assert_close(ours_grads[k], g, atol=grad_atol, rtol=0, msg=k)


def test_one_train_step_gradient_parity():
    assert_step_parity(*make_pair())


def test_key_table_round_trip():
    ours, hf, _ = make_pair()
    sd = ours.state_dict()
    back = from_hf(hf.state_dict())
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    table = key_table(2)
    assert len({m for m, _ in table}) == len(table)
    assert len({h for _, hs in table for h in hs}) == sum(len(hs) for _, hs in table)


def test_pre_ln_refused_by_table():
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, norm_position="pre")
    model = build_model(cfg, ObjectiveConfig(), V)
    with pytest.raises(ValueError, match="encoder.final_norm"):
        to_hf(model.state_dict())
