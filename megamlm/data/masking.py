"""Masked-LM target selection: token, whole-word (SentencePiece) and span (SpanBERT), then 80/10/10.

Everything here is a pure function of (tokens, spec, rng): the loader seeds ``rng`` from
``(seed, epoch, sample identity)``, so a mask depends neither on the number of workers nor on resuming.
The functions take many sequences at once as one flat array plus ``offsets`` (sequence i is
``tokens[offsets[i]:offsets[i+1]]``) and are vectorised over all of them: no Python loop per token or per
word (span masking loops over *rounds*, each drawing one span for every sequence still under budget).

Selection, per sequence, over the *candidates* (every token but [PAD] [CLS] [SEP] [MASK] and the
padding rows of the vocabulary, ``tokenizer.special_mask``), with the budget
``k = max(1, round(p * n_candidates))`` as BERT (0 when there is no candidate):

* ``token``: exactly k candidates, uniformly without replacement.
* ``whole_word``: a word is a piece starting with "▁" (``tokenizer.word_start``) plus the continuation
  pieces after it (a candidate right after a special token also starts a word). Words are taken in a
  random order while they fit; the word that crosses the budget is taken when that lands nearer to k
  (so the expected count is k), and always when nothing was taken yet. A word is never split.
* ``span``: span lengths in words are drawn from a Geometric(p) truncated at ``span_max_words`` and
  renormalised (SpanBERT's code; mean 3.8 words for p=0.2), an anchor word uniformly; a span stops
  before an already masked word and at the end of the sequence (spans never overlap; an anchor on a
  masked word is redrawn); the span that crosses the budget keeps the whole words that fit, plus the
  crossing word when that lands nearer to k.

Of the selected units (tokens; words; spans) ``mask_ratio`` become [MASK], ``random_ratio`` random ids
drawn from ``tokenizer.random_candidates`` (per token) and the rest stay unchanged. Labels are
``IGNORE_INDEX`` (−100) wherever nothing is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["IGNORE_INDEX", "MaskSpec", "Masked", "mask_sequences", "mask_sequence", "concat_ranges",
           "span_length_pmf"]

from megamlm.labels import IGNORE_INDEX  # noqa: E402 (torch-free)
MODES = ("token", "whole_word", "span")


@dataclass(frozen=True)
class MaskSpec:
    """What to select and how to corrupt it; built once from the objective config and the tokenizer."""

    special: np.ndarray = field(repr=False)  # bool [padded vocab]: never selected
    word_start: np.ndarray = field(repr=False)  # bool [padded vocab]: piece begins a word
    random_ids: np.ndarray = field(repr=False)  # int64: ids a random replacement may take
    mask_id: int = 4
    mode: str = "token"
    probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1
    span_p: float = 0.2
    span_max_words: int = 10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"masking mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"mlm probability {self.probability} must be in (0, 1]")
        if self.mask_ratio < 0 or self.random_ratio < 0 or self.mask_ratio + self.random_ratio > 1 + 1e-9:
            raise ValueError(f"mask_ratio={self.mask_ratio} + random_ratio={self.random_ratio} must be in [0, 1]")

    @classmethod
    def build(cls, objective_cfg, tokenizer) -> "MaskSpec":
        o = objective_cfg
        return cls(special=tokenizer.special_mask, word_start=tokenizer.word_start,
                   random_ids=tokenizer.random_candidates, mask_id=tokenizer.special.mask, mode=o.masking,
                   probability=o.mlm_probability, mask_ratio=o.mask_token_ratio,
                   random_ratio=o.random_token_ratio, span_p=o.span_geometric_p, span_max_words=o.span_max_words)


@dataclass
class Masked:
    input_ids: np.ndarray  # flat, the tokens after corruption (same dtype as the input)
    labels: np.ndarray  # flat int32: the original id where predicted, IGNORE_INDEX elsewhere
    # span mode only, one row per span: sequence, words drawn, words masked, 1 if cut short (budget,
    # end of sequence or a neighbouring span). For tests and diagnostics.
    spans: np.ndarray | None = None


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])`` without the Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(ends, dtype=np.int64) - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = starts - (np.cumsum(lens) - lens)  # per range: value minus position in the output
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lens)


def span_length_pmf(p: float, max_words: int) -> np.ndarray:
    """P(length = 1..max_words): Geometric(p) truncated at max_words and renormalised."""
    lens = np.arange(1, max_words + 1)
    pmf = p * (1 - p) ** (lens - 1)
    return pmf / pmf.sum()


def _budget(n: np.ndarray, p: float) -> np.ndarray:
    k = np.rint(n * p).astype(np.int64)  # round half to even, as Python's round() in BERT's code
    return np.minimum(np.maximum(k, (n > 0).astype(np.int64)), n)


def _rank_in_group(group: np.ndarray, rng: np.random.Generator, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """A random order of items grouped by ``group`` (sorted ascending, contiguous): (order, rank of each
    ordered item within its group)."""
    order = np.argsort(group + rng.random(group.size), kind="stable")
    counts = np.bincount(group, minlength=n_groups)
    first = np.cumsum(counts) - counts
    return order, np.arange(group.size) - first[group[order]]


def _words(tokens: np.ndarray, seq: np.ndarray, starts: np.ndarray, spec: MaskSpec):
    """Candidate mask, word id per token (−1 off candidates), first token and length of each word."""
    cand = ~spec.special[tokens]
    prev = np.empty_like(cand)
    prev[0:1] = False
    prev[1:] = cand[:-1]
    prev[starts[starts < tokens.size]] = False
    new_word = cand & (spec.word_start[tokens] | ~prev)
    word_id = np.cumsum(new_word) - 1
    word_id[~cand] = -1
    first = np.flatnonzero(new_word)
    length = np.bincount(word_id[cand], minlength=first.size)
    return cand, word_id, first, length


def _select_token(tokens, seq, n_seq, spec, rng):
    cand_idx = np.flatnonzero(~spec.special[tokens])
    cseq = seq[cand_idx]
    k = _budget(np.bincount(cseq, minlength=n_seq), spec.probability)
    order, rank = _rank_in_group(cseq, rng, n_seq)
    keep = rank < k[cseq[order]]
    sel = np.sort(cand_idx[order[keep]])
    return sel, np.arange(sel.size)  # every token is its own unit


def _select_whole_word(tokens, seq, starts, n_seq, spec, rng):
    cand, word_id, first, wlen = _words(tokens, seq, starts, spec)
    if first.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    wseq = seq[first]
    k = _budget(np.bincount(wseq, weights=wlen, minlength=n_seq).astype(np.int64), spec.probability)
    order, _ = _rank_in_group(wseq, rng, n_seq)
    ol, os_ = wlen[order], wseq[order]
    seq_tokens = np.bincount(os_, weights=ol, minlength=n_seq).astype(np.int64)
    after = np.cumsum(ol) - (np.cumsum(seq_tokens) - seq_tokens)[os_]  # tokens taken up to this word
    before = after - ol
    ks = k[os_]
    nearer = (after - ks <= ks - before) | (before == 0)
    take = (after <= ks) | ((before < ks) & (after > ks) & nearer)
    chosen = np.zeros(first.size, dtype=bool)
    chosen[order[take]] = True
    sel = np.flatnonzero(cand & chosen[np.maximum(word_id, 0)])
    unit = np.cumsum(chosen) - 1  # unit id = index among chosen words
    return sel, unit[word_id[sel]]


def _select_span(tokens, seq, starts, n_seq, spec, rng, max_rounds: int = 256):
    cand, word_id, first, wlen = _words(tokens, seq, starts, spec)
    nwt = first.size
    if nwt == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.int64)
    wseq = seq[first]
    nw = np.bincount(wseq, minlength=n_seq)
    wofs = np.cumsum(nw) - nw  # first word of each sequence
    wc = np.concatenate([[0], np.cumsum(wlen)])  # token prefix sums over words
    k = _budget(np.bincount(wseq, weights=wlen, minlength=n_seq).astype(np.int64), spec.probability)
    cdf = np.cumsum(span_length_pmf(spec.span_p, spec.span_max_words))
    span_of_word = np.full(nwt, -1, dtype=np.int64)
    cur = np.zeros(n_seq, dtype=np.int64)
    active = (nw > 0) & (k > 0)
    rows = []
    n_spans = 0
    for _ in range(max_rounds):
        a = np.flatnonzero(active)
        if a.size == 0:
            break
        drawn = np.minimum(np.searchsorted(cdf, rng.random(a.size), side="right") + 1, spec.span_max_words)
        anchor = wofs[a] + np.minimum((rng.random(a.size) * nw[a]).astype(np.int64), nw[a] - 1)
        end = np.minimum(anchor + drawn, wofs[a] + nw[a])
        # stop before the first already masked word inside [anchor, end)
        idx = concat_ranges(anchor, end)
        pos = idx - np.repeat(anchor, end - anchor)
        blocked = np.where(span_of_word[idx] >= 0, pos, np.iinfo(np.int64).max)
        first_blocked = np.minimum.reduceat(blocked, np.cumsum(end - anchor) - (end - anchor))
        end = np.where(first_blocked < end - anchor, anchor + first_blocked, end)
        ok = end > anchor  # an anchor on a masked word is redrawn next round
        rem = k[a] - cur[a]
        fits = wc[end] - wc[anchor] <= rem
        target = wc[anchor] + rem
        m = np.minimum(np.searchsorted(wc, target, side="right") - 1, end)  # whole words that fit: [anchor, m)
        nxt = np.minimum(m + 1, nwt)
        nearer = (wc[nxt] - target <= target - wc[m]) | ((cur[a] == 0) & (m == anchor))
        cut = np.where(fits, end, m + ((m < end) & nearer))
        take = ok & (cut > anchor)
        t_idx = concat_ranges(anchor[take], cut[take])
        span_of_word[t_idx] = np.repeat(np.arange(n_spans, n_spans + int(take.sum())), (cut - anchor)[take])
        n_spans += int(take.sum())
        cur[a] += np.where(take, wc[cut] - wc[anchor], 0)
        rows.append(np.stack([a, drawn, np.where(take, cut - anchor, 0), (cut - anchor < drawn)], 1)[take])
        active[a[(ok & ~fits) | (cur[a] >= k[a])]] = False
    sel = np.flatnonzero(cand & (span_of_word[np.maximum(word_id, 0)] >= 0))
    spans = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)
    return sel, span_of_word[word_id[sel]], spans


def mask_sequences(tokens: np.ndarray, offsets: np.ndarray, spec: MaskSpec, rng: np.random.Generator) -> Masked:
    """Select and corrupt MLM targets in every sequence of the flat ``tokens``; see the module docstring."""
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    n_seq = offsets.size - 1
    labels = np.full(tokens.size, IGNORE_INDEX, dtype=np.int32)
    if tokens.size == 0 or n_seq <= 0:
        return Masked(tokens.copy(), labels, np.zeros((0, 4), dtype=np.int64) if spec.mode == "span" else None)
    seq = np.repeat(np.arange(n_seq), np.diff(offsets))
    starts = offsets[:-1]
    spans = None
    if spec.mode == "token":
        sel, unit = _select_token(tokens, seq, n_seq, spec, rng)
    elif spec.mode == "whole_word":
        sel, unit = _select_whole_word(tokens, seq, starts, n_seq, spec, rng)
    else:
        sel, unit, spans = _select_span(tokens, seq, starts, n_seq, spec, rng)
    labels[sel] = tokens[sel]
    out = tokens.copy()
    n_units = int(unit.max()) + 1 if unit.size else 0
    u = rng.random(n_units)[unit]  # one decision per unit (token, word or span), shared by its tokens
    to_mask = u < spec.mask_ratio
    to_rand = (u >= spec.mask_ratio) & (u < spec.mask_ratio + spec.random_ratio)
    out[sel[to_mask]] = spec.mask_id
    n_rand = int(to_rand.sum())
    if n_rand:
        out[sel[to_rand]] = spec.random_ids[rng.integers(0, spec.random_ids.size, n_rand)]
    return Masked(out, labels, spans)


def mask_sequence(tokens: np.ndarray, spec: MaskSpec, rng: np.random.Generator) -> Masked:
    """One sequence: ``mask_sequences`` with a single offset pair."""
    tokens = np.asarray(tokens)
    return mask_sequences(tokens, np.array([0, tokens.size]), spec, rng)
