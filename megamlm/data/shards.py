"""Pretokenized WebDataset shards: writing them (``make-shards``); reading them is shard_format.py.

A WebDataset sample is a *block* of whole documents (about ``block_tokens`` tokens), so that tar headers
stay a negligible share of the bytes (one sample per short document would make shards ~4x the text)::

    <key>.ids.npy     token ids of the block's documents, concatenated (uint16, or int32 when the padded
                      vocabulary exceeds 65,536)
    <key>.sents.npy   int32 sentence lengths in tokens, concatenated (NSP/SOP need the boundaries)
    <key>.docs.npy    int32 sentences per document
    <key>.index.npy   int64 each document's position in the corpus (its identity)

``key`` is the first document's position (``%010d``). Shards are ``train-%06d.tar`` and ``val-%06d.tar``;
a document goes to validation when the hash of its text falls below ``data.val_fraction``, so the split
does not depend on order or worker count. Each tar is written as ``<name>.partial`` and renamed when
complete; ``manifest.json`` (counts and sha256 per shard, totals, the tokenizer's identity, what was
read and what was skipped) is written last, atomically. All of it goes to a staging folder first and is
swapped into the output folder at the end (outdir.py): a failed run leaves the folder as it found it,
and a failed ``--overwrite`` keeps the old set whole.

Work split: this process cuts the input files into raw byte chunks on document boundaries and writes the
tars; worker processes (all cores by default) decode, parse, split sentences and tokenize, and return
flat arrays. The output is byte-identical for any number of processes and any chunk size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megamlm.data.corpus import CorpusError, ReadStats, iter_chunks
from megamlm.errors import MegamlmError
from megamlm.data.encode import EncodedChunk, encode_chunk, init_worker
from megamlm.data.outdir import ShardOutput
from megamlm.data.shard_format import (MANIFEST, MANIFEST_FORMAT, SAMPLE_MEMBERS, SPLITS, STAGING, Manifest,
                                       ShardError, existing_shards, iter_shard, load_manifest, npy_bytes,
                                       npy_load, unpack_block, verify_shard)

log = logging.getLogger(__name__)

__all__ = ["make_shards", "ShardStats",  # the writer; the names below are shard_format.py's, re-exported
           "MANIFEST", "MANIFEST_FORMAT", "SAMPLE_MEMBERS", "SPLITS", "STAGING", "Manifest", "ShardError",
           "existing_shards", "iter_shard", "load_manifest", "npy_bytes", "npy_load", "unpack_block",
           "verify_shard"]


# --------------------------------------------------------------------------- writer

@dataclass
class ShardStats:
    name: str
    documents: int = 0
    sentences: int = 0
    tokens: int = 0
    samples: int = 0
    text_bytes: int = 0
    bytes: int = 0
    sha256: str = ""


class _SplitWriter:
    """Groups documents into blocks and blocks into tar files of about the target size; each tar is
    renamed into place when complete."""

    def __init__(self, out_dir: Path, split: str, target_bytes: int, block_tokens: int):
        self.out_dir, self.split, self.target, self.block_tokens = out_dir, split, target_bytes, block_tokens
        self.shards: list[ShardStats] = []
        self._tar = None
        self._file = None
        self._hash = None
        self._cur: ShardStats | None = None
        self._block: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []  # runs of docs
        self._block_tokens = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._cur = ShardStats(name)
        self._hash = hashlib.sha256()
        self._file = _HashingFile(open(self.out_dir / (name + ".partial"), "wb"), self._hash)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # reproducible bytes
        self._tar.addfile(info, io.BytesIO(data))

    def write_docs(self, index: np.ndarray, ntok: np.ndarray, nsent: np.ndarray, sents: np.ndarray,
                   ids: np.ndarray, tb: np.ndarray) -> None:
        """Append a run of documents (flat arrays as in :class:`EncodedChunk`). A block is closed after the
        first document that brings it to ``block_tokens``; one searchsorted per block, no per-document
        Python work."""
        n = index.size
        if not n:
            return
        tok_end = np.cumsum(ntok)  # [n]
        sent_end = np.cumsum(nsent)  # [n]
        start = 0
        while start < n:
            base = int(tok_end[start - 1]) if start else 0
            j = int(np.searchsorted(tok_end, base + self.block_tokens - self._block_tokens, side="left"))
            stop = min(j + 1, n)  # documents [start, stop) join the current block
            s0 = int(sent_end[start - 1]) if start else 0
            s1 = int(sent_end[stop - 1])
            t1 = int(tok_end[stop - 1])
            self._block.append((index[start:stop], nsent[start:stop], sents[s0:s1], ids[base:t1],
                                int(tb[start:stop].sum())))
            self._block_tokens += t1 - base
            start = stop
            if j < n:
                self._flush_block()

    def _flush_block(self) -> None:
        if not self._block:
            return
        if self._tar is None:
            self._open()
        block, self._block, self._block_tokens = self._block, [], 0
        index = np.concatenate([b[0] for b in block]).astype(np.int64)
        docs = np.concatenate([b[1] for b in block]).astype(np.int32)
        sents = np.concatenate([b[2] for b in block]).astype(np.int32)
        ids = np.concatenate([b[3] for b in block])
        key = f"{int(index[0]):010d}"
        self._add(f"{key}.ids.npy", npy_bytes(ids))
        self._add(f"{key}.sents.npy", npy_bytes(sents))
        self._add(f"{key}.docs.npy", npy_bytes(docs))
        self._add(f"{key}.index.npy", npy_bytes(index))
        c = self._cur
        c.samples += 1
        c.documents += int(index.size)
        c.sentences += int(sents.size)
        c.tokens += int(ids.size)
        c.text_bytes += sum(b[4] for b in block)
        if self._file.tell() >= self.target:
            self._close_tar()

    def close(self) -> None:
        self._flush_block()
        self._close_tar()

    def _close_tar(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        c = self._cur
        c.bytes = self._file.tell()
        c.sha256 = self._hash.hexdigest()
        os.replace(self.out_dir / (c.name + ".partial"), self.out_dir / c.name)
        self.shards.append(c)
        self._tar = self._file = self._cur = None


class _HashingFile:
    """A write-only file that hashes what passes through it (no second read of the shard)."""

    def __init__(self, f, h):
        self._f, self._h, self._n = f, h, 0

    def write(self, b) -> int:
        self._h.update(b)
        self._n += len(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


def make_shards(data_cfg, tokenizer_path: str | Path, *, overwrite: bool = False, workers: int = 0,
                progress: bool = True, block_tokens: int = 1 << 15, chunk_bytes: int = 1 << 19) -> dict:
    """Read the corpus of ``data_cfg``, tokenize it in parallel and write shards + manifest; returns it.

    The output does not depend on ``workers`` nor on ``chunk_bytes`` (the size of the raw pieces of
    input handed to the workers): blocks and shards are formed here, in input order. The shards are
    written to a staging folder and swapped into ``data_cfg.shards_dir`` at the end (outdir.py); on any
    exception what this run wrote is removed, and the error says what the folder was left as."""
    from megamlm.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    out = ShardOutput(data_cfg.shards_dir)
    staging = out.open(tok.identity()["sha256"], overwrite)
    try:
        manifest = _write_shards(data_cfg, tok, staging, workers=workers, progress=progress,
                                 block_tokens=block_tokens, chunk_bytes=chunk_bytes)
        out.commit(manifest)
    except BaseException as e:
        _tell(e, out.abort())
        raise
    _log_summary(manifest, out.dir)
    return manifest


def _tell(e: BaseException, note: str) -> None:
    """Add ``note`` to the error: into the message of a user-facing one (the CLI prints only that)."""
    if isinstance(e, MegamlmError) and len(e.args) == 1 and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]}; {note}",)
    else:
        e.add_note(note)


class _Consumer:
    """Takes the encoded chunks in input order: numbers their documents, counts what was skipped, sends each
    document to its split's writer (val by hash of its text) and moves the progress bar."""

    def __init__(self, writers: dict, stats: ReadStats, val_fraction: float, bar):
        self.writers, self.stats, self.val_fraction, self.bar = writers, stats, val_fraction, bar
        self.counters = {"read": 0, "empty": 0, "no_tokens": 0, "text_bytes": 0}
        self.n_tokens, self.t0 = 0, time.perf_counter()

    def __call__(self, r: EncodedChunk) -> None:
        c = self.counters
        base = c["read"]  # global document numbering, in input order
        c["read"] += r.n_read
        c["text_bytes"] += r.text_bytes
        self.stats.documents += r.n_read
        self.stats.replacements += r.replacements
        for _local, origin, kind in r.skipped:
            c[kind] += 1
            if c[kind] <= 5:
                what = "empty document" if kind == "empty" else "document without tokens"
                log.warning("%s skipped: %s", what, origin)
        is_val = r.frac < self.val_fraction  # [D]
        for split, m in (("train", ~is_val), ("val", is_val)):
            if m.all():
                self.writers[split].write_docs(base + r.local, r.ntok, r.nsent, r.sents, r.ids, r.tb)
            elif m.any():
                self.writers[split].write_docs(base + r.local[m], r.ntok[m], r.nsent[m],
                                               r.sents[np.repeat(m, r.nsent)], r.ids[np.repeat(m, r.ntok)], r.tb[m])
        self.n_tokens += int(r.ids.size)
        self.bar.update(r.text_bytes)
        rate = self.n_tokens / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.bar.set_postfix_str(f"{rate:.2f}M tok/s", refresh=False)


def _encode_all(chunks, consume, n_workers: int, init: tuple) -> None:
    """Encode every chunk (in ``n_workers`` processes, or here) and consume the results in input order."""
    if n_workers <= 1:
        init_worker(init[0], init[1], -1, *init[3:])
        for chunk in chunks:
            consume(encode_chunk(chunk))
        return
    # Bounded window of in-flight chunks, consumed in order: memory stays flat on any corpus size and the
    # output does not depend on the number of processes. This process only reads bytes and writes tars;
    # parsing, sentence splitting and tokenizing run in the workers. (ProcessPoolExecutor, not
    # multiprocessing.Pool: with forkserver, Pool's worker-handler thread polls in a busy loop, ~20% of a
    # core taken from the writer.)
    pool = ProcessPoolExecutor(n_workers, mp_context=mp.get_context("forkserver"), initializer=init_worker,
                               initargs=init)
    try:
        inflight: deque = deque()
        for chunk in chunks:
            inflight.append(pool.submit(encode_chunk, chunk))
            if len(inflight) >= 3 * n_workers:
                consume(inflight.popleft().result())
        while inflight:
            consume(inflight.popleft().result())
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop the workers now, not after the queue
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_shards(data_cfg, tok, out_dir: Path, *, workers: int, progress: bool, block_tokens: int,
                  chunk_bytes: int) -> dict:
    """Encode the corpus into shards in ``out_dir``; the manifest (not yet written)."""
    from tqdm import tqdm

    target = int(data_cfg.shard_size_mb * 1e6)
    writers = {s: _SplitWriter(out_dir, s, target, block_tokens) for s in SPLITS}
    stats = ReadStats()
    chunks = iter_chunks(data_cfg.source, list(data_cfg.inputs), stats=stats, chunk_bytes=chunk_bytes)
    n_workers = workers or data_cfg.encode_workers or (os.cpu_count() or 1)
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1000, desc="make-shards",
               disable=not progress, mininterval=0.5, dynamic_ncols=True)
    consume = _Consumer(writers, stats, data_cfg.val_fraction, bar)
    cpu0 = time.process_time()
    try:
        _encode_all(chunks, consume, n_workers,
                    (str(tok.path), data_cfg.sentences, 1, data_cfg.text_field, data_cfg.encoding_errors))
        for w in writers.values():
            w.close()
    finally:
        bar.close()
    counters = consume.counters
    written = sum(s.documents for w in writers.values() for s in w.shards)
    if written == 0:
        raise CorpusError(f"no documents with text in the input ({counters['read']} read, "
                          f"{counters['empty']} empty): nothing to shard")
    assert written + counters["empty"] + counters["no_tokens"] == counters["read"]
    return _manifest(data_cfg, tok, writers, stats, counters, block_tokens, n_workers,
                     seconds=time.perf_counter() - consume.t0, writer_cpu=time.process_time() - cpu0)


def _manifest(data_cfg, tok, writers: dict, stats: ReadStats, counters: dict, block_tokens: int, n_workers: int,
              *, seconds: float, writer_cpu: float) -> dict:
    """The manifest of the written shards (``writer_cpu``: this process alone, the serial part of the job)."""
    splits = {}
    for name, w in writers.items():
        shards = [vars(s) for s in w.shards]
        totals = {k: sum(s[k] for s in shards)
                  for k in ("documents", "sentences", "tokens", "samples", "text_bytes", "bytes")}
        splits[name] = {"shards": shards, "totals": totals}
    return {
        "format": MANIFEST_FORMAT,
        "ids_dtype": np.dtype(np.uint16 if tok.padded_vocab_size <= 65536 else np.int32).name,
        "block_tokens": block_tokens,
        "tokenizer": {**tok.identity(), "path": str(tok.path)},
        "source": {"reader": data_cfg.source, "inputs": list(data_cfg.inputs), "files": stats.files,
                   "text_field": data_cfg.text_field, "sentences": data_cfg.sentences},
        "val_fraction": data_cfg.val_fraction,
        "read": {"documents": counters["read"], "bytes": stats.bytes, "text_bytes": counters["text_bytes"],
                 "decode_replacements": stats.replacements},
        "skipped": {"empty_documents": counters["empty"], "documents_without_tokens": counters["no_tokens"]},
        "splits": splits,
        "seconds": round(seconds, 3),
        "writer_cpu_seconds": round(writer_cpu, 3),
        "workers": n_workers,
    }


def _log_summary(man: dict, out_dir: Path) -> None:
    sp, skipped, seconds, n_workers = man["splits"], man["skipped"], man["seconds"], man["workers"]
    written = sp["train"]["totals"]["documents"] + sp["val"]["totals"]["documents"]
    n_tokens = sp["train"]["totals"]["tokens"] + sp["val"]["totals"]["tokens"]
    mb = man["read"]["text_bytes"] / 1e6
    seconds = max(seconds, 1e-9)
    log.info("wrote %d train + %d val shard(s) to %s: %d documents (%d empty, %d without tokens skipped), "
             "%d tokens; %.1f MB of text in %.1fs = %.2f MB/s, %.2fM tokens/s with %d process(es)",
             len(sp["train"]["shards"]), len(sp["val"]["shards"]), out_dir, written, skipped["empty_documents"],
             skipped["documents_without_tokens"], n_tokens, mb, seconds, mb / seconds, n_tokens / seconds / 1e6,
             n_workers)
    if n_workers > 1:
        log.info("the reading/writing process used %.1f s of CPU: with unlimited worker cores it would cap "
                 "the rate at %.0f MB/s of text", man["writer_cpu_seconds"],
                 mb / max(man["writer_cpu_seconds"], 1e-9))
    if man["read"]["decode_replacements"]:
        log.warning("%d undecodable byte sequence(s) replaced with U+FFFD", man["read"]["decode_replacements"])

