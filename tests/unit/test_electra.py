"""ELECTRA (megamlm/model/electra.py): parity with Hugging Face's ElectraForMaskedLM (generator) and
ElectraForPreTraining (discriminator) through the key table, the corrupted input, the Gumbel-max sampler, the
loss against a plain-torch reference, and the config's defaults and refusals.

Parity: same shapes, weights copied megamlm → HF through megamlm/model/hf_electra.py, fp32, dropout 0:
generator MLM logits at the masked rows and discriminator logits on the corrupted input within 1e-5; the
loss, gen_weight · CE mean over the masked rows + disc_weight · BCE mean over the real tokens computed from
the HF logits, within 1e-6; after one backward the gradients (the shared embeddings' summed over the two HF
models) within 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F

from megamlm.bench import random_batch
from megamlm.config import ConfigError, ModelConfig, ObjectiveConfig, config_from_dict
from megamlm.model import build_model
from megamlm.model.electra import ElectraModel, corrupt
from megamlm.model.hf_electra import electra_from_hf, electra_to_hf
from megamlm.objectives import objective_weights, step_denominators, weighted_sum
from megamlm.ops import IGNORE_INDEX
from megamlm.ops.sampling import gumbel_sample
from megamlm.parallel.vocab import vocab_parallel_sample

transformers = pytest.importorskip("transformers")

V = 101
H, L = 32, 2


def make(padding=True, real=V, fraction=0.5, gen_layers=0):
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=H, num_layers=L, num_heads=4, ffn_size=64, max_position_embeddings=40,
                     dropout=0.0, attention_dropout=0.0)
    oc = ObjectiveConfig(name="electra", pair="none", generator_hidden_fraction=fraction, generator_heads=2,
                         generator_layers=gen_layers, disc_weight=50.0, gen_weight=1.5)
    ours = build_model(mc, oc, V, real)
    with torch.no_grad():  # biases and norms are 0 / 1 at init: perturb them so the test sees every tensor
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    width, layers, heads, ffn = oc.generator_shape(H, L)
    common = dict(vocab_size=V, embedding_size=H, max_position_embeddings=40, type_vocab_size=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, hidden_act="gelu")
    disc_cfg = transformers.ElectraConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                          intermediate_size=64, **common)
    gen_cfg = transformers.ElectraConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                         intermediate_size=ffn, **common)
    disc, gen = transformers.ElectraForPreTraining(disc_cfg), transformers.ElectraForMaskedLM(gen_cfg)
    d_sd, g_sd = electra_to_hf(ours.state_dict())
    for hf, sd in ((disc, d_sd), (gen, g_sd)):
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"generator_lm_head.weight", "electra.embeddings.position_ids"}
    gen.tie_weights()
    batch = random_batch(3, 16, real, mlm_probability=0.3, padding=padding, pair=False, seed=7)
    return ours, disc, gen, batch, oc


def hf_logits(disc, gen, b, ids):
    kw = dict(attention_mask=b.attention_mask.long(), token_type_ids=b.token_type_ids)
    g = gen(input_ids=b.input_ids, **kw).logits.reshape(-1, V)[b.mlm_positions]  # [N, V]
    return g, disc(input_ids=ids, **kw).logits  # [N, V], [B, T]


def reference_loss(g_logits, d_logits, b, ids, oc, real):
    """gen_weight · CE mean over the masked rows + disc_weight · BCE mean over the real tokens."""
    replaced = (ids != b.input_ids)  # the samples that changed a token
    mlm = F.cross_entropy(g_logits[:, :real], b.mlm_targets)
    mask = b.attention_mask
    bce = F.binary_cross_entropy_with_logits(d_logits[mask], replaced[mask].float())
    return oc.gen_weight * mlm + oc.disc_weight * bce


@pytest.mark.parametrize("padding", [True, False])
def test_logits_and_loss_parity_with_hf(padding):
    ours, disc, gen, b, oc = make(padding=padding)
    for m in (ours, disc, gen):
        m.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        mlm, ids, d_logits = ours.logits(b)
        torch.manual_seed(3)
        terms = ours(b)
        g_ref, d_ref = hf_logits(disc, gen, b, ids)
    torch.testing.assert_close(mlm, g_ref, atol=1e-5, rtol=0)
    mask = b.attention_mask
    torch.testing.assert_close(d_logits[mask], d_ref[mask], atol=1e-5, rtol=0)
    assert int((ids != b.input_ids).sum()) > 0  # the generator did replace tokens
    n = step_denominators(terms.n_targets["mlm"], None, b.n_tokens)
    loss = weighted_sum(terms, n, objective_weights(oc))
    torch.testing.assert_close(loss, reference_loss(g_ref, d_ref, b, ids, oc, V), atol=1e-6, rtol=0)
    assert int(terms.n_targets["disc"]) == int(mask.sum()) == b.n_tokens


def test_one_train_step_gradient_parity_with_hf():
    ours, disc, gen, b, oc = make(fraction=0.5, gen_layers=1)
    torch.manual_seed(3)
    _, ids, _ = ours.logits(b)
    ours.zero_grad()
    torch.manual_seed(3)
    terms = ours(b)
    loss = weighted_sum(terms, step_denominators(terms.n_targets["mlm"], None, b.n_tokens), objective_weights(oc))
    loss.backward()
    g_ref, d_ref = hf_logits(disc, gen, b, ids)
    ref = reference_loss(g_ref, d_ref, b, ids, oc, V)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    grads = {k: p.grad for k, p in ours.named_parameters()}
    d_g = {k: p.grad for k, p in disc.named_parameters()}
    g_g = {k: p.grad for k, p in gen.named_parameters()}
    mapped_d, mapped_g = electra_to_hf(grads)
    for k, g in mapped_d.items():  # the shared embeddings get both models' gradients
        ref_g = d_g[k] + g_g[k] if k.startswith("electra.embeddings.") and k in g_g else d_g[k]
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=0, msg=k)
    for k, g in mapped_g.items():
        if not k.startswith("electra.embeddings.") or k == "electra.embeddings_project.weight":
            torch.testing.assert_close(g, g_g[k], atol=1e-5, rtol=0, msg=k)


def test_key_tables_round_trip_and_refuse_untied_embeddings():
    ours, disc, gen, _, _ = make()
    sd = ours.state_dict()
    back = electra_from_hf(disc.state_dict(), gen.state_dict())
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    g = dict(gen.state_dict())
    g["electra.embeddings.position_embeddings.weight"] = g["electra.embeddings.position_embeddings.weight"] + 1
    with pytest.raises(ValueError, match="position_embeddings.*shares the embeddings"):
        electra_from_hf(disc.state_dict(), g)


def test_same_width_generator_has_no_projection():
    ours, disc, gen, b, _ = make(fraction=1.0)
    assert ours.generator.project is None and "electra.embeddings_project.weight" not in gen.state_dict()
    for m in (ours, disc, gen):
        m.eval()
    with torch.no_grad():
        mlm, ids, d_logits = ours.logits(b)
        g_ref, d_ref = hf_logits(disc, gen, b, ids)
    torch.testing.assert_close(mlm, g_ref, atol=1e-5, rtol=0)


def test_corrupt_counts_a_sample_equal_to_the_original_as_original():
    ids = torch.tensor([[2, 10, 11, 12], [2, 20, 21, 0]])
    positions = torch.tensor([1, 3, 5, 6])
    targets = torch.tensor([10, 12, 20, IGNORE_INDEX])
    sampled = torch.tensor([10, 40, 41, 42])  # row 0 sampled its original; the ignored row keeps its id
    out, replaced = corrupt(ids, positions, targets, sampled)
    assert out.tolist() == [[2, 10, 11, 40], [2, 41, 21, 0]]
    assert replaced.tolist() == [[False, False, False, True], [False, True, False, False]]
    assert ids.tolist() == [[2, 10, 11, 12], [2, 20, 21, 0]]  # the batch's ids untouched


def test_gumbel_sample_follows_the_softmax_and_its_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    for t in (1.0, 0.5):
        freq = torch.bincount(gumbel_sample(logits, None, t), minlength=4).float() / logits.shape[0]
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, -1), atol=0.01, rtol=0)
    bias = torch.tensor([0.0, 0.0, -50.0, 0.0])  # the bias is part of the distribution
    assert int((gumbel_sample(logits[:1000], bias, 1.0) == 2).sum()) == 0
    with pytest.raises(ValueError, match="sampling_temperature"):
        gumbel_sample(logits, None, 0.0)


def test_sampling_never_draws_vocabulary_padding_and_one_slice_equals_the_full_draw():
    ours, _, _, b, _ = make(real=90)  # rows 90..100 are padding
    ours.train()
    torch.manual_seed(1)
    _, ids, _ = ours.logits(b)
    assert int(ids.max()) < 90
    logits = torch.randn(50, 90)
    torch.manual_seed(5)
    full = gumbel_sample(logits, None, 1.3)
    torch.manual_seed(5)
    padded = torch.cat([logits, torch.full((50, 10), float("-inf"))], dim=1)  # a vp=1 slice holds the padding
    assert torch.equal(vocab_parallel_sample(padded, 0, 90, 1.3, None), full)


def test_backends_agree_on_the_electra_step():
    """The CPU backend (fused decoder, the generator's samples from its workspace logits) and the torch backend:
    same samples, same loss, same gradients."""
    from megamlm import ops

    ours, _, _, b, oc = make()
    ours.train()
    results = []
    for backend in (ops.TorchOps(), ops.CpuOps()):
        ops.use(ours, backend)
        ours.zero_grad()
        torch.manual_seed(9)
        terms = ours(b)
        loss = weighted_sum(terms, step_denominators(terms.n_targets["mlm"], None, b.n_tokens), objective_weights(oc))
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in ours.named_parameters()},
                        int(terms.counts["disc_replaced"])))
    (l0, g0, r0), (l1, g1, r1) = results
    assert r0 == r1 > 0
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-5, rtol=1e-5, msg=k)


def test_disc_metrics_precision_recall_and_replaced_share():
    ours, _, _, b, _ = make()
    torch.manual_seed(2)
    with torch.no_grad():
        terms = ours(b)
        _, ids, d_logits = (torch.manual_seed(2), *ours.logits(b))[1:]
    m = terms.to_floats()
    mask = b.attention_mask
    replaced = (ids != b.input_ids) & mask
    flagged = (d_logits > 0) & mask
    assert m["disc_targets"] == float(mask.sum())
    assert m["replaced_share"] == pytest.approx(float(replaced.sum()) / float(mask.sum()))
    assert m["disc_precision"] == pytest.approx(float((flagged & replaced).sum()) / max(float(flagged.sum()), 1.0))
    assert m["disc_recall"] == pytest.approx(float((flagged & replaced).sum()) / float(replaced.sum()))
    assert m["disc_accuracy"] == pytest.approx(float(((flagged == replaced) & mask).sum()) / float(mask.sum()))
    assert isinstance(ours, ElectraModel) and ours.pair_head is None


def test_config_defaults_and_refusals():
    cfg = config_from_dict({"objective": {"name": "electra"}})
    o = cfg.objective
    assert (o.mask_token_ratio, o.random_token_ratio, o.pair) == (0.85, 0.0, "none")
    assert config_from_dict({"objective": {"name": "electra", "mask_token_ratio": 0.8}}).objective.mask_token_ratio == 0.8
    assert config_from_dict({}).objective.mask_token_ratio == 0.8  # MLM keeps BERT's 80/10/10
    bad = [({"pair": "nsp"}, "objective.pair='nsp' with objective.name='electra'"),
           ({"generator_hidden_fraction": 1.5}, "objective.generator_hidden_fraction=1.5 is out of range"),
           ({"disc_weight": 0}, "objective.disc_weight=0.0 is out of range"),
           ({"generator_heads": 5}, "not divisible by objective.generator_heads=5"),
           ({"name": "elektra"}, "did you mean 'electra'")]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            config_from_dict({"objective": {"name": "electra", **extra}})
    assert o.generator_shape(256, 12) == (64, 12, 1, 256)  # ELECTRA-Small's generator: 1/4 width


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_packed_batch_gives_the_padded_batchs_terms(backend):
    """The same examples packed into one row (attention inside each, positions restarting): the same samples
    (the masked rows keep their order, so their noise), the same generator and discriminator sums and counts;
    padding is never a discriminator target."""
    from megamlm import ops
    from megamlm.data.batch import pack

    ours, _, _, b, _ = make(padding=True)
    ops.use(ours.eval(), ops.TorchOps() if backend == "torch" else ops.CpuOps())
    p = pack(b)
    with torch.no_grad():
        torch.manual_seed(4)
        padded = ours(b)
        torch.manual_seed(4)
        packed = ours(p)
    for k in ("mlm", "disc"):
        torch.testing.assert_close(packed.loss_sum[k], padded.loss_sum[k], atol=1e-5, rtol=1e-6)
        assert int(packed.n_targets[k]) == int(padded.n_targets[k]) and int(packed.n_correct[k]) == int(padded.n_correct[k])
    assert {k: int(v) for k, v in packed.counts.items()} == {k: int(v) for k, v in padded.counts.items()}
    assert int(packed.n_targets["disc"]) == b.n_tokens < b.input_ids.numel()
