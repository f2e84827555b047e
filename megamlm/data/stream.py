"""One data-parallel rank's epoch as a stream of packets: its units, read into windows, made into
examples and masks, shuffled and collated into batches, with the cursor to resume from.

:class:`RankDataset` is what the rank's DataLoader workers iterate (each streams its own units);
:class:`~megamlm.data.loader.Loader` consumes the packets, agrees with the other ranks, counts and keeps
the state. The whole design (units, examples and masks, shuffling, resume) is in loader.py's docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megamlm.data.batch import IGNORE_INDEX, Batch
from megamlm.data.examples import COUNTERS, Examples, make_examples
from megamlm.data.masking import concat_ranges, mask_sequences
from megamlm.data.shard_format import ShardError
from megamlm.ops import Segments
from megamlm.data.units import (READER_COUNTERS, STREAM_EXAMPLES, STREAM_MASKS, STREAM_WINDOW, ShardReader,
                                epoch_units, split_range)

__all__ = ["RankDataset", "Packet", "WORKER_COUNTERS", "packed_token_budget", "shards_fingerprint"]

WORKER_COUNTERS = COUNTERS + READER_COUNTERS


def shards_fingerprint(shards: list[dict]) -> str:
    """What a split's data is, wherever its folder lies (names, block counts, sha256 of the manifest's
    entries): a loader state's position means nothing over other shards."""
    key = [[s.get("name"), s.get("samples"), s.get("sha256")] for s in shards]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def packed_token_budget(data_cfg) -> int:
    """Tokens of a packed micro-batch: ``data.micro_batch_tokens``, or when 0 the padded batch's
    ``micro_batch_size × seq_len`` (the same memory as the padded layout at its longest)."""
    budget = int(getattr(data_cfg, "micro_batch_tokens", 0) or 0)
    return budget or int(data_cfg.micro_batch_size) * int(data_cfg.seq_len)


@dataclass
class _Window:
    input: np.ndarray
    labels: np.ndarray
    types: np.ndarray
    offsets: np.ndarray
    pair: np.ndarray | None
    ident: np.ndarray  # [n, 3] block key, part, index in unit
    docs: list
    start: int  # consumer-local unit index of the first unit
    end: int  # one past the last unit read


@dataclass
class Packet:
    """What a worker hands the Loader: a batch, or the end of its epoch, with its cursor after it and what
    it counted (and skipped) since its previous packet."""

    worker: int  # logical worker
    batch: Batch | None  # None: this worker's epoch is over
    cursor: tuple[int, int, int]  # (unit, offset, end) of the next example of this worker
    counters: dict
    info: dict | None = None  # each example's identity and documents (only when the loader asks for them)
    skipped: tuple[str, ...] = ()  # why shards were skipped (data.on_error=skip) since the last packet
    error: str | None = None  # a ShardError in the worker, raised by the Loader in the main process

    def pin_memory(self) -> "Packet":
        """The DataLoader's pinning thread (``pin_memory=True``, CUDA) pins the batch; the rest is host data."""
        return self if self.batch is None else dataclasses.replace(self, batch=self.batch.pin_memory())


@dataclass
class Cursor:
    """Where one logical worker stands in its epoch: ``done`` (its end-of-epoch packet was taken), the
    ``unit`` (local: the index in the worker's own units) where the window of its next example starts and
    the ``offset`` (that window's examples already consumed), the ``batches`` it has handed over, and
    ``end``, one past the window's last unit (what an elastic resume needs to keep the window whole).
    Saved in the loader state as the list ``[done, unit, offset, batches, end]`` (format 1: without end)."""

    done: int = 0
    unit: int = 0
    offset: int = 0
    batches: int = 0
    end: int = 0

    def as_list(self) -> list[int]:
        return [int(self.done), int(self.unit), int(self.offset), int(self.batches), int(self.end)]

    @classmethod
    def from_list(cls, values) -> "Cursor":
        return cls(*(int(x) for x in values))


class RankDataset(torch.utils.data.IterableDataset):
    """One rank's epoch; each DataLoader worker streams its own units (see loader.py's docstring)."""

    def __init__(self, *, manifest, split, tokenizer, mask_spec, pair, data_cfg, seed, dp_rank, dp_size,
                 shuffle, with_info=False):
        self.dir, self.split = manifest.dir, split
        self.shards = [dict(s) for s in manifest.shards(split)]
        self.shards_id = shards_fingerprint(self.shards)
        self.samples = [int(s["samples"]) for s in self.shards]
        self.spec, self.pair, self.seed = mask_spec, pair, int(seed)
        self.max_len, self.micro_batch = data_cfg.seq_len, data_cfg.micro_batch_size
        self.pad_to_max = data_cfg.pad_to == "max"
        self.packing = bool(getattr(data_cfg, "packing", False))
        self.token_budget = packed_token_budget(data_cfg)
        self.buffer, self.short_seq_prob = data_cfg.shuffle_buffer, data_cfg.short_seq_prob
        self.verify, self.on_error = data_cfg.verify_checksums, data_cfg.on_error
        self.num_workers = data_cfg.num_workers
        self.shuffle = shuffle and data_cfg.shuffle_buffer > 1  # shards, documents and examples alike
        self.vocab_size = tokenizer.vocab_size
        self.pad_id, self.cls_id, self.sep_id = tokenizer.special.pad, tokenizer.special.cls, tokenizer.special.sep
        self.dp_rank, self.dp_size, self.with_info = dp_rank, dp_size, with_info
        self.epoch, self.rotation = 0, 0
        self.cursors = [Cursor() for _ in range(max(1, self.num_workers))]
        self.plan_epoch, self.plan = -1, None  # elastic.py: every rank's workers' pieces for plan_epoch

    def set_plan(self, epoch: int, plan: list | None) -> None:
        """Read epoch ``epoch`` by ``plan`` (every logical worker's pieces, rank-major; elastic.py) instead
        of the default split; None: the default."""
        self.plan_epoch, self.plan = (epoch, [[tuple(int(x) for x in p) for p in w] for w in plan]) if plan \
            else (-1, None)

    def units(self, epoch: int) -> np.ndarray:
        return epoch_units(self.samples, self.seed, epoch, self.dp_size, self.shuffle)

    def worker_plan(self, epoch: int, worker: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """The worker's units [n, 4] (its pieces' units end to end) and its pieces in that local indexing,
        (lo, hi, skip): the elastic plan's when one is set for ``epoch``, else its rank's split_range
        share cut again by worker (one piece)."""
        u = self.units(epoch)
        W = max(1, self.num_workers)
        if self.plan is not None and epoch == self.plan_epoch:
            pieces = self.plan[self.dp_rank * W + worker]
        else:
            lo, hi = split_range(len(u), self.dp_rank, self.dp_size)
            wlo, whi = split_range(hi - lo, worker, W)
            pieces = [(lo + wlo, lo + whi, 0, lo + wlo)]
        local, base = [], 0
        for lo, hi, skip, _ in pieces:
            local.append((base, base + hi - lo, skip))
            base += hi - lo
        rows = np.concatenate([u[lo:hi] for lo, hi, _, _ in pieces]) if pieces else u[:0]
        return rows, local

    def __iter__(self) -> Iterator[Packet]:
        info = torch.utils.data.get_worker_info()
        phys, n_phys = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_phys != max(1, self.num_workers):
            raise RuntimeError(f"loader built for {self.num_workers} workers runs under {n_phys}")
        worker = (self.rotation + phys) % n_phys
        try:
            yield from self.stream(worker)
        except ShardError as e:  # handed over as data: the main process raises it (and shuts down cleanly)
            yield Packet(worker, None, (0, 0, 0), {}, error=str(e))

    # ------------------------------------------------------------------ one worker's stream
    def _unit(self, key: int, part: int, docs: list, counters: dict) -> _Window:
        e = self.epoch
        ex: Examples = make_examples(docs, self.pair, self.max_len, cls_id=self.cls_id, sep_id=self.sep_id,
                                     rng=np.random.default_rng([self.seed, e, key, part, STREAM_EXAMPLES]),
                                     short_seq_prob=self.short_seq_prob, shuffle=self.shuffle, counters=counters)
        m = mask_sequences(ex.tokens, ex.offsets, self.spec, np.random.default_rng([self.seed, e, key, part, STREAM_MASKS]))
        n = len(ex)
        ident = np.stack([np.full(n, key), np.full(n, part), np.arange(n)], 1)
        return _Window(m.input_ids, m.labels, ex.types, ex.offsets, ex.pair_labels, ident, ex.docs, 0, 0)

    @staticmethod
    def _concat(ws: list[_Window], start: int, end: int) -> _Window:
        if len(ws) == 1:
            w = ws[0]
            w.start, w.end = start, end
            return w
        offs = [ws[0].offsets]
        for w in ws[1:]:
            offs.append(w.offsets[1:] + offs[-1][-1])
        pair = None if ws[0].pair is None else np.concatenate([w.pair for w in ws])
        return _Window(np.concatenate([w.input for w in ws]), np.concatenate([w.labels for w in ws]),
                       np.concatenate([w.types for w in ws]), np.concatenate(offs), pair,
                       np.concatenate([w.ident for w in ws]), [d for w in ws for d in w.docs], start, end)

    def _collate(self, segs: list[tuple[_Window, np.ndarray]]) -> tuple[Batch, dict | None]:
        batch = self._collate_packed(segs) if self.packing else self._collate_padded(segs)
        info = None
        if self.with_info:
            info = {"ident": [tuple(int(x) for x in w.ident[j]) for w, i in segs for j in i],
                    "docs": [w.docs[j] for w, i in segs for j in i]}
        return batch, info

    @staticmethod
    def _pair_labels(segs: list[tuple[_Window, np.ndarray]]) -> torch.Tensor | None:
        if segs[0][0].pair is None:
            return None
        return torch.from_numpy(np.concatenate([w.pair[i] for w, i in segs]).astype(np.int64))

    def _collate_packed(self, segs: list[tuple[_Window, np.ndarray]]) -> Batch:
        """The examples back to back in one row [1, N]: no padding; ``segments`` marks where each starts."""
        lens = np.concatenate([w.offsets[i + 1] - w.offsets[i] for w, i in segs])
        spans = [(w, concat_ranges(w.offsets[i], w.offsets[i + 1])) for w, i in segs]
        ids = np.concatenate([w.input[src] for w, src in spans]).astype(np.int64, copy=False)
        labels = np.concatenate([w.labels[src] for w, src in spans]).astype(np.int64, copy=False)
        types = np.concatenate([w.types[src] for w, src in spans]).astype(np.int64, copy=False)
        cu = np.zeros(lens.size + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        pos = np.flatnonzero(labels != IGNORE_INDEX)
        return Batch(input_ids=torch.from_numpy(ids[None]), token_type_ids=torch.from_numpy(types[None]),
                     attention_mask=None, mlm_labels=torch.from_numpy(labels[None]),
                     mlm_positions=torch.from_numpy(pos), mlm_targets=torch.from_numpy(labels[pos]),
                     pair_labels=self._pair_labels(segs), n_tokens=int(ids.size),
                     segments=Segments(torch.from_numpy(cu), int(lens.max())))

    def _collate_padded(self, segs: list[tuple[_Window, np.ndarray]]) -> Batch:
        lens = np.concatenate([w.offsets[i + 1] - w.offsets[i] for w, i in segs])
        B = lens.size
        T = self.max_len if self.pad_to_max else int(lens.max())
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        row0 = 0
        for w, i in segs:
            ln = w.offsets[i + 1] - w.offsets[i]
            rows = np.repeat(np.arange(row0, row0 + i.size), ln)
            cols = concat_ranges(np.zeros(i.size, dtype=np.int64), ln)
            src = concat_ranges(w.offsets[i], w.offsets[i + 1])
            ids[rows, cols] = w.input[src]
            labels[rows, cols] = w.labels[src]
            types[rows, cols] = w.types[src]
            row0 += i.size
        pos = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX)
        return Batch(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                     attention_mask=torch.from_numpy(np.arange(T)[None, :] < lens[:, None]),
                     mlm_labels=torch.from_numpy(labels), mlm_positions=torch.from_numpy(pos),
                     mlm_targets=torch.from_numpy(labels.reshape(-1)[pos]), pair_labels=self._pair_labels(segs),
                     n_tokens=int(lens.sum()))

    def _fill(self, csum: np.ndarray | None, j: int, n_ex: int, n_pending: int) -> tuple[int, int, bool]:
        """How far the pending batch takes the window's examples from ``j`` (of ``n_ex``): (the end k,
        n_pending after, whether the batch is full). Packed: in order until the next would pass the
        token budget (``csum``: the window's cumulative lengths in order; n_pending counts tokens);
        padded: up to micro_batch examples (n_pending counts examples)."""
        if self.packing:
            k = int(np.searchsorted(csum, csum[j] + self.token_budget - n_pending, side="right")) - 1
            if k == j and not n_pending:  # the config refuses a budget below seq_len: never by construction
                raise ShardError(f"an example of {int(csum[j + 1] - csum[j])} tokens exceeds "
                                 f"data.micro_batch_tokens={self.token_budget}")
            return k, n_pending + int(csum[k] - csum[j]), k < n_ex  # full: the next example does not fit
        k = j + min(self.micro_batch - n_pending, n_ex - j)
        n_pending += k - j
        return k, n_pending, n_pending == self.micro_batch

    def stream(self, worker: int) -> Iterator[Packet]:
        """The packets of one logical worker from its cursor: batches, then one end-of-epoch packet."""
        c = self.cursors[worker]
        u, skip = c.unit, c.offset
        counters = dict.fromkeys(WORKER_COUNTERS, 0)
        skipped: list[str] = []
        units, pieces = self.worker_plan(self.epoch, worker)
        n_units = len(units)

        def packet(batch: Batch | None, cursor: tuple[int, int, int], info: dict | None = None) -> Packet:
            out = Packet(worker, batch, cursor, dict(counters), info, tuple(skipped))
            counters.update(dict.fromkeys(counters, 0))
            skipped.clear()
            return out

        if c.done:
            return
        reader = ShardReader(self.dir, self.shards, self.verify, self.on_error, self.vocab_size, counters, skipped)
        pending: list[tuple[_Window, np.ndarray]] = []
        n_pending = 0
        for lo, hi, piece_skip in pieces:  # windows never cross a piece's end
            if hi <= u:
                continue
            if u == lo:  # a piece's first window: its examples consumed before a change of layout stay skipped
                skip = max(skip, piece_skip)
            it = reader.read(units[:hi], u)
            while u < hi:
                start, win, u = self._window(it, units, u, hi, counters)
                if win is None:
                    break
                n_ex = win.offsets.size - 1
                order = np.arange(n_ex)
                if self.shuffle:
                    order = np.random.default_rng([self.seed, self.epoch, int(units[start, 0]), int(units[start, 1]),
                                                   int(units[start, 2]), STREAM_WINDOW]).permutation(n_ex)
                j, skip = skip, 0
                if j:  # resumed in this window's middle: its reading was counted (and its skips reported) before
                    counters.update(dict.fromkeys(counters, 0))
                    skipped.clear()
                csum = np.concatenate([[0], np.cumsum(np.diff(win.offsets)[order])]) if self.packing else None
                while j < n_ex:
                    k, n_pending, full = self._fill(csum, j, n_ex, n_pending)
                    if k > j:
                        pending.append((win, order[j:k]))
                        j = k
                    if full:
                        batch, info = self._collate(pending)
                        pending, n_pending = [], 0
                        yield packet(batch, (start, j, u) if j < n_ex else (u, 0, u), info)
            u = max(u, hi)
        if pending:
            batch, info = self._collate(pending)
            yield packet(batch, (n_units, 0, n_units), info)
        yield packet(None, (n_units, 0, n_units))

    def _window(self, it, units: np.ndarray, u: int, hi: int, counters: dict) -> tuple[int, _Window | None, int]:
        """The next window from unit ``u`` (local) of ``it`` (the reader, up to the piece's end ``hi``):
        consecutive units until ``data.shuffle_buffer`` documents (one unit without shuffling); (its first
        unit, the window or None when nothing is left, one past its last unit)."""
        start, unit_windows, n_docs = u, [], 0
        for li, key, part, docs in it:
            unit_windows.append(self._unit(key, part, docs, counters))
            n_docs += len(docs)
            u = li + 1
            if not self.shuffle or n_docs >= self.buffer:
                break
        else:
            u = hi  # the reader is exhausted (the rest may have been skipped as bad)
        if not unit_windows:
            return start, None, hi
        return start, self._concat(unit_windows, start, u), u
