"""The CPU backend (megamlm/ops: cpu.py, cpu_functions.py, cpu_dropout.py, cpu_kernels.c/.py, kernel_build.py):
the compiled kernels (dropout masks generated from a seed and the element index; bias + GELU; the
residual LayerNorm; attention tile by tile) against their torch specification, bit for bit or within
stated tolerances, the autograd functions on both paths (kernels and the numpy-drawn fallback), the
backend's fused paths against the torch backend, the build cache, and the fallback when no C compiler
exists. The whole-step comparison over every backend is tests/unit/test_ops.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megamlm.bench import random_batch
from megamlm.config import ObjectiveConfig
from megamlm.model import build_model
from megamlm.ops import cpu_kernels, kernel_build
from megamlm.ops.cpu_dropout import _keep_mask, _random_bits, dropout, dropout_add

from tests.unit.test_encoder import V, tiny_cfg

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
    from megamlm.ops import cpu_kernels
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
        from megamlm.ops import cpu_kernels, kernel_build
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
    """The FFN's first layer through the CPU backend's ``linear_act`` (mm, then bias + GELU in one kernel,
    inside the linear's call) or its fallback: the same output and gradients as nn.Linear followed by
    F.gelu; other activations never take the kernel."""
    from megamlm.ops import CpuOps, Linear

    torch.manual_seed(0)
    layer = Linear(16, 40)
    ref = torch.nn.Linear(16, 40)
    ref.load_state_dict(layer.state_dict())  # same keys: an nn.Linear
    x = torch.randn(3, 7, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ops = CpuOps()
    y, y_ref = ops.linear_act(layer, x, "gelu"), torch.nn.functional.gelu(ref(x_ref))
    assert (type(y.grad_fn).__name__ == "BiasGeluBackward") == kernels
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=2e-5, rtol=1e-5)
    assert type(ops.linear_act(layer, x, "gelu_tanh").grad_fn).__name__ != "BiasGeluBackward"


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
    """A post-LN block in training with dropout on the CPU backend (the fused residual LayerNorms, the
    projection biases folded into the kernel) gives the torch backend's output and gradients when both see
    the same masks (p tiny: everything kept, so the masks agree whatever stream each path draws)."""
    from megamlm import ops
    from megamlm.model.encoder import Block

    torch.manual_seed(0)
    block = Block(32, 4, 64, 1e-12, 1e-9, 1e-9, "gelu", pre_norm=False).train()
    with torch.no_grad():
        for prm in block.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)  # non-trivial biases and LayerNorm affine
    x = torch.randn(3, 9, 32)

    def run(backend):
        ops.use(block, backend)
        xi = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        y = block(xi, None)
        y.backward(torch.ones_like(y) / y.numel() + torch.linspace(0, 1, y.numel()).view_as(y))
        names, todo = set(), [y.grad_fn]
        while todo:
            fn = todo.pop()
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions if f is not None)
        return y.detach(), xi.grad, {n: prm.grad.clone() for n, prm in block.named_parameters()}, names

    y1, gx1, g1, names = run(ops.CpuOps())
    y2, gx2, g2, _ = run(ops.TorchOps())
    torch.testing.assert_close(y1, y2, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=2e-6, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=5e-6, rtol=1e-5, msg=n)
    assert ("ResidualLayerNormBackward" in names) == kernels, names


def test_fused_paths_stay_off_for_zero3_parameters():
    """Parameters DeepSpeed ZeRO-3 manages (they carry ds_id) are gathered only inside their own module's
    call: the CPU backend's paths that read one outside it (the decoder bias in the loss, a projection
    bias in the residual LayerNorm or in the attention kernel, the tied-gradient hand-off) are not taken
    for them, and the loss and gradients stay the same."""
    from megamlm.bench import random_batch
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64,
                                    dropout=1e-9, attention_dropout=1e-9), ObjectiveConfig(), 128).train()
    block, dec = model.encoder.layers[0], model.mlm_head.decoder
    batch = random_batch(3, 10, 128, mlm_probability=0.4, seed=3)

    def graph():
        """The backward graph's node names, and the parameters each fused node reads directly."""
        model.zero_grad(set_to_none=True)
        loss = model(batch).loss_sum["mlm"]
        loss.backward()
        names, reads, todo = set(), {}, [loss.grad_fn]
        while todo:
            fn = todo.pop()
            name = type(fn).__name__
            names.add(name)
            reads.setdefault(name, set()).update(id(f.variable) for f, _ in fn.next_functions
                                                 if f is not None and hasattr(f, "variable"))
            todo.extend(f for f, _ in fn.next_functions if f is not None)
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, names, reads

    loss, grads, names, reads = graph()
    if cpu_kernels.available():
        assert {"ResidualLayerNormBackward", "TiedLookupBackward", "LinearInWorkspaceBackward"} <= names, names
        assert id(dec.bias) in reads["CrossEntropyBackward"]  # the bias added inside the loss
        assert id(block.attn.out.bias) in reads["ResidualLayerNormBackward"]  # folded into the norm's kernel
    if cpu_kernels.attention_available():
        assert id(block.attn.qkv.bias) in reads["TileAttentionBackward"]
    for prm in (dec.bias, block.attn.out.bias, model.encoder.embeddings.word_embeddings.weight, block.attn.qkv.bias):
        prm.ds_id = 0  # what deepspeed.zero.Init puts on every parameter it partitions
    try:
        loss3, grads3, names3, reads3 = graph()
    finally:
        for prm in (dec.bias, block.attn.out.bias, model.encoder.embeddings.word_embeddings.weight,
                    block.attn.qkv.bias):
            del prm.ds_id
    assert "TiedLookupBackward" not in names3, names3
    assert id(block.attn.out.bias) not in reads3.get("ResidualLayerNormBackward", set())
    assert id(dec.bias) not in reads3.get("CrossEntropyBackward", set())
    assert id(block.attn.qkv.bias) not in reads3.get("TileAttentionBackward", set())
    torch.testing.assert_close(loss3, loss, atol=1e-5, rtol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads3[n], grads[n], atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------- attention with dropout; the tied vocabulary

@pytest.mark.parametrize("kernels", [True, False], ids=["kernel-mask", "stored-mask"])
@pytest.mark.parametrize("padded", [False, True])
def test_cpu_attention_matches_reference_with_same_dropout_mask(padded, kernels):
    """_CPUAttention (per-head strided gemms, hand-written backward) equals autograd through the plain
    formula softmax(q kᵀ/√d + mask)·keep·v with the mask it used, in output and in the qkv gradient:
    the compiled kernels' stream (regenerated in backward) or the stored numpy-drawn mask."""
    from megamlm.ops import cpu_kernels
    from megamlm.ops.cpu_dropout import _keep_mask
    from megamlm.ops.cpu_functions import CPUAttention as _CPUAttention

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
    from megamlm.ops import cpu_kernels
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
    assert ("TileAttentionBackward" if tile else "CPUAttentionBackward") in names, names
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
    from megamlm.ops.cpu_functions import CPUAttention as _CPUAttention, TileAttention as _TileAttention

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
    """The CPU backend's training forward (the logits in a reused workspace, the decoder's bias added
    inside the loss, the tied weight's decoder gradient handed to the word-embedding lookup through a
    TiedGrad) gives the torch backend's loss and gradients (plain F.linear decoder and embedding, autograd
    summing the two); the workspace is reused step after step, but not while a pending graph holds it
    (two forwards, then one backward of their sum: still the right gradients). The padded vocabulary
    rows get zero gradient from both."""
    from megamlm import ops
    from megamlm.objectives import combine

    def grads(model, batches):
        model.zero_grad(set_to_none=True)
        loss = sum(combine(model(b), int(b.mlm_positions.numel()), b.input_ids.shape[0]) for b in batches)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model = build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=V)
    b1 = random_batch(3, 12, V, mlm_probability=0.4, seed=1)
    b2 = random_batch(3, 12, V, mlm_probability=0.4, seed=2)
    cpu = ops.CpuOps()

    def reference(batches):  # the same model on the torch backend
        ops.use(model, ops.TorchOps())
        try:
            return grads(model, batches)
        finally:
            ops.use(model, cpu)

    ops.use(model, cpu)
    for batches in ([b1], [b2], [b1, b2]):
        loss, g = grads(model, batches)
        ref_loss, ref_g = reference(batches)
        torch.testing.assert_close(loss, ref_loss)
        for n in g:
            torch.testing.assert_close(g[n], ref_g[n], msg=n)
        word = g["encoder.embeddings.word_embeddings.weight"]
        assert float(word[V:].abs().max()) == 0 and float(word[:V].abs().max()) > 0
    if not cpu_kernels.available():
        return
    grads(model, [b1])
    ws = cpu.workspace.buf
    grads(model, [b1])
    assert cpu.workspace.buf is ws  # free after the backward: reused
    held = model(b1)  # its graph holds the workspace
    model(b2)  # so this forward takes a new one
    assert cpu.workspace.buf is not ws
    del held


def test_a_stale_tied_hand_off_is_never_taken():
    """A grad-enabled lookup that no decoder loss follows (``logits()``) leaves a hand-off behind; the next
    forward's lookup clears it, so a decoder loss over an encoder run without grad (the heads trained
    alone) returns its weight gradient itself instead of leaving it in the stale TiedGrad."""
    from megamlm import ops

    def head_grad(backend):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(vocab_size=128), ObjectiveConfig(), 128, real_vocab_size=V)
        ops.use(model, backend)
        b1 = random_batch(3, 12, V, mlm_probability=0.4, seed=1)
        b2 = random_batch(3, 12, V, mlm_probability=0.4, seed=2)
        model.logits(b1)  # grad on: the lookup may register a hand-off that nothing takes
        with torch.no_grad():
            h = model.hidden(b2)
        per_row, _ = model.mlm_head(h, b2.mlm_positions, labels=b2.mlm_targets)
        per_row.sum().backward()
        return model.mlm_head.decoder.weight.grad

    got, want = head_grad(ops.CpuOps()), head_grad(ops.TorchOps())
    assert got is not None and float(got.abs().max()) > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
