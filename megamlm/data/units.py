"""Which documents a worker reads: the epoch's work units and a reader of block ranges from tar shards.

A WebDataset sample is a block of whole documents (shards.py). Each epoch the shard order is permuted by
``(seed, epoch)``; the blocks in that order are the epoch's units, split in contiguous ranges by
data-parallel rank and then by worker (``split_range``), so ranks differ by at most one block and a
worker reads consecutive blocks of few shards. With fewer blocks than data-parallel ranks each block is
cut into ``P`` parts (document j in part j mod P). ``ShardReader`` reads a range of units, seeking over
the tar members before it (nothing is decoded), checks the sha256 against the manifest, the block's
consistency and the token ids' range, and raises :class:`ShardError` naming the shard or, with
``on_error="skip"``, logs a warning, counts the shard and blocks it skips and records why (``skipped``).
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from megamlm.data.masking import concat_ranges
from megamlm.data.shard_format import SAMPLE_MEMBERS, ShardError, npy_load, unpack_block, verify_shard

log = logging.getLogger(__name__)

__all__ = ["epoch_units", "split_range", "ShardReader", "READER_COUNTERS"]

READER_COUNTERS = ("blocks", "skipped_shards", "skipped_blocks")
# The data's random streams: the last element of each numpy seed [train.seed, epoch, ..., stream]. One place
# for all of them (megamlm/ARCHITECTURE.md, "Randomness"): the streams must never collide.
STREAM_EXAMPLES, STREAM_MASKS, STREAM_WINDOW, STREAM_SHARDS = 0, 1, 2, 3


def split_range(n: int, i: int, k: int) -> tuple[int, int]:
    """The i-th of k contiguous, nearly equal parts of range(n) (sizes differ by at most one)."""
    return n * i // k, n * (i + 1) // k


def epoch_units(samples: list[int], seed: int, epoch: int, dp_size: int, shuffle: bool) -> np.ndarray:
    """The epoch's units as rows (shard, block, part, parts): shards in a (seed, epoch) order, blocks in
    file order, each block cut into ``ceil(dp_size / blocks)`` parts when there are fewer blocks than ranks."""
    samples = np.asarray(samples, dtype=np.int64)
    order = np.random.default_rng([seed, epoch, STREAM_SHARDS]).permutation(samples.size) if shuffle \
        else np.arange(samples.size)
    parts = max(1, -(-dp_size // max(1, int(samples.sum()))))
    shard = np.repeat(order, samples[order])
    block = concat_ranges(np.zeros(order.size, dtype=np.int64), samples[order])
    u = np.stack([np.repeat(shard, parts), np.repeat(block, parts), np.tile(np.arange(parts), shard.size),
                  np.full(shard.size * parts, parts)], 1)
    return u.astype(np.int64)


class ShardReader:
    """Yields (unit index, block key, part, documents) for consecutive units, seeking over other blocks."""

    def __init__(self, folder: Path, shards: list[dict], verify: bool, on_error: str, vocab_size: int,
                 counters: dict, skipped: list[str] | None = None):
        self.dir, self.shards, self.verify, self.on_error = Path(folder), shards, verify, on_error
        self.vocab_size, self.c = vocab_size, counters
        self.skipped = skipped if skipped is not None else []  # the message of each skip, in order
        for k in READER_COUNTERS:
            counters.setdefault(k, 0)
        self._verified: set[int] = set()

    def read(self, units: np.ndarray, start: int) -> Iterator[tuple[int, int, int, list]]:
        i = start
        while i < len(units):
            s = int(units[i, 0])
            j = i
            while j < len(units) and units[j, 0] == s:
                j += 1
            yield from self._shard(s, units, i, j)
            i = j

    def _shard(self, s: int, units: np.ndarray, i: int, j: int):
        entry = self.shards[s]
        path = self.dir / entry["name"]
        done = i
        try:
            if self.verify and s not in self._verified:
                verify_shard(path, entry)
                self._verified.add(s)
            for blk, key, members in self._blocks(path, int(units[i, 1]), int(units[j - 1, 1]) + 1, entry):
                docs = list(unpack_block(members, f"shard {path}, sample {key:010d}"))
                top = max((int(d[1].max()) for d in docs if d[1].size), default=0)
                if top >= self.vocab_size:
                    raise ShardError(f"shard {path}, sample {key:010d}: token id {top} is outside the tokenizer's "
                                     f"{self.vocab_size} pieces (a shard made with another tokenizer?)")
                self.c["blocks"] += 1
                while done < j and units[done, 1] == blk:
                    p, n_parts = int(units[done, 2]), int(units[done, 3])
                    yield done, key, p, docs[p::n_parts] if n_parts > 1 else docs
                    done += 1
            if done < j:
                raise ShardError(f"shard {path} ends before block {int(units[done, 1])}; the manifest lists "
                                 f"{entry['samples']} samples")
        except ShardError as e:
            if self.on_error == "raise":
                raise
            self.c["skipped_shards"] += 1
            self.c["skipped_blocks"] += len(np.unique(units[done:j, 1]))
            self.skipped.append(str(e))
            log.warning("skipping the rest of shard %s (data.on_error=skip): %s", path, e)

    @staticmethod
    def _blocks(path: Path, lo: int, hi: int, entry: dict):
        try:
            with tarfile.open(path, mode="r:") as tar:
                blk, key, members = -1, None, {}
                for m in tar:  # on a seekable file, members we do not extract are skipped, not read
                    if not m.isfile():
                        continue
                    k, _, ext = m.name.partition(".")
                    if k != key:
                        if lo <= blk < hi and len(members) != len(SAMPLE_MEMBERS):
                            raise ShardError(f"shard {path}: incomplete sample {key}")
                        blk, key, members = blk + 1, k, {}
                        if blk >= hi:
                            return
                    if blk < lo:
                        continue
                    if ext not in SAMPLE_MEMBERS:
                        raise ShardError(f"shard {path}: unexpected member {m.name!r}")
                    members[ext] = npy_load(tar.extractfile(m).read())
                    if len(members) == len(SAMPLE_MEMBERS):
                        yield blk, int(k), members
                if lo <= blk < hi and len(members) != len(SAMPLE_MEMBERS):
                    raise ShardError(f"shard {path}: incomplete sample {key}")
        except ShardError:
            raise
        except (tarfile.TarError, EOFError, ValueError, OSError) as e:
            raise ShardError(f"shard {path} is corrupt or truncated: {e}") from None
