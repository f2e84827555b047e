"""Elastic resume: the rest of an epoch redistributed over another number of data-parallel ranks or workers.

A logical worker's *plan* for an epoch is a list of pieces over the epoch's units (units.py's rows, by
their index in the epoch): ``(lo, hi, skip, wend)``, units ``lo … hi-1`` read in order. ``skip`` > 0 says
that the window starting at ``lo`` (units ``lo … wend-1``, as the worker that began it read them) already
had its first ``skip`` examples, in that window's shuffled order, consumed. Rebuilding the window from the
same units gives the same examples, masks and order (pure functions of (seed, epoch, unit identity)), so
the worker skips those and goes on. Windows never cross a piece's end. Without a change of layout a
worker's plan is one piece, its ``split_range`` share of its rank's share (:func:`default_plan`): what the
loader has always done.

On a change of layout (:func:`replan`), each old worker's *remainder* (:func:`remainder`: the rest of the
piece its cursor is in, from its window's first unit, and its later pieces) is laid end to end in old
(rank, worker) order, which is the epoch's unit order. That sequence is cut into nearly equal runs of
units over the new ranks × workers. A cut never falls inside a partly consumed window: it moves to that
window's end. Every unit not started and every example not consumed is thus read exactly once, by one
new worker. The result is a pure function of (state, new topology).
"""

from __future__ import annotations

import numpy as np

from megamlm.data.units import split_range

__all__ = ["Piece", "carry_over", "default_plan", "remainder", "replan", "split_pieces"]

Piece = tuple[int, int, int, int]  # (lo, hi, skip, wend) over the epoch's unit indices


def default_plan(n_units: int, dp_size: int, num_workers: int) -> list[list[Piece]]:
    """Every logical worker's plan, rank-major (slot ``rank * W + worker``): one piece each, the rank's
    ``split_range`` share of the units cut again by worker."""
    W = max(1, num_workers)
    plan = []
    for r in range(dp_size):
        lo, hi = split_range(n_units, r, dp_size)
        for w in range(W):
            a, b = split_range(hi - lo, w, W)
            plan.append([(lo + a, lo + b, 0, lo + a)])
    return plan


def remainder(pieces: list[Piece], cursor: list[int]) -> list[Piece]:
    """What a worker with ``pieces`` has not consumed at ``cursor`` ([done, unit, offset, batches, end]:
    ``unit`` the local index of its window's first unit, ``offset`` the examples of that window consumed,
    ``end`` one past the window's last unit, local), as pieces over the epoch's units."""
    done, unit, offset, _, end = (int(x) for x in cursor)
    if done:
        return []
    out: list[Piece] = []
    base = 0
    for lo, hi, skip, wend in pieces:
        n = hi - lo
        if base + n <= unit:  # consumed
            base += n
            continue
        if unit <= base:  # not started, or its cursor stands at its first unit with the piece's own skip
            out.append((lo, hi, max(skip, offset), wend if not offset else lo + end - base) if unit == base
                       else (lo, hi, skip, wend))
        else:  # the cursor's window starts inside this piece
            start = lo + unit - base
            out.append((start, hi, offset, lo + end - base) if offset else (start, hi, 0, start))
        base += n
    return out


def split_pieces(pieces: list[Piece], slots: int) -> list[list[Piece]]:
    """``pieces`` (in unit order) cut into ``slots`` runs of nearly equal numbers of units, never inside the
    partly consumed window at a piece's start (``skip`` > 0: units ``lo … wend-1`` stay together)."""
    total = sum(hi - lo for lo, hi, _, _ in pieces)
    out: list[list[Piece]] = [[] for _ in range(slots)]
    pos, slot = 0, 0
    for lo, hi, skip, wend in pieces:
        while lo < hi:
            while slot < slots - 1 and pos >= total * (slot + 1) // slots:
                slot += 1
            room = total * (slot + 1) // slots - pos if slot < slots - 1 else hi - lo
            take = min(hi - lo, max(room, 1))
            if skip and lo + take < wend:  # keep the consumed window whole
                take = wend - lo
            out[slot].append((lo, lo + take, skip, wend if skip else lo))
            pos, lo, skip = pos + take, lo + take, 0
    return out


def replan(plan: list[list[Piece]], cursors: list[list[int]], slots: int) -> list[list[Piece]]:
    """The new plan of ``slots`` logical workers (rank-major) from the old ``plan`` and each old worker's
    cursor (both in old slot order)."""
    if len(plan) != len(cursors):
        raise ValueError(f"a loader state with {len(cursors)} worker cursors for a plan of {len(plan)} workers")
    rest = [p for pieces, c in zip(plan, cursors) for p in remainder(pieces, c)]
    return split_pieces(rest, slots)


def carry_over(state: dict, current_format: str, units: np.ndarray, old_units: np.ndarray,
               slots: int) -> tuple[list[list[Piece]] | None, str | None]:
    """(the new plan, None) for a loader ``state`` of another layout resumed by ``slots`` logical workers,
    ``units`` / ``old_units`` the epoch's units under the new and the old rank count; or (None, why not)."""
    if state["format"] != current_format:
        return None, f"its format ({state['format']}) does not record where windows end"
    if not np.array_equal(units, old_units):
        return None, "the split has fewer blocks than data-parallel ranks (blocks are cut by the rank count)"
    old_plan = state.get("plan") or default_plan(len(units), int(state["dp_size"]), int(state["num_workers"]))
    cursors = [c for r in state["ranks"] for c in r["workers"]]
    return replan([[tuple(int(x) for x in p) for p in w] for w in old_plan], cursors, slots), None
