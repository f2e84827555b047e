"""The workers' half of ``make-shards``: a raw chunk of input → documents → sentences → token ids, as flat
arrays (see :mod:`megamlm.data.shards` for the writer's half). Also the document hash that fixes the
train/validation split."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from megamlm.data.corpus import parse_chunk, split_document


def doc_hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the document's text: the deterministic train/val split."""
    return doc_hash_fraction_bytes(text.encode("utf-8"))


def doc_hash_fraction_bytes(b: bytes) -> float:
    h = hashlib.sha1(b).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


_worker_tok = None
_worker_mode = "rules"
_worker_dtype = np.uint16
_worker_threads = -1
_worker_field = "text"
_worker_errors = "strict"


def init_worker(model_path: str, mode: str, threads: int = -1, text_field: str = "text",
                 errors: str = "strict") -> None:
    global _worker_tok, _worker_mode, _worker_dtype, _worker_threads, _worker_field, _worker_errors
    from megamlm.tokenizer import Tokenizer

    _worker_tok = Tokenizer(model_path)
    _worker_mode = mode
    _worker_threads = threads
    _worker_field = text_field
    _worker_errors = errors
    _worker_dtype = np.uint16 if _worker_tok.padded_vocab_size <= 65536 else np.int32


@dataclass
class EncodedChunk:
    """One raw chunk, parsed, split and tokenized: flat arrays (cheap to send between processes; a list
    of per-document arrays is not). Documents are numbered 0.. within the chunk."""
    n_read: int  # documents read, empty ones included
    text_bytes: int  # UTF-8 bytes of all their texts
    replacements: int  # U+FFFD substitutions made while decoding
    skipped: list  # [(local index, origin, "empty" | "no_tokens")]
    local: np.ndarray  # [D] int64 local index of each kept document
    frac: np.ndarray  # [D] float64 split hash (doc_hash_fraction)
    tb: np.ndarray  # [D] int64 text bytes
    nsent: np.ndarray  # [D] int32 sentences (with at least one token)
    ntok: np.ndarray  # [D] int64 tokens
    sents: np.ndarray  # [sum nsent] int32 sentence lengths
    ids: np.ndarray  # [sum ntok] token ids


def encode_chunk(chunk) -> EncodedChunk:
    """Raw chunk → documents → sentences → ids, all in the worker (off the writer's core)."""
    docs = list(parse_chunk(chunk, _worker_field, _worker_errors))
    skipped = []
    kept = []  # (local index, text, text bytes)
    text_bytes = 0
    replacements = 0
    for i, doc in enumerate(docs):
        b = doc.text.encode("utf-8")
        text_bytes += len(b)
        replacements += doc.replaced
        if not doc.text.strip():
            skipped.append((i, doc.origin, "empty"))
        else:
            kept.append((i, doc, b))
    sents_per_doc = [split_document(doc.text, _worker_mode) for _, doc, _ in kept]
    flat = [s for ss in sents_per_doc for s in ss]
    ids = _worker_tok.encode_batch(flat, _worker_threads) if flat else []
    lens_all = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))  # [S]
    ids_all = np.fromiter(itertools.chain.from_iterable(ids), dtype=_worker_dtype, count=int(lens_all.sum()))
    doc_of = np.repeat(np.arange(len(kept)), [len(ss) for ss in sents_per_doc])  # [S]
    nonempty = lens_all > 0
    nsent = np.bincount(doc_of[nonempty], minlength=len(kept)).astype(np.int32)  # [D]
    ntok = np.bincount(doc_of, weights=lens_all, minlength=len(kept)).astype(np.int64)  # [D]
    local = np.array([i for i, _, _ in kept], dtype=np.int64)
    has = nsent > 0
    for d in np.flatnonzero(~has):
        skipped.append((kept[d][0], kept[d][1].origin, "no_tokens"))
    skipped.sort()
    return EncodedChunk(
        n_read=len(docs), text_bytes=text_bytes, replacements=replacements, skipped=skipped,
        local=local[has], frac=np.array([doc_hash_fraction_bytes(b) for _, _, b in kept], dtype=np.float64)[has],
        tb=np.array([len(b) for _, _, b in kept], dtype=np.int64)[has], nsent=nsent[has], ntok=ntok[has],
        sents=lens_all[nonempty], ids=ids_all)
