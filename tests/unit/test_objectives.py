"""MLM / pair objectives, LossTerms arithmetic, combine, and the single-rank cross-entropy path.

A failure here points at megamlm/objectives.py (sums, counts, accuracy, the division by the step's
global count) or megamlm/parallel/vocab.py (fp32 CE, ignore_index, the autograd Function's backward).
"""

import pytest
import torch
import torch.nn.functional as F

from megamlm.bench import random_batch
from megamlm.config import ModelConfig, ObjectiveConfig
from megamlm.data.batch import IGNORE_INDEX as BATCH_IGNORE
from megamlm.model import build_model
from megamlm.objectives import LossTerms, combine, mlm_terms, pair_terms
from megamlm.parallel.vocab import (IGNORE_INDEX, _VocabParallelCrossEntropy, vocab_parallel_argmax,
                                    vocab_parallel_cross_entropy)

V = 61


def tiny_model(pair="nsp"):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_position_embeddings=32,
                      dropout=0.0, attention_dropout=0.0)
    return build_model(cfg, ObjectiveConfig(pair=pair), V)


def cat_batches(a, b):
    from megamlm.data.batch import Batch

    n = a.input_ids.numel()
    return Batch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.token_type_ids, b.token_type_ids]),
                 torch.cat([a.attention_mask, b.attention_mask]), torch.cat([a.mlm_labels, b.mlm_labels]),
                 torch.cat([a.mlm_positions, b.mlm_positions + n]), torch.cat([a.mlm_targets, b.mlm_targets]),
                 torch.cat([a.pair_labels, b.pair_labels]), a.n_tokens + b.n_tokens)



def test_ignore_index_agrees_with_batch():
    assert IGNORE_INDEX == BATCH_IGNORE == -100


def test_loss_only_over_masked_positions():
    """The MLM sum equals CE over all positions with labels -100 where nothing is predicted (HF way)."""
    model = tiny_model().eval()
    b = random_batch(3, 10, V, mlm_probability=0.3, seed=2)
    terms = model(b)
    h = model.hidden(b)
    head = model.mlm_head
    full = head.decoder(head.norm(head.act(head.dense(h))))  # [B, T, V]
    ref = F.cross_entropy(full.view(-1, V), b.mlm_labels.view(-1), reduction="sum")
    torch.testing.assert_close(terms.loss_sum["mlm"], ref, atol=1e-5, rtol=1e-6)
    assert int(terms.n_targets["mlm"]) == int((b.mlm_labels != -100).sum()) == b.mlm_positions.numel()
    pred = full.view(-1, V).argmax(-1)
    lab = b.mlm_labels.view(-1)
    assert int(terms.n_correct["mlm"]) == int(((pred == lab) & (lab != -100)).sum())


def test_pair_loss():
    logits = torch.randn(5, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0, IGNORE_INDEX])
    s, n, c = pair_terms(logits, labels)
    torch.testing.assert_close(s / n, F.cross_entropy(logits, labels))
    assert int(n) == 4 and int(c) == int((logits.argmax(-1)[:4] == labels[:4]).sum())


def test_mlm_terms_ignore_rows_and_accuracy():
    logits = torch.randn(4, V)
    targets = logits.argmax(-1).clone()
    targets[1] = (targets[1] + 1) % V
    targets[3] = IGNORE_INDEX
    s, n, c = mlm_terms(logits, targets)
    assert int(n) == 3 and int(c) == 2
    torch.testing.assert_close(s, F.cross_entropy(logits, targets, reduction="sum"))
    assert s.dtype == torch.float32 and n.dtype == torch.int64


def test_terms_summed_over_microbatches_equal_concatenated_batch():
    """Sum the terms of two micro-batches, divide once: same loss and gradient as one big batch."""
    model = tiny_model()
    a = random_batch(2, 10, V, mlm_probability=0.3, seed=0, padding=True)
    b = random_batch(3, 10, V, mlm_probability=0.1, seed=1, padding=True)
    ta, tb = model(a), model(b)
    total = ta + tb
    n_mlm, n_pair = total.n_targets["mlm"], total.n_targets["pair"]
    loss_split = combine(ta, n_mlm, n_pair, 0.5) + combine(tb, n_mlm, n_pair, 0.5)
    loss_split.backward()
    g_split = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    c = cat_batches(a, b)
    tc = model(c)
    loss_cat = combine(tc, tc.n_targets["mlm"], tc.n_targets["pair"], 0.5)
    loss_cat.backward()
    torch.testing.assert_close(loss_split, loss_cat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(combine(total, n_mlm, n_pair, 0.5), loss_cat, atol=1e-6, rtol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g_split[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)
    # the unequal split matters: averaging the two micro-batch means would differ
    naive = 0.5 * (combine(ta, ta.n_targets["mlm"], ta.n_targets["pair"], 0.5)
                   + combine(tb, tb.n_targets["mlm"], tb.n_targets["pair"], 0.5))
    assert abs(float(naive.detach()) - float(loss_cat.detach())) > 1e-4


def test_loss_terms_helpers():
    t = LossTerms()
    t.add("mlm", torch.tensor(6.0), torch.tensor(3), torch.tensor(1))
    t.add("pair", torch.tensor(2.0), torch.tensor(4), torch.tensor(2))
    s = sum([t, t])
    assert float(s.loss_sum["mlm"]) == 12.0 and int(s.n_targets["pair"]) == 8
    m = s.to_floats()
    assert m["mlm_loss"] == 2.0 and m["pair_accuracy"] == 0.5 and m["mlm_targets"] == 6.0
    assert float(combine(t, 3, 4, pair_loss_weight=2.0)) == pytest.approx(2.0 + 2 * 0.5)
    assert float(combine(t, torch.tensor(0), 4)) == pytest.approx(6.0 + 0.5)  # clamped to >= 1
    with pytest.raises(ValueError, match="no pair_denominator"):
        combine(t, 3)
    with pytest.raises(ValueError, match="empty"):
        combine(LossTerms(), 3, 4)
    with pytest.raises(ValueError, match="cannot add"):
        _ = t + LossTerms()


def test_cross_entropy_fp32_and_not_mutating():
    torch.manual_seed(0)
    logits = torch.randn(6, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 60, 0, IGNORE_INDEX])
    before = logits.detach().clone()
    loss = vocab_parallel_cross_entropy(logits, labels)
    assert loss.dtype == torch.float32 and loss.shape == (6,)
    assert float(loss[2].detach()) == 0.0 and float(loss[5].detach()) == 0.0
    ref = F.cross_entropy(logits.detach().float(), labels, reduction="none")
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.dtype == torch.bfloat16


def test_autograd_function_matches_log_softmax_at_size_one(kernels):
    """The vocab-parallel Function (no collectives at group None) equals F.cross_entropy, forward and
    backward; the caller's logits are left untouched."""
    torch.manual_seed(0)
    x = torch.randn(7, V, dtype=torch.float64)
    labels = torch.tensor([0, 5, IGNORE_INDEX, 60, 3, 3, IGNORE_INDEX])
    w = torch.randn(7, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    la = _VocabParallelCrossEntropy.apply(a, labels, None, IGNORE_INDEX)
    lb = F.cross_entropy(b.float(), labels, reduction="none")
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
    (la * w.float()).sum().backward()
    (lb * w.float()).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)
    assert torch.equal(a.detach(), x)
    assert torch.all(a.grad[2] == 0) and torch.all(a.grad[6] == 0)


def test_argmax_single():
    x = torch.randn(5, V)
    assert torch.equal(vocab_parallel_argmax(x), x.argmax(-1))


def test_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="expected local_logits"):
        vocab_parallel_cross_entropy(torch.randn(3, V), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("inplace", [False, True])
def test_single_rank_cross_entropy_backward(inplace, kernels):
    """fp32 logits from a matmul: same gradient with and without reusing their storage; without the
    flag the logits are untouched after backward too."""
    torch.manual_seed(0)
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(V, 8)
    labels = torch.randint(0, V, (9,))
    labels[4] = IGNORE_INDEX
    logits = h @ w.t()
    kept = logits.detach().clone()
    vocab_parallel_cross_entropy(logits, labels, inplace_backward=inplace).sum().backward()
    g = h.grad.clone()
    h.grad = None
    F.cross_entropy(h @ w.t(), labels, reduction="sum").backward()
    torch.testing.assert_close(g, h.grad, atol=1e-5, rtol=1e-5)
    if not inplace:
        assert torch.equal(logits.detach(), kept)


def test_single_rank_cross_entropy_adds_the_bias_itself(kernels):
    """bias= (the decoder's, on scratch logits): the loss, argmax and the gradients of the logits and the
    bias equal those of the cross-entropy of logits + bias (ignored rows contribute nothing); a vocab-
    parallel group or non-scratch logits refuse it."""
    torch.manual_seed(0)
    N, Vb = 40, 1000  # several row chunks
    h = torch.randn(N, 8, requires_grad=True)
    w, b = torch.randn(Vb, 8), torch.randn(Vb, requires_grad=True)
    labels = torch.randint(0, Vb, (N,))
    labels[[4, 17]] = IGNORE_INDEX
    loss, pred = vocab_parallel_cross_entropy(h @ w.t(), labels, inplace_backward=True, with_argmax=True, bias=b)
    loss.sum().backward()
    gh, gb = h.grad.clone(), b.grad.clone()
    h.grad = b.grad = None
    ref_logits = h @ w.t() + b
    ref = F.cross_entropy(ref_logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(pred, ref_logits.detach().argmax(-1))
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, b.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scratch logits"):
        vocab_parallel_cross_entropy(h @ w.t(), labels, inplace_backward=False, bias=b)


@pytest.mark.parametrize("vocab", [1, 7, 128, 300, 30522])
def test_argmax_from_cross_entropy_equals_torch_argmax_with_ties(vocab, kernels):
    """with_argmax returns x.argmax(-1) exactly, ties to the smallest id: random rows, constant rows,
    ties inside one column block, across blocks, on block boundaries and in the short last block;
    the loss is unchanged by the flag."""
    from megamlm.ops.cross_entropy import BLOCK as _BLOCK

    torch.manual_seed(0)
    x = torch.randn(12, vocab)
    x[1] = 0.5  # all tied: id 0
    if vocab > 3:
        x[2, [1, 3]] = 9.0  # tie inside the first block
    if vocab > 2 * _BLOCK + 5:
        x[3, [_BLOCK + 4, 2 * _BLOCK + 5]] = 9.0  # tie across blocks
        x[4, [_BLOCK - 1, _BLOCK]] = 9.0  # tie across a block boundary
        x[5, [vocab - 1, _BLOCK]] = 9.0  # the last column ties an earlier one
    x[6, vocab - 1] = 9.0  # maximum in the last column (the short last block)
    x[7, 0] = 9.0
    x[8] = x[8].round()  # many small ties
    labels = x.argmax(-1).clone()
    labels[9] = IGNORE_INDEX
    for fn in (lambda a: vocab_parallel_cross_entropy(a, labels, with_argmax=True),
               lambda a: _VocabParallelCrossEntropy.apply(a, labels, None, IGNORE_INDEX, False, True)):
        loss, pred = fn(x.clone().requires_grad_(True))
        assert torch.equal(pred, x.argmax(-1)), (pred, x.argmax(-1))
        assert not pred.requires_grad
        torch.testing.assert_close(loss, vocab_parallel_cross_entropy(x, labels))
        loss.sum().backward()  # the extra output does not disturb the backward


def test_mlm_accuracy_counts_tied_rows_by_smallest_id(kernels):
    """A row whose target ties the maximum with a smaller id is wrong, as argmax says; a row whose target
    is the smallest of the tied ids is right."""
    x = torch.zeros(3, V)
    x[0, [4, 9]] = 2.0  # target 9 ties with 4: argmax is 4 → wrong
    x[1, [4, 9]] = 2.0  # target 4 → right
    x[2, 20] = 1.0  # clear maximum → right
    _, n, c = mlm_terms(x, torch.tensor([9, 4, 20]))
    assert int(n) == 3 and int(c) == 2
