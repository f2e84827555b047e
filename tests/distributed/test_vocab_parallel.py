"""Vocab-parallel cross-entropy, argmax, collectives and embedding on spawned gloo ranks vs the
single-process reference.

Each rank holds a contiguous vocabulary slice of the same logits; losses (fp32, per row) must equal
``F.cross_entropy`` on the full logits within 1e-6 and the logits' gradient slices within 1e-6, with
ignore_index rows giving zero loss and gradient, and the caller's logits untouched. With a padded
vocabulary (real 21 of 24 columns) the padded columns are masked to −inf as the vocab-parallel decoder
does, and the reference is ``F.cross_entropy`` over the 21 real columns. Groups of size 1, 2, 4 (inside
one 4-rank world) and 3. The embedding's output and weight gradient must equal ``nn.Embedding``'s.

A failure points at megamlm/parallel/vocab.py (_VocabParallelCrossEntropy: the all-reduces of max /
sum-exp / target logit, the label offset of each slice, the collective-free backward, −inf columns),
at megamlm/parallel/layers.py (the copy / reduce Functions, VocabParallelEmbedding's out-of-range
masking, mask_padded_columns_) or at tests/_spawn.py.
"""

import pytest
import torch
import torch.nn.functional as F

from tests._spawn import spawn

N, V = 11, 24


def _reference(seed: int, dtype: torch.dtype, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[3] = -100
    labels[7] = vocab - 1  # last real id
    labels[8] = 0
    weights = torch.rand(N, generator=g)
    return logits, labels, weights


def _groups(world: int):
    """(name, group or None) for the sizes this world tests: 1 (None), world, and pairs when world is 4."""
    import torch.distributed as dist

    out = [("t=1", None), (f"t={world}", dist.new_group(list(range(world))))]
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        out.append(("t=2", pairs[dist.get_rank() // 2]))
    return out


def _ce_worker(rank: int, world: int) -> None:
    for name, group in _groups(world):
        for dtype in (torch.float32, torch.bfloat16):
            for real in (V, 21):  # divisible, and padded 21 → 24 (every group size here divides 24)
                try:
                    _check(dtype, group, real)
                except AssertionError as e:
                    raise AssertionError(f"{name}, {dtype}, real vocabulary {real}: {e}") from e
        _check_all_ignored(group)


def _slice(group):
    from megamlm.parallel.vocab import group_size_rank

    size, r = group_size_rank(group)
    width = V // size
    return slice(r * width, (r + 1) * width), r * width


def _check(dtype: torch.dtype, group, real: int) -> None:
    from megamlm.parallel.layers import mask_padded_columns_
    from megamlm.parallel.vocab import vocab_parallel_argmax, vocab_parallel_cross_entropy

    logits, labels, weights = _reference(0, dtype, real)
    padded = torch.cat([logits, torch.randn(N, V - real).to(dtype)], dim=1)  # junk in the padded columns
    full = logits.float().clone().requires_grad_(True)
    ref = F.cross_entropy(full, labels, reduction="none")
    (ref * weights).sum().backward()
    ref_grad = torch.cat([full.grad, torch.zeros(N, V - real)], dim=1)

    cols, start = _slice(group)
    local = padded[:, cols].clone().requires_grad_(True)
    before = local.detach().clone()
    masked = mask_padded_columns_(local.clone(), start, real)  # what the decoder hands over
    loss = vocab_parallel_cross_entropy(masked, labels, group)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    tol = 1e-6 if dtype == torch.float32 else 1e-5  # the loss is fp32 either way
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=tol, rtol=tol)
    assert float(loss[3].detach()) == 0.0
    (loss * weights).sum().backward()
    assert torch.equal(local.detach(), before), "the caller's logits were mutated"
    assert local.grad.dtype == dtype
    gtol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=4e-3, rtol=1e-2)  # bf16 grad
    torch.testing.assert_close(local.grad.float(), ref_grad[:, cols], **gtol)
    assert torch.all(local.grad[3] == 0)
    assert torch.all(local.grad[:, max(real - start, 0):] == 0), "a padded column got a gradient"

    # logits made for the loss alone: the backward may write the gradient into their storage
    scratch = local.detach().clone().requires_grad_(True)
    masked = mask_padded_columns_(scratch * 1.0, start, real)  # a non-leaf, as the decoder's output
    (vocab_parallel_cross_entropy(masked, labels, group, inplace_backward=True) * weights).sum().backward()
    torch.testing.assert_close(scratch.grad.float(), ref_grad[:, cols], **gtol)

    # argmax across slices, ties broken towards the smallest id; padded columns never win
    tied = padded.float().clone()
    tied[0, :] = 1.0
    tied[1, real:] = 1e4
    pred = vocab_parallel_argmax(mask_padded_columns_(tied[:, cols].clone(), start, real), group)
    expect = tied[:, :real].argmax(-1)
    assert torch.equal(pred, expect), (pred, expect)
    assert int(pred[0]) == 0
    # the same argmax from the cross-entropy's row-max pass (what the MLM accuracy uses)
    _, pred_ce = vocab_parallel_cross_entropy(mask_padded_columns_(tied[:, cols].clone(), start, real), labels,
                                              group, with_argmax=True)
    assert torch.equal(pred_ce, expect), (pred_ce, expect)

    # the MLM objective end to end: sums and accuracy equal the single-process ones
    from megamlm.objectives import mlm_terms

    s, n, c = mlm_terms(mask_padded_columns_(padded[:, cols].float().clone(), start, real), labels, group)
    s_ref, n_ref, c_ref = mlm_terms(logits.float(), labels)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-6)
    assert int(n) == int(n_ref) and int(c) == int(c_ref)


def _check_all_ignored(group) -> None:
    from megamlm.parallel.vocab import vocab_parallel_cross_entropy

    logits, _, _ = _reference(1, torch.float32)
    cols, _ = _slice(group)
    local = logits[:, cols].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, torch.full((N,), -100), group)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(local.grad == 0)


@pytest.mark.parametrize("world", [3, 4])
def test_vocab_parallel_cross_entropy(world):
    """fp32 and bf16 logits, group sizes 1, 2, 4 (world 4) and 1, 3 (24 = 3 x 8); real 24 and padded 21 → 24;
    a batch with every row ignored."""
    spawn(_ce_worker, world_size=world)


def _layers_worker(rank: int, world: int) -> None:
    from megamlm.parallel.layers import (VocabParallelEmbedding, copy_to_vocab_parallel_region,
                                         reduce_from_vocab_parallel_region)
    from megamlm.parallel.vocab import group_size_rank

    H = 5
    for name, group in _groups(world):
        size, r = group_size_rank(group)
        # collectives: copy = identity forward / sum backward; reduce = sum forward / identity backward
        x = torch.full((3, H), float(r + 1), requires_grad=True)
        y = copy_to_vocab_parallel_region(x, group)
        assert torch.equal(y, x)
        (y * (r + 1)).sum().backward()
        assert torch.all(x.grad == sum(range(1, size + 1))), (name, x.grad)
        x.grad = None
        z = reduce_from_vocab_parallel_region(x, group)
        assert torch.all(z == sum(range(1, size + 1))) and torch.all(x == r + 1), name
        (z * 2).sum().backward()
        assert torch.all(x.grad == 2), name

        # embedding == nn.Embedding: output and (gathered) weight gradient
        torch.manual_seed(0)
        ref = torch.nn.Embedding(V, H)
        ids = torch.randint(0, V, (4, 7))
        ids[0, :4] = torch.tensor([0, V - 1, V // 2, V // 2 - 1])  # slice boundaries
        out_w = torch.randn(4, 7, H)
        (ref(ids) * out_w).sum().backward()
        emb = VocabParallelEmbedding.from_full(ref.weight, group)
        assert emb.num_embeddings == V and emb.weight.shape == (V // size, H)
        assert getattr(emb.weight, "tensor_model_parallel", False) == (size > 1)
        out = emb(ids)
        torch.testing.assert_close(out, ref(ids).detach(), atol=1e-6, rtol=1e-6)
        (out * out_w).sum().backward()
        torch.testing.assert_close(emb.weight.grad, ref.weight.grad[emb.vocab_start:emb.vocab_end],
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("world", [4])
def test_collectives_and_embedding(world):
    """Groups of size 1, 2 and 4: copy / reduce Functions and VocabParallelEmbedding vs nn.Embedding."""
    spawn(_layers_worker, world_size=world)
