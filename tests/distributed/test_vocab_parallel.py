"""Vocab-parallel cross-entropy and argmax on spawned gloo ranks vs the single-process reference.

Each rank holds a contiguous vocabulary slice of the same logits; losses (fp32, per row) must equal
``F.cross_entropy`` on the full logits within 1e-6 and the logits' gradient slices within 1e-6, with
ignore_index rows giving zero loss and gradient, and the caller's logits untouched. A failure points
at megamlm/parallel/vocab.py (_VocabParallelCrossEntropy: the all-reduces of max / sum-exp / target
logit, the label offset of each slice, or the collective-free backward) or at tests/_spawn.py.
"""

import pytest
import torch
import torch.nn.functional as F

from tests._spawn import spawn

N, V = 11, 24


def _reference(seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    labels[7] = V - 1  # last slice's last id
    labels[8] = 0
    weights = torch.rand(N, generator=g)
    return logits, labels, weights


def _worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    for dtype in (torch.float32, torch.bfloat16):
        _check(rank, world, dtype, group)


def _check(rank: int, world: int, dtype: torch.dtype, group) -> None:
    from megamlm.parallel.vocab import vocab_parallel_argmax, vocab_parallel_cross_entropy

    logits, labels, weights = _reference(0, dtype)
    full = logits.float().clone().requires_grad_(True)
    ref = F.cross_entropy(full, labels, reduction="none")
    (ref * weights).sum().backward()

    width = V // world
    local = logits[:, rank * width:(rank + 1) * width].clone().requires_grad_(True)
    before = local.detach().clone()
    loss = vocab_parallel_cross_entropy(local, labels, group)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    tol = 1e-6 if dtype == torch.float32 else 1e-5  # the loss is fp32 either way
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=tol, rtol=tol)
    assert float(loss[3].detach()) == 0.0
    (loss * weights).sum().backward()
    assert torch.equal(local.detach(), before), "the caller's logits were mutated"
    assert local.grad.dtype == dtype
    gtol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=4e-3, rtol=1e-2)  # bf16 grad
    torch.testing.assert_close(local.grad.float(), full.grad[:, rank * width:(rank + 1) * width], **gtol)
    assert torch.all(local.grad[3] == 0)

    # argmax across slices, ties broken towards the smallest id
    tied = logits.float().clone()
    tied[0, :] = 1.0
    pred = vocab_parallel_argmax(tied[:, rank * width:(rank + 1) * width], group)
    assert torch.equal(pred, tied.argmax(-1)), (pred, tied.argmax(-1))
    assert int(pred[0]) == 0

    # the MLM objective end to end: sums and accuracy equal the single-process ones
    from megamlm.objectives import mlm_terms

    s, n, c = mlm_terms(logits[:, rank * width:(rank + 1) * width].float(), labels, group)
    s_ref, n_ref, c_ref = mlm_terms(logits.float(), labels)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-6)
    assert int(n) == int(n_ref) and int(c) == int(c_ref)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_cross_entropy(world):
    """fp32 and bf16 logits, uneven world sizes (24 = 2 x 12 = 3 x 8)."""
    spawn(_worker, world_size=world)

