"""Encoder, heads and the pretraining model on tiny shapes.

A failure here points at megamlm/model/ (encoder.py: embeddings, attention masking, blocks, init,
input checks; heads.py: tied decoder, masked-row gather, padded vocabulary; pretraining.py: batch
checks, build_model).
"""

import pytest
import torch

from megamlm.bench import random_batch
from megamlm.config import ModelConfig, ObjectiveConfig
from megamlm.data.batch import Batch
from megamlm.model import Encoder, build_model, weight_decay_groups

V = 97


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=64,
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_parameters_are_hf_bert_models_and_the_output_is_deterministic(norm):
    """The encoder holds exactly HF BertModel's parameters (no pooler; pre-LN adds the final LayerNorm,
    2·H), its output is [B, T, H], and in eval mode the same input gives the same hidden states bit for
    bit, whatever the batch around it (row 0 alone equals row 0 of the batch)."""
    from transformers import BertConfig, BertModel

    cfg = tiny_cfg(norm_position=norm)
    torch.manual_seed(0)
    enc = Encoder.from_config(cfg, V).eval()
    hf = BertModel(BertConfig(vocab_size=V, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                              num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_size,
                              max_position_embeddings=cfg.max_position_embeddings,
                              type_vocab_size=cfg.type_vocab_size), add_pooling_layer=False)
    n_ours = sum(p.numel() for p in enc.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf + (2 * cfg.hidden_size if norm == "pre" else 0)
    assert (enc.final_norm is not None) == (norm == "pre")
    ids = torch.randint(0, V, (3, 10))
    types = torch.randint(0, 2, (3, 10))
    with torch.no_grad():
        h = enc(ids, types)
        assert h.shape == (3, 10, cfg.hidden_size) and torch.isfinite(h).all()
        assert torch.equal(enc(ids, types), h)
        torch.testing.assert_close(enc(ids[:1], types[:1]), h[:1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(h[0], h[1])  # rows are not collapsed to one vector


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_invariance(norm):
    """Hidden states of real tokens do not change when padding is appended."""
    torch.manual_seed(0)
    enc = Encoder.from_config(tiny_cfg(norm_position=norm), V).eval()
    ids = torch.randint(1, V, (2, 7))
    types = torch.randint(0, 2, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # row 1 already padded
    h = enc(ids, types, mask)
    pad = 9
    ids2 = torch.cat([ids, torch.zeros(2, pad, dtype=torch.long)], 1)
    types2 = torch.cat([types, torch.zeros(2, pad, dtype=torch.long)], 1)
    mask2 = torch.cat([mask, torch.zeros(2, pad, dtype=torch.bool)], 1)
    h2 = enc(ids2, types2, mask2)
    torch.testing.assert_close(h2[0, :7], h[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2[1, :5], h[1, :5], atol=1e-5, rtol=1e-5)


def test_no_mask_equals_all_true_mask():
    torch.manual_seed(0)
    enc = Encoder.from_config(tiny_cfg(), V).eval()
    ids = torch.randint(0, V, (2, 6))
    torch.testing.assert_close(enc(ids, None, None), enc(ids, torch.zeros_like(ids),
                                                         torch.ones(2, 6, dtype=torch.bool)))


def test_tied_decoder_shares_storage():
    model = build_model(tiny_cfg(), ObjectiveConfig(), V)
    emb = model.encoder.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is emb
    b = random_batch(2, 8, V, mlm_probability=0.3, seed=1)
    model.mlm_head(model.hidden(b), b.mlm_positions)[:, 5].sum().backward()  # one decoder column only
    touched = emb.grad.abs().sum(1) > 0
    assert touched[5] and int(touched.sum()) > 1  # the decoder's row 5, and the rows the lookup read
    names = [n for n, _ in model.named_parameters()]
    assert "mlm_head.decoder.weight" not in names  # counted once
    assert model.mlm_head.decoder.bias.shape == (V,)


def test_init_std():
    torch.manual_seed(0)
    cfg = tiny_cfg(hidden_size=64, ffn_size=256, init_std=0.02)
    model = build_model(cfg, ObjectiveConfig(), 4096)
    for name, p in model.named_parameters():
        if p.dim() == 2:  # N(0, 0.02): 5-sigma bounds for the sample std and mean
            tol = 5 * 0.02 / p.numel() ** 0.5
            assert abs(p.std().item() - 0.02) < tol, name
            assert abs(p.mean().item()) < tol, name
        elif "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_padded_vocab_rows_never_predicted():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=V)
    b = random_batch(3, 12, V, mlm_probability=0.4, seed=1)
    mlm, pair = model.logits(b)
    assert mlm.shape == (b.mlm_positions.numel(), V) and pair.shape == (3, 2)
    terms = model(b)
    (terms.loss_sum["mlm"] + terms.loss_sum["pair"]).backward()
    g = model.encoder.embeddings.word_embeddings.weight.grad
    assert torch.all(g[V:] == 0)  # padded rows: not looked up, not projected
    assert torch.all(model.mlm_head.decoder.bias.grad[V:] == 0)


def test_masked_rows_gathered_from_flat_positions():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), ObjectiveConfig(), V).eval()
    b = random_batch(2, 9, V, seed=3)
    h = model.hidden(b)
    full = model.mlm_head.decoder(model.mlm_head.norm(model.mlm_head.act(model.mlm_head.dense(h))))  # [B,T,V]
    mlm, _ = model.logits(b)
    torch.testing.assert_close(mlm, full.view(-1, V)[b.mlm_positions])


def test_pair_none_has_no_pair_head():
    model = build_model(tiny_cfg(), ObjectiveConfig(pair="none"), V)
    assert model.pair_head is None
    b = random_batch(2, 8, V, pair=False)
    terms = model(b)
    assert set(terms.loss_sum) == {"mlm"}


def test_weight_decay_groups():
    model = build_model(tiny_cfg(), ObjectiveConfig(), V)
    decay, no_decay = weight_decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_dropout_active_in_train_only():
    torch.manual_seed(0)
    enc = Encoder.from_config(tiny_cfg(dropout=0.5, attention_dropout=0.5), V)
    ids = torch.randint(0, V, (2, 6))
    assert not torch.equal(enc(ids), enc(ids))
    enc.eval()
    assert torch.equal(enc(ids), enc(ids))


# ----------------------------------------------------------------------------------------- bad input

def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by model.num_heads=4"):
        Encoder.from_config(tiny_cfg(hidden_size=30), V)


def test_sequence_longer_than_positions():
    enc = Encoder.from_config(tiny_cfg(max_position_embeddings=8), V)
    with pytest.raises(ValueError, match="sequence length 9 exceeds model.max_position_embeddings=8"):
        enc(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("bad", [V, V + 5, -1])
def test_token_id_out_of_vocab(bad):
    enc = Encoder.from_config(tiny_cfg(), V)
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\[0, {V}\\)"):
        enc(ids)


def test_token_type_out_of_range():
    enc = Encoder.from_config(tiny_cfg(), V)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="token type id 2"):
        enc(ids, torch.full_like(ids, 2))


@pytest.mark.parametrize("shape", [(2, 4), (5,), (2, 1, 5)])
def test_attention_mask_wrong_shape(shape):
    enc = Encoder.from_config(tiny_cfg(), V)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(.*\); expected \(2, 5\)"):
        enc(torch.zeros(2, 5, dtype=torch.long), None, torch.ones(shape, dtype=torch.bool))


def test_input_ids_not_2d():
    enc = Encoder.from_config(tiny_cfg(), V)
    with pytest.raises(ValueError, match="input_ids must be"):
        enc(torch.zeros(5, dtype=torch.long))


def _batch_with(b: Batch, **kw) -> Batch:
    d = dict(b.__dict__)
    d.update(kw)
    return Batch(**d)


def test_bad_batches():
    model = build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=V)
    b = random_batch(2, 8, V, mlm_probability=0.5, seed=0)
    with pytest.raises(ValueError, match="mlm_positions holds 16"):
        model(_batch_with(b, mlm_positions=torch.tensor([1, 16]), mlm_targets=torch.tensor([3, 4])))
    with pytest.raises(ValueError, match=f"MLM target id 100 is outside the real vocabulary \\[0, {V}\\)"):
        model(_batch_with(b, mlm_positions=torch.tensor([1, 2]), mlm_targets=torch.tensor([3, 100])))
    with pytest.raises(ValueError, match="has no pair_labels"):
        model(_batch_with(b, pair_labels=None))
    with pytest.raises(ValueError, match="pair_labels has shape"):
        model(_batch_with(b, pair_labels=torch.zeros(3, dtype=torch.long)))


def test_build_model_rejects_small_vocab():
    with pytest.raises(ValueError, match="tokenizer has 200 pieces but the model only 128"):
        build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=200)


def test_shipped_small_config_builds():
    from pathlib import Path

    from megamlm.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/small.yaml")
    model = build_model(cfg.model, cfg.objective, 30592, real_vocab_size=30522)
    n = sum(p.numel() for p in model.parameters())
    assert 11_000_000 < n < 11_500_000, n


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_blocks():
    """engine.compile: each block under torch.compile (inductor on this CPU) gives the eager model's loss
    terms and every parameter's gradient within fp32 tolerance (1e-5 relative), padded and packed (dynamic
    token counts). On the cpu backend, whose kernels still run outside the blocks; inside them the ops run
    their torch code, the torch backend's (what a GPU runs)."""
    backend = "cpu"
    from megamlm import ops
    from megamlm.data.batch import pack

    torch.manual_seed(0)
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = build_model(tiny_cfg(), ObjectiveConfig(pair="nsp"), 128, V)
        ops.use(m, ops.select(backend, "cpu", torch.float32, 0)[0])
        if compiled:
            m.encoder.compile_blocks()
        models.append(m)
    eager, comp = models
    assert list(dict(comp.named_parameters())) == list(dict(eager.named_parameters()))  # checkpoint keys kept
    for seed in (1, 2):
        batch = random_batch(4, 32, V, seed=seed, padding=True)
        for b in (batch, pack(batch)):
            for m in models:
                m.zero_grad()
                terms = m(b)
                (terms.loss_sum["mlm"] / terms.n_targets["mlm"] + terms.loss_sum["pair"] / 4).backward()
                m.last = terms
            for k in ("mlm", "pair"):
                torch.testing.assert_close(comp.last.loss_sum[k], eager.last.loss_sum[k], rtol=1e-5, atol=1e-5)
            for (n, p), q in zip(eager.named_parameters(), comp.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
    from torch._dynamo.utils import counters

    assert counters["frames"]["ok"] >= 2, dict(counters["frames"])  # the blocks were compiled, not run eagerly
