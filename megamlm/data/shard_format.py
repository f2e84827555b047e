"""The shard folder's format and its reading: ``manifest.json``, the samples of a tar, the checks.

``make-shards`` (shards.py) writes this layout; the loader (units.py, loader.py) and the config's file
checks read it. A folder holds ``train-%06d.tar`` / ``val-%06d.tar`` and ``manifest.json`` (format
``megamlm-shards/1``: per split the shards with their counts and sha256, totals, the tokenizer's
identity, what was read and skipped). A tar's samples are blocks of documents: four ``.npy`` members per
sample (``SAMPLE_MEMBERS``, described in shards.py). Every problem is a :class:`ShardError` naming the
folder, shard or sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megamlm.errors import MegamlmError

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "SPLITS", "SAMPLE_MEMBERS", "STAGING", "ShardError", "Manifest", "existing_shards",
           "iter_shard", "load_manifest", "npy_bytes", "npy_load", "unpack_block", "verify_shard"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megamlm-shards/1"
SPLITS = ("train", "val")
SAMPLE_MEMBERS = ("ids.npy", "sents.npy", "docs.npy", "index.npy")
STAGING = ".make-shards.staging"  # where a make-shards run writes before its swap into the folder (outdir.py)


class ShardError(MegamlmError, ValueError):
    """A shard folder, shard or manifest is missing, inconsistent or corrupt; the message names it."""


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(b), allow_pickle=False)


def existing_shards(out_dir: Path) -> list[Path]:
    """The shard files in a folder (``train-*`` / ``val-*`` tars, finished or ``.partial``), sorted."""
    return sorted(p for p in out_dir.glob("*.tar*") if p.name.split("-")[0] in SPLITS)


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
        if (Path(shards_dir) / STAGING / MANIFEST).is_file():
            raise ShardError(f"no {MANIFEST} in {shards_dir}: a make-shards run was interrupted while moving its "
                             f"shards in from {STAGING}; `megamlm prepare`, or make-shards on this folder, finishes the move")
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


def unpack_block(members: dict[str, np.ndarray], where: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """One WebDataset sample (a block) → (document index, ids, sentence lengths) per document."""
    ids, sents, docs, index = (members[k] for k in SAMPLE_MEMBERS)
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
                if ext not in SAMPLE_MEMBERS:
                    raise ShardError(f"shard {path}: unexpected member {member.name!r}")
                slot = pending.setdefault(key, {})
                slot[ext] = npy_load(tar.extractfile(member).read())
                if len(slot) == len(SAMPLE_MEMBERS):
                    del pending[key]
                    yield from unpack_block(slot, f"shard {path}, sample {key}")
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:
        raise ShardError(f"shard {path} is corrupt or truncated: {e}") from None
    if pending:
        raise ShardError(f"shard {path}: incomplete sample(s) {', '.join(sorted(pending)[:3])}")
