"""The elastic plan (megamlm/data/elastic.py) as pure functions: what is left of each old worker, and its
cut over a new number of workers. The loader-level proofs (every example once) are in test_loader.py and
tests/distributed/test_loader_ranks.py."""

from __future__ import annotations

import numpy as np
import pytest

from megamlm.data.elastic import default_plan, remainder, replan, split_pieces


def test_the_default_plan_is_the_split_range_share_of_each_rank_and_worker():
    plan = default_plan(10, 2, 2)
    assert plan == [[(0, 2, 0, 0)], [(2, 5, 0, 2)], [(5, 7, 0, 5)], [(7, 10, 0, 7)]]
    assert default_plan(3, 1, 0) == [[(0, 3, 0, 0)]]


def test_a_remainder_starts_at_the_cursors_window_and_keeps_its_consumed_examples():
    pieces = [(10, 20, 0, 10), (30, 35, 4, 32)]  # local units 0-9, then 10-14 (its first window 30-31 read 4)
    assert remainder(pieces, [0, 3, 5, 2, 6]) == [(13, 20, 5, 16), (30, 35, 4, 32)]
    assert remainder(pieces, [0, 3, 0, 2, 3]) == [(13, 20, 0, 13), (30, 35, 4, 32)]
    assert remainder(pieces, [0, 10, 0, 5, 10]) == [(30, 35, 4, 32)]  # at the second piece: its own skip
    assert remainder(pieces, [0, 10, 7, 6, 12]) == [(30, 35, 7, 32)]  # resumed inside that window
    assert remainder(pieces, [0, 15, 0, 9, 15]) == [] == remainder(pieces, [1, 15, 0, 9, 15])


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 8, 40])
def test_a_cut_covers_every_unit_once_in_order_and_never_splits_a_read_window(slots):
    rng = np.random.default_rng(slots)
    pieces, lo = [], 0
    for _ in range(6):
        lo += int(rng.integers(0, 3))
        hi = lo + int(rng.integers(1, 9))
        skip = int(rng.integers(0, 2)) * int(rng.integers(1, 30))
        pieces.append((lo, hi, skip, min(hi, lo + int(rng.integers(1, 4))) if skip else lo))
        lo = hi
    out = split_pieces(pieces, slots)
    assert len(out) == slots
    flat = [p for w in out for p in w]
    units = [u for lo, hi, _, _ in flat for u in range(lo, hi)]
    assert units == [u for lo, hi, _, _ in pieces for u in range(lo, hi)]  # each unit once, in order
    for lo, _, skip, wend in pieces:
        if skip:  # the read window stays in one new piece, with its skip, and no other piece skips there
            holder = [p for p in flat if p[0] <= lo < p[1]]
            assert holder == [(lo, holder[0][1], skip, wend)] and holder[0][1] >= wend
    sizes = [sum(hi - lo for lo, hi, _, _ in w) for w in out]
    total, biggest = sum(sizes), max(p[3] - p[0] for p in pieces)
    assert max(sizes) <= -(-total // slots) + biggest  # balanced up to one kept window
    assert split_pieces(pieces, slots) == out  # deterministic


def test_replan_refuses_cursors_that_do_not_match_the_plan():
    with pytest.raises(ValueError, match="3 worker cursors for a plan of 2 workers"):
        replan(default_plan(4, 1, 2), [[0, 0, 0, 0, 0]] * 3, 2)
