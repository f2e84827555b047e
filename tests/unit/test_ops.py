"""The ops layer (megamlm/ops): choosing a backend, and every backend against the torch backend, op by op
and for the whole pretraining step (forward, backward, optimizer step).

A failure here points at megamlm/ops/ (cpu.py: which kernel serves a call; torch_ops.py: the reference;
__init__.py: select) or at a model module that calls an op with the wrong arguments.
"""

import pytest
import torch

from megamlm import ops
from megamlm.bench import random_batch
from megamlm.config import ModelConfig, ObjectiveConfig
from megamlm.model import build_model
from megamlm.ops import cpu_kernels

V = 97


def backends():
    """(id, backend, kernels on) for every backend this machine has: torch, the CPU backend with its
    compiled kernels (where a C compiler exists) and the CPU backend without them (its fallbacks)."""
    out = [("torch", ops.TorchOps(), True), ("cpu-fallbacks", ops.CpuOps(), False)]
    if cpu_kernels.available():
        out.insert(1, ("cpu", ops.CpuOps(), True))
    return out


BACKENDS = backends()


@pytest.fixture(params=BACKENDS, ids=[b[0] for b in BACKENDS])
def backend(request):
    name, b, kernels_on = request.param
    previous = cpu_kernels.set_enabled(kernels_on)
    yield b
    cpu_kernels.set_enabled(previous)


def test_select_picks_says_and_refuses_with_the_key():
    assert isinstance(ops.select("auto", "cpu")[0], ops.CpuOps)
    b, said = ops.select("auto", "cuda")
    assert isinstance(b, ops.TorchOps) and not isinstance(b, ops.CpuOps) and said == "torch (auto: cuda device)"
    assert type(ops.select("torch", "cpu")[0]) is ops.TorchOps
    assert "bfloat16 calls take the torch ops" in ops.select("auto", "cpu", torch.bfloat16)[1]
    with pytest.raises(ValueError, match="engine.kernels=cpu: the CPU kernels run on the CPU, and this run trains on cuda"):
        ops.select("cpu", "cuda")
    with pytest.raises(ValueError, match="engine.kernels='fast'; choose one of auto, torch, cpu"):
        ops.select("fast", "cpu")
    previous = cpu_kernels.set_enabled(False)
    try:
        with pytest.raises(ValueError, match=r"engine.kernels=cpu: the CPU kernels cannot be built here \(turned off"):
            ops.select("cpu", "cpu")
        b, said = ops.select("auto", "cpu")  # auto never fails: the CPU backend's fallbacks
        assert isinstance(b, ops.CpuOps) and "compiled kernels unavailable" in said
    finally:
        cpu_kernels.set_enabled(previous)
    if cpu_kernels.available():
        assert ops.select("cpu", "cpu")[1].startswith("cpu (compiled, ")


def test_use_reaches_every_module_that_calls_an_op():
    model = build_model(tiny_cfg(), ObjectiveConfig(), 128)
    assert ops.backend_of(model) is ops.DEFAULT
    t = ops.TorchOps()
    ops.use(model, t)
    users = [m for m in model.modules() if hasattr(m, "ops")]
    assert len(users) > 8 and all(m.ops is t for m in users) and ops.backend_of(model) is t


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position_embeddings=64,
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _step(model, batch):
    """One pretraining step: loss = combine(terms, the batch's counts), backward, a plain SGD step (AdamW's
    first step is the sign of each gradient: it would turn rounding noise around 0 into ±lr); returns the
    loss, the gradients and the updated weights."""
    from megamlm.objectives import combine

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad(set_to_none=True)
    loss = combine(model(batch), int(batch.mlm_positions.numel()), batch.input_ids.shape[0])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("padded", [False, True])
def test_the_whole_pretraining_step_on_every_backend_equals_the_torch_backend(backend, norm, padded):
    """The same weights and batch, dropout 0: loss, every gradient and the weights after one optimizer step
    of the backend equal the torch backend's (fp32 tolerances: the kernels sum in another order)."""
    torch.manual_seed(0)
    ref_model = build_model(tiny_cfg(norm_position=norm), ObjectiveConfig(), 128, real_vocab_size=V)
    model = build_model(tiny_cfg(norm_position=norm), ObjectiveConfig(), 128, real_vocab_size=V)
    model.load_state_dict(ref_model.state_dict())
    ops.use(ref_model, ops.TorchOps())
    ops.use(model, backend)
    batch = random_batch(4, 16, V, mlm_probability=0.3, padding=padded, seed=2)
    loss, grads, weights = _step(model.train(), batch)
    ref_loss, ref_grads, ref_weights = _step(ref_model.train(), batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=2e-5, rtol=1e-4, msg=n)
        torch.testing.assert_close(weights[n], ref_weights[n], atol=2e-5, rtol=1e-4, msg=n)


def test_training_with_dropout_on_every_backend_is_finite_and_seeded(backend):
    """Dropout on (every op's random path runs): a finite loss and gradients, the same loss for the same
    torch seed, another for another seed."""
    def run(seed):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(dropout=0.2, attention_dropout=0.2), ObjectiveConfig(), 128, real_vocab_size=V)
        ops.use(model, backend)
        torch.manual_seed(seed)
        loss, grads, _ = _step(model.train(), random_batch(4, 16, V, mlm_probability=0.3, padding=True, seed=2))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
        return float(loss)

    assert run(1) == run(1) != run(2)


@pytest.mark.parametrize("op", ["dropout_add", "linear_act", "attention", "projection_residual_norm"])
def test_each_op_equals_the_torch_op(backend, op):
    """Each block op of the backend, on its own: output and input / parameter gradients of the torch op
    (p tiny: every element kept, so the masks agree whatever stream each backend draws)."""
    torch.manual_seed(0)
    B, T, H, nh = 3, 9, 32, 4
    lin, lin3, norm = ops.Linear(H, H), ops.Linear(H, 3 * H), ops.LayerNorm(H, eps=1e-12)
    with torch.no_grad():
        for prm in (*lin.parameters(), *lin3.parameters(), *norm.parameters()):
            prm.add_(torch.randn_like(prm) * 0.1)
    x = torch.randn(B, T, H)
    r = torch.randn(B, T, H)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    am = mask[:, None, None, :]
    p = 1e-9
    calls = {"dropout_add": lambda o, x, r: o.dropout_add(x, r, p, True),
             "linear_act": lambda o, x, r: o.linear_act(lin, x, "gelu"),
             "attention": lambda o, x, r: o.attention(lin3, x, nh, am, p),
             "projection_residual_norm": lambda o, x, r: o.projection_residual_norm(lin, x, r, norm, p, True)}

    def run(o):
        xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        for m in (lin, lin3, norm):
            m.zero_grad(set_to_none=True)
        y = calls[op](o, xi, ri)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        prm = {f"{k}.{n}": q.grad.clone() for k, m in (("lin", lin), ("lin3", lin3), ("norm", norm))
               for n, q in m.named_parameters() if q.grad is not None}
        return y.detach(), xi.grad, ri.grad, prm

    got, want = run(backend), run(ops.TorchOps())
    for a, b, what in zip(got[:3], want[:3], ("output", "x grad", "residual grad")):
        if b is None:
            assert a is None, what
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=what)
    assert got[3].keys() == want[3].keys()
    for n in want[3]:
        torch.testing.assert_close(got[3][n], want[3][n], atol=2e-5, rtol=1e-4, msg=n)


def test_the_torch_backend_compiles_and_equals_eager():
    """What runs on CUDA, checked here on the CPU: the torch backend's model under torch.compile gives the
    eager loss and gradients (dropout 0)."""
    from megamlm.objectives import combine

    torch.manual_seed(0)
    model = build_model(tiny_cfg(num_layers=1), ObjectiveConfig(), 128, real_vocab_size=V)
    compiled = build_model(tiny_cfg(num_layers=1), ObjectiveConfig(), 128, real_vocab_size=V)
    compiled.load_state_dict(model.state_dict())
    ops.use(model, ops.TorchOps())
    ops.use(compiled, ops.TorchOps())
    batch = random_batch(2, 8, V, mlm_probability=0.3, seed=4)
    eager_loss, eager_grads, _ = _step(model.train(), batch)

    fwd = torch.compile(compiled.train(), dynamic=False)
    loss = combine(fwd(batch), int(batch.mlm_positions.numel()), batch.input_ids.shape[0])
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager_loss, atol=1e-5, rtol=1e-5)
    for n, q in compiled.named_parameters():
        torch.testing.assert_close(q.grad, eager_grads[n], atol=2e-5, rtol=1e-4, msg=n)


def test_the_loss_chunks_rows_for_a_cache_on_the_cpu_and_for_few_launches_elsewhere():
    from megamlm.ops.cross_entropy import CHUNK_BYTES, DEVICE_CHUNK_BYTES, chunk_rows

    cpu, dev = torch.empty(0), torch.empty(0, device="meta")
    assert chunk_rows(cpu, 30522) == CHUNK_BYTES // (4 * 30522) == 34
    assert chunk_rows(dev, 30522) == DEVICE_CHUNK_BYTES // (4 * 30522) == 2198  # BERT-base's ~5k masked rows: 3 chunks
    assert chunk_rows(cpu, 10 ** 9) == chunk_rows(dev, 10 ** 9) == 1
