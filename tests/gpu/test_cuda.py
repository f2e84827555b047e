"""The CUDA path against the references the CPU suite uses: run by ``tools/gpu_check.sh`` on a machine with a
CUDA GPU, skipped elsewhere (CI has none). A failure names the CUDA piece: the torch backend's packed
attention (``varlen_attn`` in bf16, the gathered SDPA in fp32; megamlm/ops/torch_ops.py), the chunked
cross-entropy on the device (megamlm/ops/cross_entropy.py), the model's numerics against Hugging Face
``BertForPreTraining`` on the same GPU (TF32 off), or the ELECTRA sampler on the device.

Tolerances: fp32 on the GPU reduces in another order than the CPU, so 1e-4 where the CPU tests state 1e-5;
bf16 results are compared with the fp32 result of the same op, within bf16's resolution (2e-2 relative to
the tensor's scale).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

#: MEGAMLM_TEST_DEVICE=cpu runs them on the CPU (a check of the tests themselves)
DEV = os.environ.get("MEGAMLM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA GPU here (tools/gpu_check.sh runs these)")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: fp32 matmuls in full precision, as on the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_the_model_equals_hf_on_the_gpu():
    """Loss, MLM and pair logits, and every gradient of one training step, megamlm vs HF, fp32 on CUDA."""
    from tests.unit.test_hf_parity import assert_step_parity, make_pair

    ours, hf, b = make_pair(attn="sdpa")
    assert_step_parity(ours.to(DEV), hf.to(DEV), b.to(DEV, non_blocking=False), loss_atol=1e-5, grad_atol=1e-4)


def _encoder(dtype):
    from megamlm import ops as ops_layer
    from megamlm.model.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, ffn_size=128,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return ops_layer.use(enc, ops_layer.TorchOps()).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_packed_stream_equals_each_example_alone_on_the_gpu(dtype):
    """bf16 takes ``varlen_attn`` (flash over the packed rows) where this torch has it, fp32 the gathered
    SDPA; both against each example alone (unsegmented SDPA, no mask)."""
    from megamlm.ops import Segments

    lengths = [5, 1, 33, 3, 64, 17]
    enc = _encoder(dtype)
    torch.manual_seed(4)
    ids = [torch.randint(4, 50, (1, n), device=DEV) for n in lengths]
    types = [torch.randint(0, 2, (1, n), device=DEV) for n in lengths]
    seg = Segments.from_lengths(lengths, device=DEV)
    with torch.no_grad():
        packed = enc(torch.cat(ids, 1), torch.cat(types, 1), segments=seg).float()
        alone = torch.cat([enc(i, t).float() for i, t in zip(ids, types)], 1)
    scale = float(alone.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 2e-2 * scale
    torch.testing.assert_close(packed, alone, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy_on_the_gpu_equals_torch(dtype):
    from megamlm.ops.cross_entropy import cross_entropy

    torch.manual_seed(1)
    N, V = 300, 30522
    x = (3 * torch.randn(N, V, device=DEV)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[::7] = -100
    loss, arg = cross_entropy(x, labels, with_argmax=True)
    g = torch.randn(N, device=DEV)
    (loss * g).sum().backward()
    ref_x = x.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, reduction="none")
    (ref * g).sum().backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    assert torch.equal(arg, x.detach().argmax(-1))


def test_the_gumbel_sampler_on_the_gpu_follows_the_softmax():
    from megamlm.ops.sampling import gumbel_sample

    torch.manual_seed(2)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=DEV).expand(200_000, 4).contiguous()
    ids = gumbel_sample(logits, None, 1.0)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=5e-3, rtol=0)
