"""Dropout on CPU: the compiled kernels (mask generated from a seed and the element index) against their
torch specification bit for bit, the autograd functions on both paths (kernels and the numpy-drawn
fallback), the build cache, and the fallback when no C compiler exists."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamlm.model import cpu_kernels, kernel_build
from megamlm.model.dropout import _keep_mask, _random_bits, dropout, dropout_add

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: kernels not built")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_mask_is_the_reference_stream_at_any_offset(dtype):
    """Chunks starting anywhere (not only at word boundaries), any length, seeds over the whole uint64
    range: kept exactly where keep_mask_reference says, scaled by exactly 1/(1-p) in the dtype."""
    for seed in (0, 12345, 2 ** 63 + 5, 2 ** 64 - 1):
        for start in (0, 1, 3, 5, 1000):
            for n in (1, 3, 8, 1001):
                x = torch.randn(n, dtype=dtype)
                y = cpu_kernels.dropout_mul(x, 0.3, seed, start)
                keep = cpu_kernels.keep_mask_reference(n, 0.3, seed, start)
                scale = torch.tensor(1 / 0.7, dtype=dtype)
                assert torch.equal(y, torch.where(keep, x * scale, torch.zeros((), dtype=dtype))), (seed, start, n)
    # a chunk of a stream equals the same elements of the whole
    whole = cpu_kernels.dropout_mul(torch.ones(4099, dtype=dtype), 0.5, 7)
    part = cpu_kernels.dropout_mul(torch.ones(1000, dtype=dtype), 0.5, 7, start=1234)
    assert torch.equal(part, whole[1234:2234])


@needs_kernels
def test_kernel_on_openmp_threads_equals_one_thread_and_holds_the_rate():
    """Large calls run on torch's OpenMP threads (the kernels link the libgomp torch loaded): the same
    result as one thread, at any thread count."""
    n = (1 << 20) + 4099  # odd length, many blocks
    x, r = torch.randn(n), torch.randn(n)
    keep = cpu_kernels.keep_mask_reference(n, 0.1, 99)
    expected = r + torch.where(keep, x * torch.tensor(1 / 0.9), torch.zeros(()))
    threads, default_words = torch.get_num_threads(), cpu_kernels.set_parallel_words(1)
    first = None
    try:
        for t, words in ((2, 1), (2, 1 << 40), (1, 1), (3, 1)):
            torch.set_num_threads(t)
            cpu_kernels.set_parallel_words(words)
            out = cpu_kernels.dropout_add(x, r, 0.1, 99)
            first = out if first is None else first
            assert torch.equal(out, first), (t, words)  # bit-identical at any thread count
            torch.testing.assert_close(out, expected)  # r + x·k may be one fused multiply-add
            y = x.clone()
            cpu_kernels.dropout_mul(y, 0.1, 99, out=y)
            assert torch.equal(y, torch.where(keep, x * torch.tensor(1 / 0.9), torch.zeros(()))), (t, words)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.set_parallel_words(default_words)
    assert abs(float(keep.float().mean()) - 0.9) < 0.002
    if cpu_kernels.uses_openmp():  # the kernels' OpenMP runtime is torch's (its thread pool)
        ours = kernel_build.library_of(cpu_kernels._lib.megamlm_omp_symbol())
        assert ours in {os.path.realpath(p) for p in kernel_build.openmp_runtimes()}, ours
        assert kernel_build.shares_torch_openmp(cpu_kernels._lib)
    for i in range(64):  # every bit position of the words is fair
        bits = cpu_kernels._mix64(torch.arange(1, 1 << 14, dtype=torch.int64) * (cpu_kernels._GOLDEN - (1 << 64)))
        assert abs(float(((bits >> i) & 1).float().mean()) - 0.5) < 0.02


@needs_kernels
def test_kernel_in_place_and_bad_arguments():
    x = torch.randn(100)
    expected = cpu_kernels.dropout_mul(x, 0.2, 3)
    y = x.clone()
    assert cpu_kernels.dropout_mul(y, 0.2, 3, out=y) is y and torch.equal(y, expected)
    with pytest.raises(ValueError, match="contiguous float32/float64"):
        cpu_kernels.dropout_mul(torch.randn(10, 10).t(), 0.1, 0)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_kernels.dropout_mul(torch.randn(10).bfloat16(), 0.1, 0)
    with pytest.raises(ValueError, match="does not match"):
        cpu_kernels.dropout_add(torch.randn(10), torch.randn(11), 0.1, 0)
    with pytest.raises(ValueError, match="probability 1.0"):
        cpu_kernels.dropout_mul(x, 1.0, 0)


def test_dropout_rate_scale_gradient_and_seed(kernels):
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d/dx of x·mask/(1-p) is mask/(1-p): the same mask
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(1)
    a = dropout(x, 0.3, True)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.3, True))  # follows torch's seed
    assert not torch.equal(a, dropout(x, 0.3, True))  # and moves it on
    grad_fn = type(a.grad_fn).__name__
    assert grad_fn == ("_KernelDropoutBackward" if kernels else "_CPUDropoutBackward"), grad_fn


def test_dropout_add_is_residual_plus_dropout_with_the_same_mask(kernels):
    torch.manual_seed(0)
    x = torch.randn(4, 33, 16, requires_grad=True)
    r = torch.randn(4, 33, 16, requires_grad=True)
    g = torch.randn(4, 33, 16)
    torch.manual_seed(7)
    out = dropout_add(x, r, 0.25, True)
    out.backward(g)
    dropped = out.detach() - r.detach()
    keep = dropped != 0
    assert 0.65 < keep.float().mean().item() < 0.85
    torch.testing.assert_close(dropped[keep], x.detach()[keep] / 0.75)
    torch.testing.assert_close(x.grad, torch.where(keep, g / 0.75, torch.zeros(())))
    torch.testing.assert_close(r.grad, g)
    if kernels:  # one pass, and the stream is the reference one seeded by one draw of the global generator
        assert type(out.grad_fn).__name__ == "_KernelDropoutAddBackward"
        torch.manual_seed(7)
        ref = cpu_kernels.keep_mask_reference(x.numel(), 0.25, cpu_kernels.draw_seed()).view_as(keep)
        assert torch.equal(ref, keep)
    assert torch.equal(dropout_add(x, r, 0.25, False), x + r)


def test_numpy_bits_two_streams_fixed_by_the_seed():
    """The fallback's bits: large draws in two halves at once (two SFC64 streams seeded from the global
    generator), fixed by torch.manual_seed, different halves, the rate holds in each."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.manual_seed(3)
        a = _random_bits(1 << 18)
        assert len(a) == 2 and sum(t.numel() for t in a) == 1 << 18
        torch.manual_seed(3)
        b = _random_bits(1 << 18)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[0], a[1])
        assert not torch.equal(a[0], _random_bits(1 << 18)[0])  # the global generator moved on
        torch.manual_seed(3)
        (small,) = _random_bits(1000)
        torch.manual_seed(3)
        assert small.numel() == 1000 and torch.equal(small, _random_bits(1000)[0])
        torch.manual_seed(4)
        keep = _keep_mask((4 << 18,), 0.25)  # 4 elements per word: both halves of the bits
        for part in keep.chunk(2):
            assert abs(float((part == 0).float().mean()) - 0.25) < 0.003
        torch.testing.assert_close(keep[keep != 0], torch.full_like(keep[keep != 0], 1 / 0.75))
        odd = _keep_mask((3, 5, 7), 0.5)  # n not a multiple of 4: the last word is partly used
        assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}
        words = torch.cat(_random_bits(1 << 16))
        ones = torch.stack([((words >> i) & 1).float().mean() for i in range(64)])
        assert float((ones - 0.5).abs().max()) < 0.01
    finally:
        torch.set_num_threads(threads)


_LOAD = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megamlm.model import cpu_kernels
    from megamlm.model.encoder import Encoder
    print("available", cpu_kernels.available())
    enc = Encoder(50, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32).train()
    enc(torch.randint(0, 50, (2, 5))).sum().backward()  # trains either way
    print("trained")
""")


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: nothing to build")
def test_kernels_built_once_into_the_cache_then_reused(tmp_path):
    env = dict(os.environ, MEGAMLM_KERNEL_DIR=str(tmp_path / "k"))
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "available True" in res.stdout and "trained" in res.stdout
        built = sorted(p.name for p in (tmp_path / "k").iterdir())
        assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so"), built


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: nothing to build")
def test_kernels_first_loaded_under_bf16_autocast():
    """The first kernel call may come from a bf16-autocast forward (the bench's bf16 model): loading,
    including the sgemm self-test, is not affected by autocast (it once failed there, silently
    dropping every kernel for the run)."""
    code = textwrap.dedent("""
        import torch
        from megamlm.model import cpu_kernels, kernel_build
        with torch.autocast("cpu", dtype=torch.bfloat16):
            print("available", cpu_kernels.available(), cpu_kernels.attention_available() == bool(kernel_build.torch_sgemm()))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "available True True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "unavailable" not in res.stderr and "self-test" not in res.stderr, res.stderr[-2000:]


def test_without_a_compiler_the_model_falls_back_with_a_warning(tmp_path):
    env = dict(os.environ, MEGAMLM_KERNEL_DIR=str(tmp_path / "k"), CC="/nonexistent/cc", PATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "available False" in res.stdout and "trained" in res.stdout
    assert "kernels unavailable (no C compiler found" in res.stderr
    env = dict(os.environ, MEGAMLM_CPU_KERNELS="0")  # switched off
    res = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "available False" in res.stdout, res.stderr[-2000:]


# ------------------------------------------------------------------------------------ bias + GELU

@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_bias_gelu_kernel_matches_torch(dtype, tol):
    """gelu(a + b), its derivative from the same pass, and the backward (grad · derivative and the bias
    gradient) against torch's exact GELU and gelu_backward, over a wide range of inputs (the tails
    included), with and without a bias; float64 uses libm's erf (near exact)."""
    torch.manual_seed(0)
    a = torch.cat([torch.linspace(-12, 12, 2401, dtype=dtype), torch.randn(599, dtype=dtype) * 3]).view(100, 30)
    b = torch.randn(30, dtype=dtype)
    g = torch.randn(100, 30, dtype=dtype)
    for bias in (b, None):
        z = a + bias if bias is not None else a
        torch.testing.assert_close(cpu_kernels.bias_gelu(a, bias), torch.nn.functional.gelu(z), atol=tol, rtol=tol)
        out, deriv = cpu_kernels.bias_gelu(a, bias, derivative=True)
        assert torch.equal(out, cpu_kernels.bias_gelu(a, bias))
        torch.testing.assert_close(deriv, torch.ops.aten.gelu_backward(torch.ones_like(z), z), atol=tol, rtol=tol)
        grad_a, grad_b = cpu_kernels.mul_colsum(g, deriv, colsum=bias is not None)
        assert torch.equal(grad_a, g * deriv)
        ref = torch.ops.aten.gelu_backward(g, z)
        torch.testing.assert_close(grad_a, ref, atol=tol, rtol=tol)
        if bias is None:
            assert grad_b is None
        else:
            torch.testing.assert_close(grad_b, ref.sum(0), atol=50 * tol, rtol=tol)
    y = a.clone()
    assert cpu_kernels.bias_gelu(y, b, out=y) is y  # in place
    torch.testing.assert_close(y, torch.nn.functional.gelu(a + b), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="last dimension 30"):
        cpu_kernels.bias_gelu(a, torch.zeros(31, dtype=dtype))


@needs_kernels
def test_bias_gelu_bias_grad_on_openmp_threads():
    """Column sums from several threads (double per thread) equal one thread's, and torch's sum."""
    torch.manual_seed(1)
    d, g = torch.randn(4096, 300), torch.randn(4096, 300)
    threads, words = torch.get_num_threads(), cpu_kernels.set_parallel_words(1)
    try:
        torch.set_num_threads(3)
        many = cpu_kernels.mul_colsum(g, d)
        cpu_kernels.set_parallel_words(1 << 40)
        one = cpu_kernels.mul_colsum(g, d)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels.set_parallel_words(words)
    assert torch.equal(many[0], one[0])
    torch.testing.assert_close(many[1], one[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(many[1], many[0].double().sum(0).float(), atol=1e-5, rtol=1e-6)


def test_linear_gelu_fused_equals_linear_then_gelu(kernels):
    """The FFN's first layer: fused (mm, then bias + GELU in one kernel) or not, the same output and
    gradients as nn.Linear followed by F.gelu; other activations never take the kernel."""
    from megamlm.model.fused import LinearGelu

    torch.manual_seed(0)
    layer = LinearGelu(16, 40, "gelu")
    ref = torch.nn.Linear(16, 40)
    ref.load_state_dict(layer.state_dict())  # same keys: an nn.Linear
    x = torch.randn(3, 7, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), torch.nn.functional.gelu(ref(x_ref))
    assert (type(y.grad_fn).__name__ == "_BiasGeluBackward") == kernels
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=2e-5, rtol=1e-5)
    tanh = LinearGelu(16, 40, "gelu_tanh")
    assert type(tanh(x).grad_fn).__name__ != "_BiasGeluBackward"


# --------------------------------------------------------- post-LN residual: LayerNorm(r + dropout(x + b))

def _residual_ln_reference(x, bias, r, w, nb, eps, p, seed):
    keep = cpu_kernels.keep_mask_reference(x.numel(), p, seed).view_as(x)
    xb = x + bias if bias is not None else x
    z = r + torch.where(keep, xb / (1 - p), torch.zeros((), dtype=x.dtype))
    return torch.nn.functional.layer_norm(z, (x.shape[-1],), w, nb, eps), z


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-6)])
@pytest.mark.parametrize("cols", [36, 37])  # a multiple of 4 (word loop) and not (element by element)
def test_residual_layer_norm_kernel_matches_torch(dtype, tol, cols):
    """Forward and every gradient (x, bias, residual, LayerNorm weight and bias) against autograd
    through the torch formula with the reference mask; p = 0 keeps everything."""
    torch.manual_seed(0)
    rows, eps = 50, 1e-12
    x, r = torch.randn(rows, cols, dtype=dtype), torch.randn(rows, cols, dtype=dtype)
    b, w, nb = torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype)
    gy = torch.randn(rows, cols, dtype=dtype)
    for p, bias in ((0.3, b), (0.0, b), (0.3, None)):
        y, z, mean, rstd = cpu_kernels.residual_layer_norm(x, bias, r, w, nb, eps, p, 7)
        leaves = [t.clone().requires_grad_(True) for t in (x, b, r, w, nb)]
        y_ref, z_ref = _residual_ln_reference(leaves[0], leaves[1] if bias is not None else None, *leaves[2:],
                                              eps, p, 7)
        torch.testing.assert_close(z, z_ref.detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(y, y_ref.detach(), atol=tol, rtol=tol)
        y_ref.backward(gy)
        grads = cpu_kernels.residual_layer_norm_backward(gy, z, mean, rstd, w, p, 7, bias_grad=bias is not None)
        ref = [leaves[2].grad, leaves[0].grad, leaves[3].grad, leaves[4].grad, leaves[1].grad]
        for name, got, want in zip(("residual", "x", "weight", "norm bias", "bias"), grads, ref):
            if want is None:
                assert got is None, name
                continue
            torch.testing.assert_close(got, want, atol=20 * tol, rtol=tol, msg=name)


def test_post_ln_block_fused_equals_unfused(kernels):
    """A post-LN block in training with dropout: the fused residual LayerNorms (projection biases folded
    into the kernel) give the unfused block's output and gradients when both see the same masks (p
    tiny: everything kept, so the masks agree whatever stream each path draws)."""
    from megamlm.model.encoder import Block
    import megamlm.model.fused as fused

    torch.manual_seed(0)
    block = Block(32, 4, 64, 1e-12, 1e-9, 1e-9, "gelu", pre_norm=False).train()
    with torch.no_grad():
        for prm in block.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # non-trivial biases and LayerNorm affine
    x = torch.randn(3, 9, 32)

    def run():
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        y = block(xi, None)
        y.backward(torch.ones_like(y) / y.numel() + torch.linspace(0, 1, y.numel()).view_as(y))
        return y.detach(), xi.grad, {n: prm.grad.clone() for n, prm in block.named_parameters()}

    y1, gx1, g1 = run()
    original = fused.ResidualLayerNorm.fusable
    fused.ResidualLayerNorm.fusable = lambda self, t, bias: False
    try:
        y2, gx2, g2 = run()
    finally:
        fused.ResidualLayerNorm.fusable = original
    torch.testing.assert_close(y1, y2, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=2e-6, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=5e-6, rtol=1e-5, msg=n)
    x_in = x.clone().requires_grad_(True)
    names = set()
    todo = [block(x_in, None).grad_fn]
    while todo:
        fn = todo.pop()
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions if f is not None)
    assert ("_ResidualLayerNormBackward" in names) == kernels, names


def test_fused_paths_stay_off_for_zero3_parameters():
    """Parameters DeepSpeed ZeRO-3 manages (they carry ds_id) are gathered only inside their own module's
    call: the paths that read one outside it (the decoder bias in the loss, a projection bias in the
    residual LayerNorm or in the attention kernel, the tied-gradient hand-off) are not taken for them."""
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.model import build_model

    model = build_model(ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64),
                        ObjectiveConfig(), 128)
    block = model.encoder.layers[0]
    x = torch.randn(2, 5, 32)
    kernels_here = cpu_kernels.available()
    assert model._bias_in_loss() and block.attn_norm.fusable(x, block.attn.out.bias) == kernels_here
    assert model._tied_grad() is not None

    def attention_bias_folded():  # whether the qkv bias reached the tile attention kernel
        todo = [block.attn.train()(x, None).grad_fn]
        while todo:  # search the backward graph
            fn = todo.pop()
            if fn.name() == "_TileAttentionBackward":
                return any(getattr(f, "variable", None) is block.attn.qkv.bias for f, _ in fn.next_functions if f)
            todo.extend(f for f, _ in fn.next_functions if f is not None)
        raise AssertionError("no tile attention in the graph")

    tile = cpu_kernels.attention_available()
    if tile:
        assert attention_bias_folded()
    for prm in (model.mlm_head.decoder.bias, block.attn.out.bias, model.encoder.embeddings.word_embeddings.weight,
                block.attn.qkv.bias):
        prm.ds_id = 0  # what deepspeed.zero.Init puts on every parameter it partitions
    assert not model._bias_in_loss() and not block.attn_norm.fusable(x, block.attn.out.bias)
    assert model._tied_grad() is None
    if tile:
        assert not attention_bias_folded()
