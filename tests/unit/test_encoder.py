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
from megamlm.model import cpu_kernels, kernel_build

V = 97


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=64,
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_shapes(norm):
    torch.manual_seed(0)
    enc = Encoder.from_config(tiny_cfg(norm_position=norm), V)
    ids = torch.randint(0, V, (3, 10))
    h = enc(ids, torch.zeros_like(ids), torch.ones(3, 10, dtype=torch.bool))
    assert h.shape == (3, 10, 32)
    assert (enc.final_norm is not None) == (norm == "pre")


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
    assert model.mlm_head.decoder.weight.data_ptr() == emb.data_ptr()
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


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-mask", "stored-mask"])
@pytest.mark.parametrize("padded", [False, True])
def test_cpu_attention_matches_reference_with_same_dropout_mask(padded, kernels):
    """_CPUAttention (per-head strided gemms, hand-written backward) equals autograd through the plain
    formula softmax(q kᵀ/√d + mask)·keep·v with the mask it used, in output and in the qkv gradient:
    the compiled kernels' stream (regenerated in backward) or the stored numpy-drawn mask."""
    from megamlm.model import cpu_kernels
    from megamlm.model.dropout import _keep_mask
    from megamlm.model.encoder import _CPUAttention

    if kernels and not cpu_kernels.available():
        pytest.skip("no C compiler here: the kernels cannot be built")
    B, T, nh, hd, p = 3, 9, 4, 8, 0.3
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hd, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, 6:] = False
        mask[2, 2:] = False
    mask_add = torch.zeros(B, 1, T, dtype=torch.float64).masked_fill_(~mask[:, None, :], float("-inf"))
    grad_y = torch.randn(B, T, nh * hd, dtype=torch.float64)

    previous = cpu_kernels.set_enabled(kernels)
    try:
        torch.manual_seed(5)
        y = _CPUAttention.apply(qkv, mask_add if padded else None, nh, p)
        y.backward(grad_y)
    finally:
        cpu_kernels.set_enabled(previous)
    torch.manual_seed(5)  # the same draw: the seed of the stream, or the stored mask
    if kernels:
        seed = cpu_kernels.draw_seed()
        keep = cpu_kernels.keep_mask_reference(nh * B * T * T, p, seed).view(nh, B, T, T).double() / (1 - p)
    else:
        keep = _keep_mask((nh, B, T, T), p, torch.float64)
    keep = keep.transpose(0, 1)  # [B, nh, T, T]
    assert 0 < int((keep == 0).sum()) < keep.numel()  # some dropped, some kept

    ref_in = qkv.detach().clone().requires_grad_(True)
    q, k, v = ref_in.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, nh, T, hd]
    scores = q @ k.transpose(-1, -2) / hd ** 0.5 + mask_add[:, None]  # [B, nh, T, T]
    ref = ((torch.softmax(scores, -1) * keep) @ v).transpose(1, 2).reshape(B, T, nh * hd)
    ref.backward(grad_y)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(qkv.grad, ref_in.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_dropout_path_used_in_training_and_scaled(dtype, kernels):
    """The model's training attention (p > 0, CPU) takes the tile kernel (float32, where the kernels have
    torch's sgemm) or _CPUAttention (float64, or no kernels) and, with p → 0 in the mask (all kept),
    equals the eval-mode SDPA output."""
    from megamlm.model import cpu_kernels
    from megamlm.model.encoder import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4, attention_dropout=1e-9).to(dtype).train()  # threshold rounds to 0: keeps all
    x = torch.randn(2, 7, 32, dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    am = mask[:, None, None, :]
    train_out = attn(x, am)
    names, todo = set(), [train_out.grad_fn]
    while todo:  # every node of the backward graph
        fn = todo.pop()
        names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions if f is not None)
    tile = dtype == torch.float32 and cpu_kernels.attention_available()
    assert ("_TileAttentionBackward" if tile else "_CPUAttentionBackward") in names, names
    if kernels and dtype == torch.float32 and kernel_build.torch_sgemm():
        assert tile  # x86 torch exports its sgemm: the tile kernel is in use wherever the kernels are
    torch.testing.assert_close(train_out, attn.eval()(x, am), atol=1e-5, rtol=1e-5)


needs_tile = pytest.mark.skipif(not cpu_kernels.attention_available(),
                                reason="no C compiler, or torch exports no sgemm: no tile attention kernel")


@needs_tile
@pytest.mark.parametrize("T", [16, 9])  # rows on word boundaries (mask in the softmax pass) and not
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tile_attention_kernel_matches_formula_with_the_stream_mask(T, padded, with_bias):
    """cpu_kernels.attention_forward / backward against autograd through softmax(q kᵀ/√d + mask)·keep·v,
    q, k, v = qkv + bias, in float64, keep from keep_mask_reference over the probabilities
    [nh, B, T, T]: output, saved probabilities, the qkv and bias gradients (float32 tolerances; the
    kernel applies the bias inside, the key bias' gradient is exactly 0). A sequence with every key
    masked gets zero probabilities (not NaN) and zero gradient."""
    B, nh, hd, p = 3, 4, 8, 0.3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hd, generator=g)
    grad_y = torch.randn(B, T, nh * hd, generator=g)
    bias = torch.randn(3 * nh * hd, generator=g) if with_bias else None
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, 6:] = False
        mask[2, :] = False  # no real key at all
    mask_add = torch.zeros(B, T).masked_fill_(~mask, float("-inf"))
    seed = 2 ** 63 + 11
    y, probs = cpu_kernels.attention_forward(qkv, mask_add if padded else None, nh, p, seed, bias)
    grad, grad_bias = cpu_kernels.attention_backward(grad_y, qkv, probs, nh, p, seed, bias, bias_grad=with_bias)

    keep = cpu_kernels.keep_mask_reference(nh * B * T * T, p, seed).view(nh, B, T, T).double() / (1 - p)
    assert 0 < int((keep == 0).sum()) < keep.numel()
    ref_in = qkv.double().requires_grad_(True)
    ref_bias = (torch.zeros(3 * nh * hd, dtype=torch.float64) if bias is None else bias.double()).requires_grad_(True)
    q, k, v = (ref_in + ref_bias).view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, nh, T, hd]
    scores = q @ k.transpose(-1, -2) / hd ** 0.5 + mask_add.double()[:, None, None, :]
    ref_probs = torch.softmax(scores, -1).nan_to_num(0.0)  # [B, nh, T, T]; all-masked rows: 0
    ref = ((ref_probs * keep.transpose(0, 1)) @ v).transpose(1, 2).reshape(B, T, nh * hd)
    ref.backward(grad_y.double())
    torch.testing.assert_close(probs.double(), ref_probs.transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    real = slice(0, 2) if padded else slice(None)  # (the reference's gradient is NaN for sequence 2)
    torch.testing.assert_close(grad[real].double(), ref_in.grad[real], atol=1e-5, rtol=1e-5)
    if with_bias:
        H = nh * hd
        assert torch.equal(grad_bias[H:2 * H], torch.zeros(H))  # the key bias: exactly no gradient
        if not padded:  # (the reference's is NaN with the all-masked sequence)
            torch.testing.assert_close(grad_bias.double(), ref_bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_bias[:H], grad[..., :H].sum((0, 1)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_bias[2 * H:], grad[..., 2 * H:].sum((0, 1)), atol=1e-5, rtol=1e-5)
    else:
        assert grad_bias is None
    if padded:
        assert torch.equal(probs[:, 2], torch.zeros_like(probs[:, 2]))
        assert torch.equal(grad[2], torch.zeros_like(grad[2]))
        assert bool(grad.isfinite().all())


@needs_tile
def test_tile_attention_equals_per_head_attention_with_the_same_seed():
    """_TileAttention and _CPUAttention draw one seed and use one stream: same output and gradient (the
    tile path is a faster schedule of the same computation), padded batch, on the OpenMP threads."""
    from megamlm.model.encoder import _CPUAttention, _TileAttention

    B, T, nh, hd, p = 8, 32, 4, 16, 0.1
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3 * nh * hd, generator=g)
    grad_y = torch.randn(B, T, nh * hd, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, 20:] = False
    mask_add = torch.zeros(B, T).masked_fill_(~mask, float("-inf"))
    outs = []
    for fn, m in ((_TileAttention, mask_add), (_CPUAttention, mask_add[:, None, :])):
        x = qkv.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = fn.apply(x, None, m, nh, p) if fn is _TileAttention else fn.apply(x, m, nh, p)
        y.backward(grad_y)
        outs.append((y.detach(), x.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


@needs_tile
def test_tile_attention_bad_arguments_and_missing_sgemm():
    qkv = torch.randn(2, 5, 24)
    with pytest.raises(ValueError, match="float32 qkv"):
        cpu_kernels.attention_forward(qkv.double(), None, 4, 0.1, 1)
    with pytest.raises(ValueError, match="5 heads"):
        cpu_kernels.attention_forward(qkv, None, 5, 0.1, 1)
    with pytest.raises(ValueError, match="mask_add"):
        cpu_kernels.attention_forward(qkv, torch.zeros(2, 4), 4, 0.1, 1)
    with pytest.raises(ValueError, match="dropout probability"):
        cpu_kernels.attention_forward(qkv, None, 4, 1.0, 1)
    with pytest.raises(ValueError, match="bias"):
        cpu_kernels.attention_forward(qkv, None, 4, 0.1, 1, bias=torch.zeros(23))
    y, probs = cpu_kernels.attention_forward(qkv, None, 4, 0.1, 1)
    with pytest.raises(ValueError, match="do not match"):
        cpu_kernels.attention_backward(y[:, :4].contiguous(), qkv, probs, 4, 0.1, 1)
    with pytest.raises(ValueError, match="needs the bias"):
        cpu_kernels.attention_backward(y, qkv, probs, 4, 0.1, 1, bias_grad=True)
    lib = cpu_kernels._lib
    lib.megamlm_set_sgemm(None)  # as on a torch build that exports no sgemm
    try:
        assert not cpu_kernels.attention_available()
        with pytest.raises(RuntimeError, match="no sgemm"):
            cpu_kernels.attention_forward(qkv, None, 4, 0.1, 1)
    finally:
        kernel_build.attach_sgemm(lib)
    assert cpu_kernels.attention_available()


def test_scratch_logits_workspace_reused_only_when_free():
    """Training forward (scratch logits in a reused workspace, the decoder's bias added inside the loss,
    the tied weight's decoder gradient handed to the word-embedding lookup through a TiedGrad) gives the loss and gradients of the plain F.linear
    decoder and nn.Embedding with autograd summing the two; the workspace is reused step after step,
    but not while a pending graph holds it (two forwards, then one backward of their sum: still the
    right gradients). The padded vocabulary rows get zero gradient from both."""
    from megamlm.objectives import combine

    def grads(model, batches):
        model.zero_grad(set_to_none=True)
        loss = sum(combine(model(b), int(b.mlm_positions.numel()), b.input_ids.shape[0]) for b in batches)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=V)
    b1 = random_batch(3, 12, V, mlm_probability=0.4, seed=1)
    b2 = random_batch(3, 12, V, mlm_probability=0.4, seed=2)
    dec = model.mlm_head.decoder

    def reference(batches):  # the same model with the plain decoder path and no hand-off
        orig = dec.forward
        dec.forward = lambda h, scratch=False, tied=None, add_bias=True: orig(h, scratch=False)
        model._tied_grad = lambda: None
        model._bias_in_loss = lambda: False
        try:
            return grads(model, batches)
        finally:
            dec.forward = orig
            del model._tied_grad, model._bias_in_loss

    assert model._tied_grad() is not None and model._bias_in_loss()
    with torch.no_grad():
        assert model._tied_grad() is None

    for batches in ([b1], [b2], [b1, b2]):
        loss, g = grads(model, batches)
        ref_loss, ref_g = reference(batches)
        torch.testing.assert_close(loss, ref_loss)
        for n in g:
            torch.testing.assert_close(g[n], ref_g[n], msg=n)
        word = g["encoder.embeddings.word_embeddings.weight"]
        assert float(word[V:].abs().max()) == 0 and float(word[:V].abs().max()) > 0
    grads(model, [b1])
    ws = dec._ws
    grads(model, [b1])
    assert dec._ws is ws  # free after the backward: reused
    logits, _ = model.logits(b1, scratch=True)
    assert logits.untyped_storage().data_ptr() == ws.untyped_storage().data_ptr()
    logits2, _ = model.logits(b2, scratch=True)  # the first logits are still held: a new workspace
    assert logits2.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
    assert model.logits(b1)[0].untyped_storage().data_ptr() != dec._ws.untyped_storage().data_ptr()  # not scratch
