"""Pretraining examples from documents: NSP pairs, SOP pairs, or packed full sentences.

Input: a group of documents, each ``(index, ids, sentence_lengths)`` (one shard block, or one part of a
block, see loader.py). Output: :class:`Examples`, all sequences of the group in one flat array. Every
choice is drawn from the ``rng`` passed in (the loader seeds it with ``(seed, epoch, group identity)``).

``nsp`` (BERT, after Google's ``create_pretraining_data.py``): per document a target length (``max_len - 3``,
or with probability ``short_seq_prob`` a uniform one in [2, max_len - 3]); sentences are gathered into a
chunk until it reaches the target or the document ends; A = the chunk's first 1..n−1 sentences. The label
is drawn first, 50/50: IsNext (0) takes B = the rest of the chunk; NotNext (1) takes B from a random
*other* document of the group (from a random sentence, until B reaches its target) and puts the unused
sentences of the chunk back, as Google does. Where Google forces NotNext (a chunk of one sentence, which
would skew the labels), IsNext here splits that sentence at a random token (B is still the true
continuation; counted as ``split_segments``). A group holding a single document cannot make NotNext:
IsNext then (``forced_isnext``). The pair is truncated to ``max_len - 3`` by removing tokens from the
longer side, each from its front or back at random (the same distribution as Google's loop, computed
in closed form).

``sop`` (ALBERT): the same chunks; A and B are consecutive segments of one document, swapped with
probability 1/2 (label 1 = swapped). A document of fewer than two sentences cannot make an ordered pair:
it is skipped and counted (``short_documents``, ``skipped_tokens``); a one-sentence chunk of a longer
document is split at a random token (``split_segments``).

``none`` (RoBERTa FULL-SENTENCES): ``[CLS] s1 s2 ... [SEP]``, whole sentences packed contiguously across
document boundaries up to ``max_len``; a document boundary inside a sequence is marked by an extra
[SEP]; a sentence that fits in no sequence is split (``split_segments``). No token is dropped: the last
sequence of a group may be short. ``pair_labels`` is None and all token types are 0.

Layout: ``[CLS] A [SEP] B [SEP]`` with token types 0 for [CLS] A [SEP], 1 for B [SEP].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megamlm.data.masking import concat_ranges

__all__ = ["Examples", "make_examples", "truncated_lengths", "PAIR_MODES", "COUNTERS"]

PAIR_MODES = ("nsp", "sop", "none")
COUNTERS = ("documents", "examples", "short_documents", "skipped_tokens", "split_segments", "forced_isnext")


@dataclass
class Examples:
    tokens: np.ndarray  # flat int32, all sequences concatenated
    types: np.ndarray  # flat int8, token type (segment) ids
    offsets: np.ndarray  # int64 [n + 1]
    pair_labels: np.ndarray | None  # int8 [n] or None (mode none)
    docs: list[tuple[int, ...]]  # per example the documents it holds (the first is A's / the primary one)

    def __len__(self) -> int:
        return self.offsets.size - 1


def truncated_lengths(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """Lengths after Google's ``truncate_seq_pair``: remove from the longer (B on a tie) until they fit."""
    e = la + lb - max_tokens
    if e <= 0:
        return la, lb
    if la > lb:
        d = min(e, la - lb)
        la, e = la - d, e - d
    elif lb > la:
        d = min(e, lb - la)
        lb, e = lb - d, e - d
    return la - e // 2, lb - (e + 1) // 2


class _Builder:
    """Collects examples as pieces (ranges of a source array) and gathers them in one go."""

    def __init__(self, docs: Sequence[tuple[int, np.ndarray, np.ndarray]], cls_id: int, sep_id: int):
        ids = [d[1] for d in docs]
        self.base = np.concatenate([[0], np.cumsum([a.size for a in ids])]).astype(np.int64)
        n = int(self.base[-1])
        self.src = np.empty(n + 2, dtype=np.int32)
        if n:
            np.concatenate(ids, out=self.src[:n], casting="unsafe")
        self.src[n], self.src[n + 1] = cls_id, sep_id
        self.CLS, self.SEP = (n, n + 1), (n + 1, n + 2)
        self.ps: list[int] = []
        self.pe: list[int] = []
        self.pt: list[int] = []
        self.npieces: list[int] = []
        self.labels: list[int] = []
        self.docs: list[tuple[int, ...]] = []

    def add(self, pieces: list[tuple[int, int, int]], docs: tuple[int, ...], label: int = 0) -> None:
        for s, e, t in pieces:
            self.ps.append(s)
            self.pe.append(e)
            self.pt.append(t)
        self.npieces.append(len(pieces))
        self.labels.append(label)
        self.docs.append(docs)

    def build(self, with_labels: bool) -> Examples:
        ps, pe = np.asarray(self.ps, dtype=np.int64), np.asarray(self.pe, dtype=np.int64)
        plen = pe - ps
        tokens = self.src[concat_ranges(ps, pe)]
        types = np.repeat(np.asarray(self.pt, dtype=np.int8), plen)
        ex_len = np.zeros(len(self.npieces), dtype=np.int64)
        if self.npieces:
            ex_len = np.add.reduceat(plen, np.cumsum(self.npieces) - self.npieces)
        offsets = np.concatenate([[0], np.cumsum(ex_len)]).astype(np.int64)
        labels = np.asarray(self.labels, dtype=np.int8) if with_labels else None
        return Examples(tokens, types, offsets, labels, self.docs)


def _random_b(b: _Builder, docs, di: int, need: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """NSP's NotNext B: whole sentences of another document of the unit than ``di``, from a random one on,
    until ``need`` tokens are reached (or the document ends); (start, end) in the builder's token stream
    and the other document's index."""
    r = int(rng.integers(0, len(docs) - 1))
    r += r >= di
    r_sl = docs[r][2]
    rb = b.base[r] + np.concatenate([[0], np.cumsum(r_sl)])
    start = int(rng.integers(0, r_sl.size))
    stop = start + 1 + int(np.searchsorted(np.cumsum(r_sl[start:]), need, side="left"))
    return int(rb[start]), int(rb[min(stop, r_sl.size)]), docs[r][0]


def _pair_examples(b: _Builder, docs, order, mode: str, max_len: int, short_seq_prob: float,
                   rng: np.random.Generator, counters: dict) -> None:
    max_num = max_len - 3
    n_docs = len(docs)
    for di in order:
        index, ids, sl = docs[di]
        nsent = sl.size
        bounds = b.base[di] + np.concatenate([[0], np.cumsum(sl)])
        if nsent < 2:
            counters["short_documents"] += 1
            if mode == "sop":
                counters["skipped_tokens"] += int(ids.size)
                continue
        target = max_num
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_num + 1))
        i, cs, cur = 0, 0, 0
        while i < nsent:
            cur += int(sl[i])
            if i == nsent - 1 or cur >= target:
                n_seg = i - cs + 1
                a0 = int(bounds[cs])
                label = int(rng.random() < 0.5)
                if mode == "nsp" and label and n_docs < 2:
                    label = 0
                    counters["forced_isnext"] += 1
                if n_seg >= 2:
                    a_end = int(rng.integers(cs + 1, i + 1))  # A = sentences [cs, a_end)
                    a1 = int(bounds[a_end])
                    b0, b1 = a1, int(bounds[i + 1])
                elif mode == "nsp" and label:  # one sentence: all of it is A, B comes from elsewhere
                    a_end, a1, b0, b1 = i + 1, int(bounds[i + 1]), 0, 0
                elif bounds[i + 1] - a0 >= 2:  # one sentence: split it at a random token
                    a_end = i + 1
                    a1 = a0 + int(rng.integers(1, int(bounds[i + 1]) - a0))
                    b0, b1 = a1, int(bounds[i + 1])
                    counters["split_segments"] += 1
                else:  # a one-token chunk cannot form a pair
                    counters["skipped_tokens"] += int(bounds[i + 1]) - a0
                    i, cs, cur = i + 1, i + 1, 0
                    continue
                pair_docs: tuple[int, ...] = (index,)
                if mode == "nsp" and label:
                    b0, b1, other = _random_b(b, docs, di, target - (a1 - a0), rng)
                    pair_docs = (index, other)
                    i = a_end - 1  # the unused sentences of the chunk go back
                elif mode == "sop" and label:
                    a0, a1, b0, b1 = b0, b1, a0, a1
                la, lb = truncated_lengths(a1 - a0, b1 - b0, max_num)
                fa = int(rng.binomial(a1 - a0 - la, 0.5)) if a1 - a0 > la else 0
                fb = int(rng.binomial(b1 - b0 - lb, 0.5)) if b1 - b0 > lb else 0
                a0, b0 = a0 + fa, b0 + fb
                b.add([(*b.CLS, 0), (a0, a0 + la, 0), (*b.SEP, 0), (b0, b0 + lb, 1), (*b.SEP, 1)], pair_docs, label)
                cs, cur = i + 1, 0
            i += 1


def _packed_examples(b: _Builder, docs, order, max_len: int, counters: dict) -> None:
    cap = max_len - 2  # room between [CLS] and the final [SEP]
    pieces: list[tuple[int, int, int]] = []
    in_seq: list[int] = []
    used = 0

    def flush() -> None:
        nonlocal pieces, in_seq, used
        if pieces:
            b.add([(*b.CLS, 0), *pieces, (*b.SEP, 0)], tuple(in_seq))
        pieces, in_seq, used = [], [], 0

    for di in order:
        index, _, sl = docs[di]
        bounds = b.base[di] + np.concatenate([[0], np.cumsum(sl)])
        for j in range(sl.size):
            s0, s1 = int(bounds[j]), int(bounds[j + 1])
            new_doc = not in_seq or in_seq[-1] != index
            sep = 1 if (pieces and new_doc) else 0
            if used + sep + (s1 - s0) > cap:
                flush()
                sep, new_doc = 0, True
                if s1 - s0 > cap:
                    counters["split_segments"] += 1
                    while s1 - s0 > cap:
                        b.add([(*b.CLS, 0), (s0, s0 + cap, 0), (*b.SEP, 0)], (index,))
                        s0 += cap
            if sep:
                pieces.append((*b.SEP, 0))
            if new_doc:
                in_seq.append(index)
            if pieces and pieces[-1][1] == s0:  # contiguous with the previous sentence: extend the piece
                pieces[-1] = (pieces[-1][0], s1, 0)
            else:
                pieces.append((s0, s1, 0))
            used += sep + (s1 - s0)
    flush()


def make_examples(docs: Sequence[tuple[int, np.ndarray, np.ndarray]], mode: str, max_len: int, *, cls_id: int,
                  sep_id: int, rng: np.random.Generator, short_seq_prob: float = 0.1, shuffle: bool = True,
                  counters: dict | None = None) -> Examples:
    """All examples of a group of documents ``(index, ids, sentence_lengths)``; see the module docstring.

    ``shuffle`` visits the documents in a random order (drawn from ``rng``), else in the given order.
    ``counters`` (a dict) is incremented with the keys of ``COUNTERS``.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode {mode!r} is not one of {', '.join(PAIR_MODES)}")
    if max_len < 5:
        raise ValueError(f"max_len={max_len} leaves no room for a pair ([CLS] A [SEP] B [SEP])")
    c = counters if counters is not None else {}
    for k in COUNTERS:
        c.setdefault(k, 0)
    b = _Builder(docs, cls_id, sep_id)
    order = rng.permutation(len(docs)) if shuffle else np.arange(len(docs))
    if mode == "none":
        _packed_examples(b, docs, order, max_len, c)
    else:
        _pair_examples(b, docs, order, mode, max_len, short_seq_prob, rng, c)
    c["documents"] += len(docs)
    ex = b.build(with_labels=mode != "none")
    c["examples"] += len(ex)
    return ex
