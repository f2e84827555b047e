"""Pretokenized WebDataset shards: writing them (``make-shards``) and reading their manifest.

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
read and what was skipped) is written last, atomically.

Work split: this process cuts the input files into raw byte chunks on document boundaries and writes the
tars; worker processes (all cores by default) decode, parse, split sentences and tokenize, and return
flat arrays. The output is byte-identical for any number of processes and any chunk size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megamlm.data.corpus import CorpusError, ReadStats, iter_chunks
from megamlm.data.encode import EncodedChunk, encode_chunk, init_worker

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megamlm-shards/1"
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard folder, shard or manifest is missing, inconsistent or corrupt; the message names it."""

    user_facing = True  # the CLI prints it as one message, no traceback


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(b), allow_pickle=False)


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


def existing_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("*.tar*") if p.name.split("-")[0] in SPLITS)


def _prepare_output(out_dir: Path, tok_identity: dict, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = existing_shards(out_dir)
    man = out_dir / MANIFEST
    if not old and not man.exists():
        return
    if not overwrite:
        detail = ""
        if man.exists():
            try:
                prev = json.loads(man.read_text())
                sha = prev.get("tokenizer", {}).get("sha256", "")
                if sha and sha != tok_identity["sha256"]:
                    detail = (f" made with another tokenizer (sha256 {sha[:12]}, this one is "
                              f"{tok_identity['sha256'][:12]})")
            except (OSError, json.JSONDecodeError):
                detail = " with an unreadable manifest.json"
        raise ShardError(f"{out_dir} already holds {len(old)} shard file(s){detail}; pass --overwrite "
                         "to replace them, or choose another data.shards_dir")
    man.unlink(missing_ok=True)  # first, so a crash below never leaves a manifest over missing shards
    for p in old:
        p.unlink()
    log.info("--overwrite: removed %d old shard file(s) from %s", len(old), out_dir)


def make_shards(data_cfg, tokenizer_path: str | Path, *, overwrite: bool = False, workers: int = 0,
                progress: bool = True, block_tokens: int = 1 << 15, chunk_bytes: int = 1 << 19) -> dict:
    """Read the corpus of ``data_cfg``, tokenize it in parallel and write shards + manifest; returns it.

    The output does not depend on ``workers`` nor on ``chunk_bytes`` (the size of the raw pieces of
    input handed to the workers): blocks and shards are formed here, in input order."""
    from tqdm import tqdm

    from megamlm.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    out_dir = Path(data_cfg.shards_dir)
    _prepare_output(out_dir, tok.identity(), overwrite)
    dtype = np.uint16 if tok.padded_vocab_size <= 65536 else np.int32
    target = int(data_cfg.shard_size_mb * 1e6)
    writers = {s: _SplitWriter(out_dir, s, target, block_tokens) for s in SPLITS}
    stats = ReadStats()
    counters = {"read": 0, "empty": 0, "no_tokens": 0, "text_bytes": 0}
    chunks = iter_chunks(data_cfg.source, list(data_cfg.inputs), stats=stats, chunk_bytes=chunk_bytes)
    n_workers = workers or data_cfg.encode_workers or (os.cpu_count() or 1)
    t0 = time.perf_counter()
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1000, desc="make-shards",
               disable=not progress, mininterval=0.5, dynamic_ncols=True)
    n_tokens = 0

    def consume(r: EncodedChunk) -> None:
        nonlocal n_tokens
        base = counters["read"]  # global document numbering, in input order
        counters["read"] += r.n_read
        counters["text_bytes"] += r.text_bytes
        stats.documents += r.n_read
        stats.replacements += r.replacements
        for local, origin, kind in r.skipped:
            counters[kind] += 1
            if counters[kind] <= 5:
                what = "empty document" if kind == "empty" else "document without tokens"
                log.warning("%s skipped: %s", what, origin)
        is_val = r.frac < data_cfg.val_fraction  # [D]
        for split, m in (("train", ~is_val), ("val", is_val)):
            if m.all():
                writers[split].write_docs(base + r.local, r.ntok, r.nsent, r.sents, r.ids, r.tb)
            elif m.any():
                writers[split].write_docs(base + r.local[m], r.ntok[m], r.nsent[m], r.sents[np.repeat(m, r.nsent)],
                                          r.ids[np.repeat(m, r.ntok)], r.tb[m])
        n_tokens += int(r.ids.size)
        bar.update(r.text_bytes)
        bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)

    pool = None
    cpu0 = time.process_time()
    try:
        init = (str(tok.path), data_cfg.sentences, 1, data_cfg.text_field, data_cfg.encoding_errors)
        if n_workers > 1:
            # Bounded window of in-flight chunks, consumed in order: memory stays flat on any corpus size
            # and the output does not depend on the number of processes. This process only reads bytes
            # and writes tars; parsing, sentence splitting and tokenizing run in the workers.
            # (ProcessPoolExecutor, not multiprocessing.Pool: with forkserver, Pool's worker-handler thread
            # polls in a busy loop, ~20% of a core taken from the writer.)
            pool = ProcessPoolExecutor(n_workers, mp_context=mp.get_context("forkserver"),
                                       initializer=init_worker, initargs=init)
            inflight: deque = deque()
            for chunk in chunks:
                inflight.append(pool.submit(encode_chunk, chunk))
                if len(inflight) >= 3 * n_workers:
                    consume(inflight.popleft().result())
            while inflight:
                consume(inflight.popleft().result())
        else:
            init_worker(init[0], init[1], -1, *init[3:])
            for chunk in chunks:
                consume(encode_chunk(chunk))
        for w in writers.values():
            w.close()
    except BaseException:
        for p in out_dir.glob("*.partial"):
            p.unlink(missing_ok=True)
        if pool is not None:  # stop the workers now, not after the queued chunks
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - t0
    writer_cpu = time.process_time() - cpu0  # this process alone: the serial part of the job
    written = sum(s.documents for w in writers.values() for s in w.shards)
    if written == 0:
        raise CorpusError(f"no documents with text in the input ({counters['read']} read, "
                          f"{counters['empty']} empty): nothing to shard")
    splits = {}
    for name, w in writers.items():
        shards = [vars(s) for s in w.shards]
        totals = {k: sum(s[k] for s in shards)
                  for k in ("documents", "sentences", "tokens", "samples", "text_bytes", "bytes")}
        splits[name] = {"shards": shards, "totals": totals}
    manifest = {
        "format": MANIFEST_FORMAT,
        "ids_dtype": np.dtype(dtype).name,
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
    assert written + counters["empty"] + counters["no_tokens"] == counters["read"]
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
    mb = counters["text_bytes"] / 1e6
    log.info("wrote %d train + %d val shard(s) to %s: %d documents (%d empty, %d without tokens skipped), "
             "%d tokens; %.1f MB of text in %.1fs = %.2f MB/s, %.2fM tokens/s with %d process(es)",
             len(splits["train"]["shards"]), len(splits["val"]["shards"]), out_dir, written, counters["empty"],
             counters["no_tokens"], n_tokens, mb, seconds, mb / seconds, n_tokens / seconds / 1e6, n_workers)
    if n_workers > 1:
        log.info("the reading/writing process used %.1f s of CPU: with unlimited worker cores it would cap "
                 "the rate at %.0f MB/s of text", writer_cpu, mb / max(writer_cpu, 1e-9))
    if stats.replacements:
        log.warning("%d undecodable byte sequence(s) replaced with U+FFFD", stats.replacements)
    return manifest


# --------------------------------------------------------------------------- reading

@dataclass
class Manifest:
    path: Path
    raw: dict = field(repr=False)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def shards(self, split: str) -> list[dict]:
        if split not in self.raw["splits"]:
            raise ShardError(f"{self.path}: no split {split!r}; it has {', '.join(self.raw['splits'])}")
        return self.raw["splits"][split]["shards"]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.dir / s["name"] for s in self.shards(split)]

    @property
    def tokenizer_sha256(self) -> str:
        return self.raw["tokenizer"]["sha256"]

    def check_tokenizer(self, tok) -> None:
        if tok.sha256 != self.tokenizer_sha256:
            raise ShardError(f"{self.path} was made with tokenizer sha256 {self.tokenizer_sha256[:12]}, but "
                             f"the configured tokenizer {tok.path} is {tok.sha256[:12]}: re-run make-shards or "
                             "point tokenizer.model at the one the shards were made with")


def load_manifest(shards_dir: str | Path) -> Manifest:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {shards_dir}: run `megamlm make-shards` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if raw.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return Manifest(path, raw)


def verify_shard(path: Path, entry: dict) -> None:
    """Raise ShardError when the shard is missing or its bytes differ from the manifest's sha256."""
    if not path.is_file():
        raise ShardError(f"shard {path} listed in the manifest is missing")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    if h.hexdigest() != entry["sha256"]:
        raise ShardError(f"shard {path}: sha256 {h.hexdigest()[:12]} differs from the manifest's "
                         f"{entry['sha256'][:12]} (corrupt or replaced)")


SAMPLE_PARTS = ("ids.npy", "sents.npy", "docs.npy", "index.npy")


def unpack_block(parts: dict[str, np.ndarray], where: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """One WebDataset sample (a block) → (document index, ids, sentence lengths) per document."""
    ids, sents, docs, index = (parts[k] for k in SAMPLE_PARTS)
    if docs.size != index.size or int(docs.sum()) != sents.size or int(sents.sum()) != ids.size:
        raise ShardError(f"{where}: inconsistent block ({index.size} documents, {docs.size} sentence counts, "
                         f"{sents.size} sentences adding to {int(sents.sum())} tokens, {ids.size} ids)")
    s_end = np.cumsum(docs)
    t_end = np.cumsum(sents)
    s0 = 0
    for d in range(index.size):
        s1 = int(s_end[d])
        t0 = int(t_end[s0 - 1]) if s0 else 0
        t1 = int(t_end[s1 - 1]) if s1 else 0
        yield int(index[d]), ids[t0:t1], sents[s0:s1]
        s0 = s1


def iter_shard(path: Path) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(document index, ids, sentence lengths) for each document of one shard; corrupt → ShardError."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext not in SAMPLE_PARTS:
                    raise ShardError(f"shard {path}: unexpected member {member.name!r}")
                slot = pending.setdefault(key, {})
                slot[ext] = npy_load(tar.extractfile(member).read())
                if len(slot) == len(SAMPLE_PARTS):
                    del pending[key]
                    yield from unpack_block(slot, f"shard {path}, sample {key}")
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:
        raise ShardError(f"shard {path} is corrupt or truncated: {e}") from None
    if pending:
        raise ShardError(f"shard {path}: incomplete sample(s) {', '.join(sorted(pending)[:3])}")
