"""Example construction: NSP / SOP pairs, full-sentence packing, truncation, counters.

The documents here carry *unique* token ids (position in the corpus + 10), so each segment says exactly
where it came from. A failure points at megamlm/data/examples.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from megamlm.data.examples import make_examples, truncated_lengths

CLS, SEP = 2, 3


def synthetic_docs(n_docs: int, seed: int = 0, long_every: int = 20):
    """(index, ids, sentence lengths); ids unique and increasing over the corpus; some long documents
    and some of a single sentence."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], 10
    for d in range(n_docs):
        n_sent = 1 if d % 7 == 3 else int(rng.integers(2, 9))
        lens = rng.integers(3, 40, n_sent)
        if d % long_every == 5:
            lens[0] = 300  # longer than any sequence
        ids = np.arange(nxt, nxt + lens.sum(), dtype=np.int32)
        nxt += int(lens.sum())
        docs.append((1000 + d, ids, lens.astype(np.int32)))
    return docs


def owner(docs):
    """token id → document index."""
    starts = np.array([d[1][0] for d in docs])
    index = np.array([d[0] for d in docs])
    return lambda tok: index[np.searchsorted(starts, tok, side="right") - 1]


def split_pair(ex, i):
    t = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]]
    ty = ex.types[ex.offsets[i]:ex.offsets[i + 1]]
    assert t[0] == CLS and t[-1] == SEP
    sep = int(np.flatnonzero(t == SEP)[0])
    a, b = t[1:sep], t[sep + 1:-1]
    assert (ty[:sep + 1] == 0).all() and (ty[sep + 1:] == 1).all()
    assert a.size >= 1 and b.size >= 1
    return a, b


def consecutive(x):
    return bool((np.diff(x) == 1).all())


def many(mode, n_groups=30, docs_per_group=40, max_len=64, **kw):
    out, counters = [], {}
    for g in range(n_groups):
        docs = synthetic_docs(docs_per_group, seed=g)
        ex = make_examples(docs, mode, max_len, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng([0, g]),
                           counters=counters, **kw)
        out.append((docs, ex))
    return out, counters


def test_truncated_lengths_match_googles_loop():
    for la in range(0, 40):
        for lb in range(0, 40):
            for m in (5, 17, 30):
                a, b = la, lb
                while a + b > m:
                    if a > b:
                        a -= 1
                    else:
                        b -= 1
                assert truncated_lengths(la, lb, m) == (a, b), (la, lb, m)


def test_nsp_balance_and_notnext_from_another_document():
    groups, c = many("nsp")
    labels = np.concatenate([ex.pair_labels for _, ex in groups])
    assert labels.size > 2000 and abs(labels.mean() - 0.5) < 0.02
    for docs, ex in groups:
        who = owner(docs)
        for i in range(len(ex)):
            a, b = split_pair(ex, i)
            assert ex.tokens[ex.offsets[i + 1] - 1] == SEP and ex.offsets[i + 1] - ex.offsets[i] <= 64
            assert consecutive(a) and consecutive(b)  # truncation only trims the ends
            da, db = set(who(a)), set(who(b))
            assert len(da) == 1 and len(db) == 1 and da.pop() == ex.docs[i][0]
            if ex.pair_labels[i] == 1:
                assert db.pop() != ex.docs[i][0], "NotNext B came from A's own document"
                assert ex.docs[i][1] != ex.docs[i][0]
            else:
                assert db.pop() == ex.docs[i][0] and b[0] > a[-1]
                if a.size + b.size < 61:  # nothing truncated: B starts right where A ends
                    assert b[0] == a[-1] + 1
    assert c["short_documents"] > 0 and c["split_segments"] > 0 and c["forced_isnext"] == 0


def test_nsp_uses_every_document_and_the_target_length():
    groups, c = many("nsp", short_seq_prob=0.0)
    for docs, ex in groups:
        assert {d[0] for d in docs} == {x[0] for x in ex.docs}  # single-sentence documents included
    lens = np.concatenate([np.diff(ex.offsets) for _, ex in groups])
    short, _ = many("nsp", short_seq_prob=1.0)
    lens_short = np.concatenate([np.diff(ex.offsets) for _, ex in short])
    assert lens_short.mean() < lens.mean() - 5 and lens_short.size > lens.size
    assert c["documents"] == 30 * 40 and c["examples"] == lens.size


def test_nsp_single_document_group_cannot_make_notnext():
    docs = synthetic_docs(1, seed=3)
    c = {}
    ex = make_examples(docs, "nsp", 64, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(0), counters=c)
    assert (ex.pair_labels == 0).all() and c["forced_isnext"] > 0


def test_sop_swapped_exactly_when_labelled():
    groups, c = many("sop")
    labels = np.concatenate([ex.pair_labels for _, ex in groups])
    assert abs(labels.mean() - 0.5) < 0.03
    n_single = 0
    for docs, ex in groups:
        who = owner(docs)
        used = {x[0] for x in ex.docs}
        single = {d[0] for d in docs if d[2].size < 2}
        n_single += len(single)
        assert not used & single and used == {d[0] for d in docs} - single
        for i in range(len(ex)):
            a, b = split_pair(ex, i)
            assert set(who(a)) == set(who(b)) == {ex.docs[i][0]}
            assert (b[0] > a[-1]) == (ex.pair_labels[i] == 0)  # in order iff label 0
    assert c["short_documents"] == n_single and c["skipped_tokens"] > 0


def test_full_sentence_packing_keeps_every_token_in_order():
    docs = synthetic_docs(60, seed=1)
    c = {}
    ex = make_examples(docs, "none", 64, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(0), shuffle=False,
                       counters=c)
    assert ex.pair_labels is None and (ex.types == 0).all()
    lens = np.diff(ex.offsets)
    assert lens.max() <= 64 and (lens[:-1] > 32).mean() > 0.9  # packed full
    content = []
    n_doc_changes = 0
    who = owner(docs)
    for i in range(len(ex)):
        t = ex.tokens[ex.offsets[i]:ex.offsets[i + 1]]
        assert t[0] == CLS and t[-1] == SEP
        inner = t[1:-1]
        real = inner[inner != SEP]
        owners = who(real)
        changes = int((np.diff(owners) != 0).sum())
        assert int((inner == SEP).sum()) == changes  # an extra [SEP] exactly at each document boundary
        n_doc_changes += changes
        content.append(real)
        assert list(ex.docs[i]) == list(dict.fromkeys(owners.tolist()))
    allc = np.concatenate(content)
    assert (allc == np.concatenate([d[1] for d in docs])).all()  # every token, once, in order
    assert n_doc_changes > 0 and c["split_segments"] >= 1  # the 300-token sentences were split


def test_documents_longer_than_a_sequence_are_split_not_dropped():
    docs = synthetic_docs(40, seed=2)
    long_doc = docs[5]
    assert long_doc[1].size > 300
    for mode in ("nsp", "sop"):
        ex = make_examples(docs, mode, 64, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(1))
        from_long = [i for i in range(len(ex)) if ex.docs[i][0] == long_doc[0]]
        assert len(from_long) >= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="pair mode"):
        make_examples([], "mlm", 64, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(0))
    ex = make_examples([], "nsp", 64, cls_id=CLS, sep_id=SEP, rng=np.random.default_rng(0))
    assert len(ex) == 0
