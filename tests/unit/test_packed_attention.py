"""Attention over a packed stream (issue 18, step 1): the ``segments`` argument of the ops layer's
``attention``. A failure points at megamlm/ops/torch_ops.py (segment_attention, padded_index),
megamlm/ops/cpu.py / cpu_kernels.c (the per-(segment, head) tile kernel) or ops/__init__.py (Segments).

The truth each test compares with: every example run alone through the unsegmented op.
"""

from __future__ import annotations

import pytest
import torch

from megamlm.ops import CpuOps, Linear, Segments, TorchOps, cpu_kernels

H, HEADS = 32, 4
LENGTHS = [5, 1, 9, 3, 16]

BACKENDS = [pytest.param(TorchOps(), id="torch")]
if cpu_kernels.available():
    BACKENDS.append(pytest.param(CpuOps(), id="cpu-kernels"))


def _qkv(seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(H, 3 * H)
    torch.nn.init.normal_(lin.weight, std=0.3)
    torch.nn.init.normal_(lin.bias, std=0.1)
    return lin


def test_segments_validate_and_give_positions():
    s = Segments.from_lengths([3, 1, 2])
    assert s.cu_seqlens.tolist() == [0, 3, 4, 6] and s.max_seqlen == 3
    assert s.position_ids().tolist() == [0, 1, 2, 0, 0, 1]
    with pytest.raises(ValueError):
        Segments(torch.tensor([0, 3, 3], dtype=torch.int32), 3)  # an empty segment
    with pytest.raises(ValueError):
        Segments(torch.tensor([1, 3], dtype=torch.int32), 2)  # does not start at 0
    with pytest.raises(ValueError):
        Segments(torch.tensor([0, 3, 5], dtype=torch.int32), 2)  # max_seqlen is not the longest


@pytest.mark.parametrize("ops", BACKENDS)
def test_each_segment_attends_as_if_alone(ops):
    qkv = _qkv()
    n = sum(LENGTHS)
    torch.manual_seed(1)
    x = torch.randn(1, n, H, requires_grad=True)
    seg = Segments.from_lengths(LENGTHS)
    y = ops.attention(qkv, x, HEADS, None, 0.0, segments=seg)
    assert y.shape == (1, n, H)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    gx, gw, gb = x.grad.clone(), qkv.weight.grad.clone(), qkv.bias.grad.clone()

    qkv.weight.grad = qkv.bias.grad = None
    xr = x.detach().clone().requires_grad_(True)
    outs, start = [], 0
    for L in LENGTHS:  # the reference: each example alone, through the torch op without segments
        outs.append(TorchOps().attention(qkv, xr[:, start:start + L], HEADS, None, 0.0))
        start += L
    ref = torch.cat(outs, dim=1)
    (ref * w).sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, xr.grad, atol=1e-5, rtol=1e-5)
    # the parameter gradients are sums over all 34 rows, in float32 and in another order per backend
    # and thread count (one thread: up to 1.8e-5 apart): 5e-5
    torch.testing.assert_close(gw, qkv.weight.grad, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(gb, qkv.bias.grad, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("ops", BACKENDS)
def test_dropout_stays_inside_each_segment(ops):
    qkv = _qkv()
    n = sum(LENGTHS)
    seg = Segments.from_lengths(LENGTHS)
    torch.manual_seed(2)
    x = torch.randn(1, n, H)
    x2 = x.clone()
    x2[:, 6:15] += 5.0  # the third example only
    torch.manual_seed(3)
    y = ops.attention(qkv, x, HEADS, None, 0.3, segments=seg)
    torch.manual_seed(3)
    y2 = ops.attention(qkv, x2, HEADS, None, 0.3, segments=seg)
    assert torch.isfinite(y).all()
    keep = torch.ones(n, dtype=torch.bool)
    keep[6:15] = False
    torch.testing.assert_close(y[:, keep], y2[:, keep], atol=0, rtol=0)  # the others never see it
    assert not torch.allclose(y[:, ~keep], y2[:, ~keep])


@pytest.mark.skipif(not cpu_kernels.attention_available(), reason="the CPU attention kernel is not built here")
def test_a_batch_is_the_packed_kernel_with_equal_segments():
    """One kernel: a [B, T] batch and the same rows as B packed segments of T give the same outputs,
    gradients and dropout (probabilities at the same places of the stream), bit for bit."""
    B, T, nh = 3, 7, 4
    torch.manual_seed(4)
    qkv, bias, gy = torch.randn(B, T, 3 * H), torch.randn(3 * H), torch.randn(B, T, H)
    y, probs = cpu_kernels.attention_forward(qkv, None, nh, 0.3, 11, bias)
    g, gb = cpu_kernels.attention_backward(gy, qkv, probs, nh, 0.3, 11, bias, bias_grad=True)
    cu = Segments.from_lengths([T] * B).cu_seqlens
    ys, ps = cpu_kernels.attention_segments_forward(qkv.view(B * T, -1), cu, T, nh, 0.3, 11, bias)
    gs, gbs = cpu_kernels.attention_segments_backward(gy.view(B * T, -1), qkv.view(B * T, -1), ps, cu, T, nh,
                                                      0.3, 11, bias, bias_grad=True)
    assert torch.equal(ys, y.view(B * T, -1)) and torch.equal(ps, probs.flatten())
    assert torch.equal(gs, g.view(B * T, -1)) and torch.equal(gbs, gb)
    assert probs.shape == (nh, B, T, T)
    assert not torch.allclose(y, cpu_kernels.attention_forward(qkv, None, nh, 0.0, 11, bias)[0])  # dropout ran


@pytest.mark.parametrize("ops", BACKENDS)
def test_a_mask_with_segments_is_refused(ops):
    seg = Segments.from_lengths([2, 2])
    with pytest.raises(ValueError):
        ops.attention(_qkv(), torch.randn(1, 4, H), HEADS, torch.ones(1, 1, 1, 4, dtype=torch.bool), 0.0,
                      segments=seg)


ENC_LENGTHS = [7, 1, 12, 16, 4]  # 16 = model.max_position_embeddings


def _encoder(ops, norm_position: str = "post"):
    from megamlm import ops as ops_layer
    from megamlm.model.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(vocab_size=50, hidden_size=H, num_layers=2, num_heads=HEADS, ffn_size=64,
                  max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, norm_position=norm_position)
    return ops_layer.use(enc, ops)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("ops", BACKENDS)
def test_a_packed_stream_through_the_encoder_equals_each_example_alone(ops, norm_position):
    enc = _encoder(ops, norm_position)
    torch.manual_seed(4)
    ids = [torch.randint(4, 50, (1, L)) for L in ENC_LENGTHS]
    types = [torch.randint(0, 2, (1, L)) for L in ENC_LENGTHS]
    seg = Segments.from_lengths(ENC_LENGTHS)
    packed = enc(torch.cat(ids, 1), torch.cat(types, 1), segments=seg)  # [1, N, H]
    w = torch.randn_like(packed)
    (packed * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    alone, start = [], 0
    for i, t, L in zip(ids, types, ENC_LENGTHS):
        h = enc(i, t)  # [1, L, H]: the example as its own batch, no padding
        (h * w[:, start:start + L]).sum().backward()  # gradients add up over the examples
        alone.append(h)
        start += L
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    for n, p in enc.named_parameters():  # a sum over every token: fp32 rounding relative to its largest entry
        scale = max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6 * scale, rtol=1e-5, msg=n)


def test_the_encoder_refuses_bad_packed_input():
    enc = _encoder(TorchOps())
    ids = torch.randint(4, 50, (1, 6))
    seg = Segments.from_lengths([2, 4])
    with pytest.raises(ValueError, match="attention_mask=None"):
        enc(ids, attention_mask=torch.ones(1, 6, dtype=torch.bool), segments=seg)
    with pytest.raises(ValueError, match="cover 6 tokens"):
        enc(torch.randint(4, 50, (1, 7)), segments=seg)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        enc(torch.randint(4, 50, (1, 20)), segments=Segments.from_lengths([17, 3]))
    with pytest.raises(ValueError, match="one row"):
        enc(torch.randint(4, 50, (2, 3)), segments=Segments.from_lengths([3]))


def test_the_torch_backend_builds_the_padded_index_once_per_micro_batch():
    """Every layer of a forward shares the index built by the first (segments.cache); a second forward on the
    same segments reuses it and gives the same result, and so does a fresh Segments (the cache is no input)."""
    enc = _encoder(TorchOps())
    torch.manual_seed(5)
    ids = torch.randint(4, 50, (1, sum(ENC_LENGTHS)))
    types = torch.zeros_like(ids)
    seg = Segments.from_lengths(ENC_LENGTHS)
    with torch.no_grad():
        first = enc(ids, types, segments=seg)
        assert list(seg.cache) == [("padded", ids.shape[1], torch.float32)]
        built = seg.cache[("padded", ids.shape[1], torch.float32)]
        again = enc(ids, types, segments=seg)
        assert seg.cache[("padded", ids.shape[1], torch.float32)] is built
        fresh = enc(ids, types, segments=Segments.from_lengths(ENC_LENGTHS))
    assert torch.equal(first, again) and torch.equal(first, fresh)
    assert "cache" not in repr(seg)
