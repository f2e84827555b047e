"""MLM masking: budgets, 80/10/10 rates, whole words, span lengths, purity.

A failure here points at megamlm/data/masking.py (selection or corruption), or at the tokenizer's
``special_mask`` / ``word_start`` / ``random_candidates`` it relies on.
"""

from __future__ import annotations

import numpy as np
import pytest

from megamlm.data.masking import (IGNORE_INDEX, MaskSpec, mask_sequence, mask_sequences, span_length_pmf)
from tests import data_fixtures as F


@pytest.fixture(scope="module")
def corpus(tok):
    """~300k tokens of real SentencePiece ids as sequences of 20–126 tokens wrapped in [CLS] ... [SEP]."""
    sents = [s for d in F.fake_documents(2500, seed=5) for s in d]
    ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in tok.encode_batch(sents)])
    rng = np.random.default_rng(0)
    seqs, i = [], 0
    while i < ids.size and sum(s.size for s in seqs) < 300_000:
        n = int(rng.integers(20, 127))
        seqs.append(np.concatenate([[tok.special.cls], ids[i:i + n], [tok.special.sep]]).astype(np.int32))
        i += n
    offsets = np.concatenate([[0], np.cumsum([s.size for s in seqs])])
    return np.concatenate(seqs), offsets


def spec(tok, **kw) -> MaskSpec:
    return MaskSpec(special=tok.special_mask, word_start=tok.word_start, random_ids=tok.random_candidates,
                    mask_id=tok.special.mask, **kw)


def rates(tok, tokens, m):
    sel = m.labels != IGNORE_INDEX
    orig, new = tokens[sel], m.input_ids[sel]
    return sel, (new == tok.special.mask).mean(), ((new != orig) & (new != tok.special.mask)).mean(), (new == orig).mean()


def words_of(tok, tokens, offsets):
    """Word id per candidate token (−1 elsewhere), from the piece strings themselves, one token at a time
    (not the tokenizer's word_start arrays the masker reads): a word is a piece starting with "▁" (a
    byte piece or any other continues the word before it), or the first candidate after [CLS], [SEP],
    [MASK], [PAD] or a sequence start; those special ids are never in a word."""
    special = {tok.special.pad, tok.special.cls, tok.special.sep, tok.special.mask}
    starts = set(int(o) for o in offsets[:-1])
    wid = np.full(tokens.size, -1, dtype=np.int64)
    w, prev_in_word = -1, False
    for i, t in enumerate(tokens.tolist()):
        if t in special:
            prev_in_word = False
            continue
        if i in starts or not prev_in_word or tok.id_to_piece(t).startswith("\u2581"):
            w += 1
        wid[i], prev_in_word = w, True
    return wid


def test_ignore_index_matches_the_batch_seam():
    from megamlm.data import batch

    assert IGNORE_INDEX == batch.IGNORE_INDEX == -100


@pytest.mark.parametrize("p,mask,rand", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)])
def test_token_budget_is_exact_and_rates_hold(tok, corpus, p, mask, rand):
    tokens, offsets = corpus
    m = mask_sequences(tokens, offsets, spec(tok, probability=p, mask_ratio=mask, random_ratio=rand),
                       np.random.default_rng(1))
    sel, r_mask, r_rand, r_keep = rates(tok, tokens, m)
    cand = ~tok.special_mask[tokens]
    assert not (sel & ~cand).any(), "a special token was selected"
    seq = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    n = np.bincount(seq, weights=cand)
    k = np.bincount(seq, weights=sel)
    np.testing.assert_array_equal(k, np.maximum(1, np.rint(n * p)))  # exactly round(p * n), at least 1
    assert abs(sel.sum() / cand.sum() - p) < 0.005
    assert abs(r_mask - mask) < 0.01 and abs(r_rand - rand) < 0.01 and abs(r_keep - (1 - mask - rand)) < 0.01
    changed = m.input_ids[sel & (m.input_ids != tokens) & (m.input_ids != tok.special.mask)]
    assert np.isin(changed, tok.random_candidates).all()
    assert (m.input_ids[~sel] == tokens[~sel]).all() and (m.labels[sel] == tokens[sel]).all()


def test_whole_word_never_splits_a_word(tok, corpus):
    tokens, offsets = corpus
    m = mask_sequences(tokens, offsets, spec(tok, mode="whole_word"), np.random.default_rng(2))
    sel = m.labels != IGNORE_INDEX
    wid = words_of(tok, tokens, offsets)
    per_word = np.bincount(wid[wid >= 0], weights=sel[wid >= 0])
    size = np.bincount(wid[wid >= 0])
    assert ((per_word == 0) | (per_word == size)).all(), "a word was partly selected"
    assert (size > 1).sum() > 1000 and (per_word[size > 1] > 0).sum() > 100  # multi-piece words were chosen
    cand = ~tok.special_mask[tokens]
    assert abs(sel.sum() / cand.sum() - 0.15) < 0.005
    # 80/10/10 decided per word: a chosen word is all [MASK], or has no [MASK]
    masked = np.bincount(wid[wid >= 0], weights=(m.input_ids == tok.special.mask)[wid >= 0])
    chosen = per_word > 0
    assert ((masked[chosen] == 0) | (masked[chosen] == size[chosen])).all()
    assert abs((masked[chosen] > 0).mean() - 0.8) < 0.01
    kept = np.bincount(wid[wid >= 0], weights=(sel & (m.input_ids == tokens))[wid >= 0])
    assert abs((kept[chosen] == size[chosen]).mean() - 0.1) < 0.01


def test_span_lengths_follow_the_truncated_geometric(tok, corpus):
    tokens, offsets = corpus
    s = spec(tok, mode="span", span_p=0.2, span_max_words=10)
    m = mask_sequences(tokens, offsets, s, np.random.default_rng(3))
    sel = m.labels != IGNORE_INDEX
    cand = ~tok.special_mask[tokens]
    assert abs(sel.sum() / cand.sum() - 0.15) < 0.005
    drawn, masked, cut = m.spans[:, 1], m.spans[:, 2], m.spans[:, 3].astype(bool)
    pmf = span_length_pmf(0.2, 10)
    hist = np.bincount(drawn, minlength=11)[1:] / drawn.size
    assert drawn.size > 5000 and np.abs(hist - pmf).max() < 0.015
    assert abs(drawn.mean() - 3.8) < 0.1  # SpanBERT's mean span length for p=0.2, max 10
    assert (masked[~cut] == drawn[~cut]).all() and (masked[cut] < drawn[cut]).all() and (masked >= 1).all()
    assert cut.mean() < 0.5  # the budget cuts about one span per sequence (~2 spans each here)
    # spans are whole words, and the 80/10/10 decision is shared by a span's tokens
    wid = words_of(tok, tokens, offsets)
    per_word = np.bincount(wid[wid >= 0], weights=sel[wid >= 0])
    size = np.bincount(wid[wid >= 0])
    assert ((per_word == 0) | (per_word == size)).all()
    assert abs(((m.input_ids == tok.special.mask) & sel).sum() / sel.sum() - 0.8) < 0.02


@pytest.mark.parametrize("mode", ["token", "whole_word", "span"])
def test_pure_function_of_tokens_spec_and_rng(tok, corpus, mode):
    tokens, offsets = corpus
    tokens, offsets = tokens[:offsets[200]], offsets[:201]
    a = mask_sequences(tokens, offsets, spec(tok, mode=mode), np.random.default_rng([7, 0, 42]))
    b = mask_sequences(tokens, offsets, spec(tok, mode=mode), np.random.default_rng([7, 0, 42]))
    c = mask_sequences(tokens, offsets, spec(tok, mode=mode), np.random.default_rng([7, 1, 42]))
    assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
    assert (a.labels != c.labels).any()
    assert (tokens == corpus[0][:offsets[-1]]).all(), "the input was modified"


@pytest.mark.parametrize("mode", ["token", "whole_word", "span"])
def test_specials_and_padding_never_selected_and_edge_cases(tok, mode):
    s = spec(tok, mode=mode)
    pad_row = tok.padded_vocab_size - 1  # a padding row of the vocabulary
    only_special = np.array([tok.special.cls, tok.special.sep, tok.special.pad, tok.special.mask, pad_row])
    m = mask_sequence(only_special, s, np.random.default_rng(0))
    assert (m.labels == IGNORE_INDEX).all() and (m.input_ids == only_special).all()
    one = np.array([tok.special.cls, 300, tok.special.sep, 0, 0], dtype=np.int32)
    m = mask_sequence(one, s, np.random.default_rng(0))
    assert (np.flatnonzero(m.labels != IGNORE_INDEX) == [1]).all()  # at least one target
    empty = mask_sequences(np.zeros(0, dtype=np.int32), np.array([0]), s, np.random.default_rng(0))
    assert empty.input_ids.size == 0


def test_bad_spec_is_rejected(tok):
    with pytest.raises(ValueError, match="mask_ratio"):
        spec(tok, mask_ratio=0.8, random_ratio=0.3)
    with pytest.raises(ValueError, match="masking mode"):
        spec(tok, mode="words")
