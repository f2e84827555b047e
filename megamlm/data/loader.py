"""The streaming pretraining loader: shards → examples → masks → :class:`~megamlm.data.batch.Batch`, resumable.

    loader = build_loader(cfg.data, tokenizer, topology, cfg.train.seed, cfg.objective)
    for batch in loader: ...                  # endless: epoch after epoch
    state = loader.state_dict()               # collective over the data-parallel ranks; plain ints
    loader.load_state_dict(state)             # the next batch is the one the uninterrupted run saw next

A rank's stream of batches is stream.py (:class:`~megamlm.data.stream.RankDataset`, run by the DataLoader
workers); this module's :class:`Loader` agrees with the other ranks, ends epochs, counts and keeps the state.

**Work units** (units.py). A WebDataset sample is a block of whole documents (shards.py). Each epoch the shard order
is permuted by ``(seed, epoch)``; the blocks, in that order, are the epoch's *units*. Units are split in
contiguous ranges by data-parallel rank (not global rank: the ranks of a vocab-parallel group read the
same units and make the same batches), then each rank's range by DataLoader worker. Splitting blocks
rather than whole shards keeps ranks balanced to one block even when shards do not divide evenly (the
demo corpus has 3 train shards); a worker still reads consecutive blocks of a few shards, seeking over
the tar members before its range. When there are fewer blocks than data-parallel ranks, each block is
cut into ``P = ceil(dp_size / blocks)`` parts (document j goes to part j mod P). Every document is thus
read by exactly one rank and worker per epoch. A rank's units do not depend on ``num_workers``.

**Examples and masks.** A unit's documents become examples (examples.py: NSP/SOP pairs or packed full
sentences) with ``rng([seed, epoch, block key, part, 0])`` and are masked (masking.py), all of the
unit's sequences in one vectorised call, with ``rng([seed, epoch, block key, part, 1])``: so an example
and its mask are a pure function of (seed, epoch, its identity = (block key, part, index in unit)),
whatever the worker count or the resume point. NotNext B segments come from another document of the
same unit (a block holds ~``block_tokens`` tokens: hundreds of documents).

**Shuffling.** A worker gathers consecutive units into a *window* of at least ``data.shuffle_buffer``
documents, permutes the window's examples (``rng([seed, epoch, window's first unit, 2])``) and cuts
micro-batches from that stream (a batch may straddle two windows). ``shuffle_buffer: 1`` or
``shuffle=False`` (the default for ``split="val"``) keeps shard, document and example order.

**Packing** (``data.packing``). The same stream of examples is cut by tokens instead of by count: a
batch takes examples in window order until the next would pass ``data.micro_batch_tokens`` (a batch
may still straddle two windows), and is one row [1, N] with ``Batch.segments`` instead of padding. The
cursor and the state are the same ints; the examples and masks do not change, only the boundaries.

**Epochs and equalisation.** Within a rank the workers' batches are interleaved round-robin (torch's
DataLoader order; a worker that runs out drops out). Ranks make slightly different numbers of batches
(a deterministic count from the manifest is impossible: how many examples a block makes depends on the
epoch's random draws), so they agree: each rank reads ``data.agree_every`` (W) batches ahead, then all
ranks all-reduce (MIN) how many they hold, in one tiny collective on the host gloo group
``topology.host_group`` (every rank: the ranks of a vocab-parallel group read the same batches, and
they must stop together), never on a device: one host collective per W micro-batches, not per
micro-batch. Every rank yields the agreed number; fewer than W means a rank ran out. A rank that fails
reading sends −1, so the others raise instead of hanging. When any rank runs out, all end the epoch
together; the batches left on other ranks are drained, counted (``stats["dropped_batches"]``,
``stats["dropped_examples"]``) and logged; one more agreement closes the epoch. The batches yielded are
exactly those of an agreement per batch (W = 1): the MIN over ranks of the batches they made. A packet
read ahead changes the state only when it is taken, in stream order, so a checkpoint between batches
holds the position of the last batch yielded. A worker's last batch of an epoch may hold fewer than ``micro_batch_size`` sequences.
Iteration then goes on with the next epoch (new shard order, new examples, new masks). An epoch that
yielded no batch (every rank yields the same number) would repeat for ever: every rank raises
:class:`ShardError` instead, saying why this rank made none (every shard skipped, no document, no
example) or that another rank made none.

**Stopping.** ``should_stop`` (a callable, e.g. the trainer's preemption flag) is asked between epochs,
for each packet that is not a batch and while draining; when it returns True on any rank, every rank
raises :class:`LoaderStopped` at the same agreement, with a state that resumes where it stopped.

**Resume.** The state is, per data-parallel rank and per worker, its cursor (done flag, the unit where
its current window starts, that window's examples consumed, the batches consumed, the window's end),
the epoch, the next worker in the round-robin and the epoch's elastic plan. On resume each worker seeks
to its window's first unit (nothing before is decoded), rebuilds that one window (at most
~``shuffle_buffer`` documents) and skips the consumed examples. ``state_dict()`` is identical on every
rank (it all-gathers the positions), so any rank's copy resumes all. **Elastic:** with another
data-parallel size or worker count, the rest of the epoch (units not started, partly read windows) is
redistributed over the new ranks and workers (elastic.py): every example not yet consumed is read once,
deterministically given (state, new topology); a same-layout resume stays bit-exact. A format-1 state,
or a split with fewer blocks than ranks (its units depend on the rank count), starts the next epoch
with a warning.

**Bad input.** Manifest from another tokenizer: :class:`ShardError` at build time. A shard that is
missing, differs from its manifest sha256 (``data.verify_checksums``), is truncated or corrupt, or holds
ids outside the tokenizer's vocabulary: :class:`ShardError` naming the shard, or with ``data.on_error:
skip`` a warning and ``stats["skipped_shards"]`` (per worker that met it); when the skips leave an epoch
without a batch (e.g. every shard of the split is bad), :class:`ShardError` listing the skipped shards.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from itertools import chain
from typing import Callable, Iterator

import torch

from megamlm.data.batch import Batch
from megamlm.data.loader_state import STATE_FORMAT, STATS, LoaderState
from megamlm.data.masking import MaskSpec
from megamlm.data.shard_format import ShardError, load_manifest
from megamlm.data.stream import Cursor, Packet, RankDataset

log = logging.getLogger(__name__)

__all__ = ["build_loader", "Loader", "LoaderStopped", "STATE_FORMAT", "STATS"]

_FAILED, _STOPPED = -1, -2  # statuses a rank sends in an agreement instead of 1 / 0 (see Loader._agree)


class LoaderStopped(RuntimeError):
    """The loader's ``should_stop()`` returned True (on this or another data-parallel rank) while it was
    between epochs or looping over packets that are not batches; the state is consistent: save it."""


def _identity(x):
    return x


def _worker_context():
    """Workers are forked on Linux: they start in milliseconds, once per epoch (non-persistent, so each
    epoch's dataset state reaches them), and touch no device. Elsewhere, and under a process started by
    ``spawn`` (whose default would re-import torch in every worker, seconds per epoch), this is explicit."""
    import multiprocessing as mp

    return mp.get_context("fork") if sys.platform.startswith("linux") else None


class Loader(LoaderState):
    """Endless iterator of :class:`Batch` for one rank; see the module docstring.

    ``stats``: this rank's counters since the run began (kept in the state, so they continue across a
    resume; a window re-read to resume in its middle is not counted twice): documents, examples,
    short_documents, skipped_tokens, split_segments, forced_isnext, blocks, skipped_shards,
    skipped_blocks, batches, tokens (real, unpadded), targets, dropped_batches, dropped_examples, epochs.
    ``epoch_stats``: the same counters for the last completed epoch (logged at its end).
    ``should_stop``: an optional callable (e.g. the trainer's preemption flag) asked between epochs and
    while the loader loops over packets that are not batches; True raises :class:`LoaderStopped` on every
    data-parallel rank together. It may be set after construction.
    """

    def __init__(self, dataset: RankDataset, topology, prefetch_factor: int = 4,
                 should_stop: Callable[[], bool] | None = None, agree_every: int = 16, pin_memory: bool = False):
        self.ds = dataset
        self.topology = topology
        self.num_workers = dataset.num_workers
        self.prefetch_factor = prefetch_factor
        self.should_stop = should_stop
        self.stats = dict.fromkeys(STATS, 0)
        self.epoch_stats: dict = {}  # the counters of the last completed epoch (what was logged)
        self._epoch_start = dict(self.stats)
        self._skipped: list[str] = []  # this epoch's reasons for skipped shards (this rank)
        if agree_every < 1:
            raise ValueError(f"data.agree_every={agree_every}: must be >= 1")
        self.agree_every = agree_every
        self.pin_memory = pin_memory  # CUDA: the DataLoader pins each batch in its own thread
        self.agreements = 0  # host collectives of this loader so far (telemetry: host syncs per step)
        self.batches_in_epoch = 0
        self._next_worker = 0
        self._mark: tuple[int, list[int]] | None = None  # see mark()
        self.group = topology.host_group
        if topology.world_size > 1 and self.group is None:
            raise ValueError("a loader over several ranks needs topology.host_group (a gloo group over every "
                             "rank) to agree on the batches per epoch")

    @property
    def epoch(self) -> int:
        return self.ds.epoch

    def reset(self, epoch: int = 0) -> None:
        """Go to the start of ``epoch`` (for evaluation: the same batches every time)."""
        self.ds.epoch = epoch
        self.ds.cursors = [Cursor() for _ in self.ds.cursors]
        self._next_worker, self.batches_in_epoch = 0, 0

    def __iter__(self) -> Iterator[Batch]:
        for batch, _ in self._run(False):
            yield batch

    def iter_with_info(self, include_dropped: bool = False) -> Iterator[tuple[Batch, dict]]:
        """Batches with ``info``: each example's identity (block key, part, index) and documents, the
        worker, the epoch and ``dropped`` (True for the batches drained at an epoch's end, only yielded
        with ``include_dropped``). For tests and debugging: it makes the workers record identities."""
        self.ds.with_info = True
        try:
            yield from self._run(include_dropped)
        finally:
            self.ds.with_info = False

    # ------------------------------------------------------------------ iteration
    def _packets(self) -> Iterator[Packet]:
        self.ds.rotation = self._next_worker
        if self.num_workers == 0:
            return self.ds.stream(0)
        # A private generator: starting workers must not draw from the global torch RNG, or dropout
        # would depend on when loaders are (re)started (evaluation, resume). Masks never use it.
        gen = torch.Generator().manual_seed(self.ds.seed)
        dl = torch.utils.data.DataLoader(self.ds, batch_size=None, num_workers=self.num_workers,
                                         collate_fn=_identity, prefetch_factor=self.prefetch_factor,
                                         persistent_workers=False, multiprocessing_context=_worker_context(),
                                         generator=gen, pin_memory=self.pin_memory)
        return iter(dl)

    def _agree(self, status: int, *flags: int) -> tuple[int, int, int]:
        """Elementwise MIN over the data-parallel ranks of (status, flag, flag). Status: 1 (I have a batch),
        0 (I ran out, or: my epoch ended), -1 (I failed), -2 (I was asked to stop). Every agreement has
        the same three elements, so a rank that fails anywhere can answer the one the others wait in."""
        values = (status, *flags, 1, 1)[:3]
        if self.topology.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        self.agreements += 1
        return tuple(int(x) for x in t.tolist())

    @staticmethod
    def _check_status(status: int) -> None:
        if status == _STOPPED:
            raise LoaderStopped("another data-parallel rank was asked to stop")
        if status == _FAILED:
            raise RuntimeError("another data-parallel rank failed while reading data (see its log)")

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise LoaderStopped(f"the loader was asked to stop (epoch {self.epoch} of the {self.ds.split!r} "
                                f"split, after {self.batches_in_epoch} batch(es) of it)")

    def _told(self, next_packet: Callable[[Iterator[Packet]], Packet | None],
              it: Iterator[Packet]) -> Packet | None:
        """``next_packet(it)`` on this rank; if it raises, the other ranks are told in the agreement they wait
        in (the next per-batch one, or the epoch's last), so they raise too instead of hanging."""
        try:
            return next_packet(it)
        except LoaderStopped:
            self._agree(_STOPPED)
            raise
        except BaseException:
            self._agree(_FAILED)
            raise

    def _read_ahead(self, it: Iterator[Packet], ahead: deque[Packet]) -> int:
        """Read packets into ``ahead`` until it holds ``agree_every`` batches or this rank's epoch is over;
        the batches it holds. Only an error packet is acted on here (raised); the others wait their turn."""
        n = sum(p.batch is not None for p in ahead)
        while n < self.agree_every:
            pkt = next(it, None)
            if pkt is None:
                break
            if pkt.error is not None:
                raise ShardError(pkt.error)
            ahead.append(pkt)
            if pkt.batch is not None:
                n += 1
            else:
                self._check_stop()  # a worker's end: reading on may take a while (shards skipped as bad)
        return n

    def _agreed_window(self, it: Iterator[Packet], ahead: deque[Packet]) -> int:
        """How many batches every rank holds after reading ahead: one agreement per window."""
        n = self._told(lambda it_: self._read_ahead(it_, ahead), it)
        status, k, _ = self._agree(1, n)
        self._check_status(status)
        return k

    def _take_through_batch(self, ahead: deque[Packet]) -> Packet:
        """Take the packets of ``ahead`` in order up to and including its first batch; that batch."""
        while True:
            pkt = ahead.popleft()
            self._take(pkt)
            if pkt.batch is not None:
                return pkt

    def _count(self, pkt: Packet) -> None:
        for k, v in pkt.counters.items():
            self.stats[k] += v
        self._skipped += pkt.skipped

    def _take(self, pkt: Packet) -> None:
        self._count(pkt)
        c = self.ds.cursors[pkt.worker]
        c.unit, c.offset, c.end = pkt.cursor
        if pkt.batch is None:
            c.done = 1
        else:
            c.batches += 1
        self._next_worker = (pkt.worker + 1) % max(1, self.num_workers)

    def _next_batch(self, it: Iterator[Packet]) -> Packet | None:
        for pkt in it:
            if pkt.batch is not None:
                return pkt
            if pkt.error is not None:
                raise ShardError(pkt.error)
            self._take(pkt)
            self._check_stop()
        return None

    def _next_dropped(self, it: Iterator[Packet]) -> Packet | None:
        self._check_stop()  # draining makes no batch for the caller: it may take a while
        return self._next_batch(it)

    def _run(self, include_dropped: bool) -> Iterator[tuple[Batch, dict]]:
        while True:
            it = self._packets()
            self._skipped = []
            ahead: deque[Packet] = deque()  # read, not yet taken: the state moves only as batches are yielded
            while True:
                k = self._agreed_window(it, ahead)
                for _ in range(k):
                    pkt = self._take_through_batch(ahead)
                    self.batches_in_epoch += 1
                    b = pkt.batch
                    self.stats["batches"] += 1
                    self.stats["tokens"] += b.n_tokens
                    self.stats["targets"] += b.n_targets
                    yield b, {**(pkt.info or {}), "worker": pkt.worker, "epoch": self.epoch, "dropped": False}
                if k < self.agree_every:
                    break
            yield from self._drain(chain(ahead, it), include_dropped)

    def _drain(self, rest: Iterator[Packet], include_dropped: bool) -> Iterator[tuple[Batch, dict]]:
        """Some rank ran out: the batches left on this one are counted and dropped (yielded with
        ``include_dropped``), its workers' ends taken; then the epoch is closed."""
        dropped, dropped_ex = 0, 0
        while (pkt := self._told(self._next_dropped, rest)) is not None:
            dropped += 1
            dropped_ex += pkt.batch.n_examples
            self._count(pkt)
            if include_dropped:
                yield pkt.batch, {**(pkt.info or {}), "worker": pkt.worker, "epoch": self.epoch, "dropped": True}
        self._end_epoch(dropped, dropped_ex)

    def _end_epoch(self, dropped: int, dropped_ex: int) -> None:
        """Count and log the epoch, then one agreement: did any rank fail or get asked to stop, did the
        epoch yield no batch (every rank yields the same number, so this holds on all or none), did any
        rank make a batch at all. An epoch that yielded nothing raises :class:`ShardError` (the next one
        would do the same, for ever); a stop raises :class:`LoaderStopped` at the start of the next epoch."""
        stop = self.should_stop is not None and self.should_stop()
        status, none_yielded, none_made = self._agree(_STOPPED if stop else 0, int(self.batches_in_epoch == 0),
                                                      int(self.batches_in_epoch + dropped == 0))
        if status == _FAILED:
            raise RuntimeError("another data-parallel rank failed while reading data (see its log)")
        self.stats["dropped_batches"] += dropped
        self.stats["dropped_examples"] += dropped_ex
        self.stats["epochs"] += 1
        self.epoch_stats = {k: v - self._epoch_start[k] for k, v in self.stats.items()}
        self._epoch_start = dict(self.stats)
        log.info("epoch %d done: %d batches; %d batches (%d examples) dropped to equalise the %d "
                 "data-parallel ranks; this epoch's counters: %s", self.epoch, self.batches_in_epoch, dropped,
                 dropped_ex, self.topology.dp_size, {k: v for k, v in self.epoch_stats.items() if v})
        if self.epoch_stats["skipped_shards"]:
            log.warning("epoch %d: %d shard(s) skipped because of errors (data.on_error=skip)", self.epoch,
                        self.epoch_stats["skipped_shards"])
        if none_yielded:
            raise self._empty_epoch_error(dropped, bool(none_made))
        self.reset(self.epoch + 1)
        if status == _STOPPED:
            raise LoaderStopped(f"the loader was asked to stop (before epoch {self.epoch} of the "
                                f"{self.ds.split!r} split)" + ("" if stop else " on another data-parallel rank"))

    def _empty_epoch_error(self, dropped: int, none_made: bool) -> ShardError:
        head = f"epoch {self.epoch} of the {self.ds.split!r} split yielded no batch"
        if self.topology.dp_size == 1:
            return ShardError(f"{head}: {self._why_nothing()}")
        me = f"data-parallel rank {self.topology.dp_rank} of {self.topology.dp_size}"
        if dropped:
            return ShardError(f"{head}: another data-parallel rank made none (see its log); the {dropped} "
                              f"batch(es) of {me} were dropped to equalise the ranks")
        others = "nor did any other" if none_made else "the others' batches were dropped to equalise the ranks"
        return ShardError(f"{head}: {me} made none, {others}; on this rank {self._why_nothing()}")

    def _why_nothing(self) -> str:
        """Why this rank made no batch this epoch (from the epoch's counters and skipped shards)."""
        e = self.epoch_stats
        reasons = list(dict.fromkeys(self._skipped))  # a shard met by two workers: once
        listed = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        if e["skipped_shards"] and not e["blocks"]:
            return f"every shard was skipped (data.on_error=skip): {listed}"
        if e["skipped_shards"]:
            return (f"{e['skipped_shards']} shard(s) were skipped (data.on_error=skip) and the {e['documents']} "
                    f"document(s) read made no example: {listed}")
        if not e["documents"]:
            return ("there was no document to read (fewer documents than data-parallel ranks? each block is "
                    "cut in parts, one per rank, when there are fewer blocks than ranks)")
        return (f"its {e['documents']} document(s) made no example ({e['short_documents']} too short for "
                f"pair={self.ds.pair})")

    # ------------------------------------------------------------------ state


def build_loader(data_cfg, tokenizer, topology, seed: int, objective_cfg, split: str = "train", *,
                 state: dict | None = None, shuffle: bool | None = None,
                 should_stop: Callable[[], bool] | None = None, agree_every: int = 0,
                 pin_memory: bool = False) -> Loader:
    """The loader of one rank over ``data_cfg.shards_dir`` (see the module docstring).

    ``objective_cfg`` chooses the examples (``pair``) and the masking; ``topology`` the data-parallel rank,
    size and host group (``megamlm.distributed.topology``); ``seed`` with the epoch fixes every random
    choice. ``shuffle`` defaults to True for train and False for val. ``state`` from ``state_dict()``.
    ``should_stop``: see :class:`Loader` (:class:`LoaderStopped`). ``agree_every``: at most this many batches
    read ahead before each agreement (0: ``data.agree_every``; an evaluation reading few batches asks fewer).
    ``pin_memory``: the DataLoader pins the batches (for a CUDA device; with workers only).
    """
    manifest = load_manifest(data_cfg.shards_dir)
    manifest.check_tokenizer(tokenizer)
    shards = manifest.shards(split)
    if not shards or not sum(int(s["samples"]) for s in shards):
        raise ShardError(f"{manifest.path}: the {split!r} split has no samples")
    missing = [s["name"] for s in shards if not (manifest.dir / s["name"]).is_file()]
    if missing:
        msg = f"{manifest.dir}: shard(s) listed in the manifest are missing: {', '.join(missing[:5])}"
        if data_cfg.on_error == "raise":
            raise ShardError(msg)
        log.warning("%s (data.on_error=skip: they will be skipped)", msg)
    ds = RankDataset(manifest=manifest, split=split, tokenizer=tokenizer,
                     mask_spec=MaskSpec.build(objective_cfg, tokenizer), pair=objective_cfg.pair,
                     data_cfg=data_cfg, seed=seed, dp_rank=topology.dp_rank, dp_size=topology.dp_size,
                     shuffle=(split == "train") if shuffle is None else shuffle)
    loader = Loader(ds, topology, should_stop=should_stop,
                    agree_every=min(data_cfg.agree_every, agree_every or data_cfg.agree_every), pin_memory=pin_memory)
    if state is not None:
        loader.load_state_dict(state)
    log.info("%s loader: %d shard(s), %d block(s), rank %d of %d data-parallel, %d worker(s), pair=%s, "
             "masking=%s, seq_len=%d, micro-batch %s", split, len(shards), sum(ds.samples), topology.dp_rank,
             topology.dp_size, data_cfg.num_workers, objective_cfg.pair, objective_cfg.masking,
             data_cfg.seq_len, f"of {ds.token_budget} tokens, packed" if ds.packing else data_cfg.micro_batch_size)
    return loader
