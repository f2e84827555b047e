"""Checks of a config against the files it names: the tokenizer and the shard folder.

One implementation for ``megamlm check-config`` (which checks what exists and says what it could not
check yet) and for ``pretrain``'s preflight (for which a missing file is a problem like any other):

* the tokenizer loads (model file, sidecar, sha256, special ids);
* parallel.vocab_parallel_size divides its padded vocabulary (when model.vocab_size is 0; a set
  model.vocab_size is checked by :func:`megamlm.config.cross_check`), and model.vocab_size, when set, holds it;
* the manifest loads, was made with this tokenizer, lists training shards (and validation shards when
  train.eval_every > 0), and the shards it lists exist (when data.on_error=raise, the run would stop there).

This module reads files and imports the tokenizer and the shard reader, so ``megamlm.config`` does not
import it; its callers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megamlm.config.load import valid_fields, vocab_parallel_hint
from megamlm.config.sections import Config
from megamlm.data.shards import MANIFEST, Manifest, ShardError, load_manifest
from megamlm.tokenizer import Tokenizer, TokenizerError

__all__ = ["FileChecks", "check_files", "file_checks"]


@dataclass
class FileChecks:
    """What :func:`check_files` found."""

    problems: list[str] = field(default_factory=list)  # files that exist but do not fit the config
    missing: list[str] = field(default_factory=list)  # files not made yet, as a run reports them
    unchecked: list[str] = field(default_factory=list)  # what could not be checked for their absence, and why


def check_files(cfg: Config) -> FileChecks:
    """Check the tokenizer and the shards ``cfg`` names, where they exist; fields that failed their own
    checks (see :func:`megamlm.config.valid_fields`) are skipped, never raised on."""
    r = FileChecks()
    ok = valid_fields(cfg)
    tok = _tokenizer(cfg, r) if "tokenizer.model" in ok else None
    if tok is not None:
        r.problems += _vocab_problems(cfg, tok, ok)
    if "data.shards_dir" in ok:
        man = _manifest(cfg, r)
        if man is not None:
            r.problems += _shard_problems(cfg, man, tok, ok)
    return r


def file_checks(cfg: Config) -> list[str]:
    """The file problems a run refuses to start with (pretrain's preflight): :func:`check_files`'s
    problems and its missing files (each message says which command makes the file)."""
    r = check_files(cfg)
    return r.problems + r.missing


def _tokenizer(cfg: Config, r: FileChecks) -> Tokenizer | None:
    path = Path(cfg.tokenizer.model)
    try:
        return Tokenizer(path)
    except TokenizerError as e:
        if path.is_file():
            r.problems.append(str(e))
        else:
            r.missing.append(str(e))
            r.unchecked.append(f"tokenizer.model {str(path)!r} does not exist yet (megamlm prepare makes it): "
                               "its padded vocabulary against parallel.vocab_parallel_size and model.vocab_size, "
                               "and that the shards were made with it")
        return None


def _vocab_problems(cfg: Config, tok: Tokenizer, ok: set[str]) -> list[str]:
    if not {"model.vocab_size", "parallel.vocab_parallel_size", "tokenizer.pad_vocab_to_multiple"} <= ok:
        return []
    rows, tp, pad = cfg.model.vocab_size, cfg.parallel.vocab_parallel_size, cfg.tokenizer.pad_vocab_to_multiple
    if rows:  # its divisibility is cross_check's; the tokenizer must fit in it
        if rows < tok.padded_vocab_size:
            return [f"model.vocab_size={rows} is smaller than the padded vocabulary {tok.padded_vocab_size} of "
                    f"tokenizer.model {str(tok.path)!r}; set model.vocab_size=0 (the tokenizer's) or >= "
                    f"{tok.padded_vocab_size}"]
        return []
    padded = tok.padded_vocab_size
    if padded % tp == 0:
        return []
    trained = tok.meta.get("pad_vocab_to_multiple")
    note = ""
    if trained is not None and trained != pad:
        note = (f"; tokenizer.pad_vocab_to_multiple={pad} applies when a tokenizer is trained: this one was "
                f"padded to a multiple of {trained}")
    return [f"parallel.vocab_parallel_size={tp} does not divide the padded vocabulary of {padded} rows "
            f"(tokenizer.model {str(tok.path)!r}: {tok.vocab_size} pieces, padded to {padded}{note}): "
            f"{vocab_parallel_hint(padded, tp, pad)}, or retrain the tokenizer (and remake the shards) with "
            f"tokenizer.pad_vocab_to_multiple a multiple of {tp}"]


def _manifest(cfg: Config, r: FileChecks) -> Manifest | None:
    folder = Path(cfg.data.shards_dir)
    try:
        return load_manifest(folder)
    except ShardError as e:
        if (folder / MANIFEST).is_file():
            r.problems.append(str(e))
        else:
            r.missing.append(str(e))
            r.unchecked.append(f"data.shards_dir {str(folder)!r} has no {MANIFEST} yet (megamlm prepare makes it): "
                               "its shards, their tokenizer and the validation split")
        return None


def _shard_problems(cfg: Config, man: Manifest, tok: Tokenizer | None, ok: set[str]) -> list[str]:
    p: list[str] = []
    try:
        if tok is not None:
            man.check_tokenizer(tok)
    except ShardError as e:
        p.append(str(e))
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = man.shards(split)
        except ShardError as e:
            p.append(str(e))
        except (KeyError, TypeError) as e:  # a manifest edited by hand: name the split, go on
            p.append(f"{man.path}: split {split!r} is malformed ({type(e).__name__}: {e})")
    if "train" in splits and not splits["train"]:
        p.append(f"{cfg.data.shards_dir} has no training shards")
    if "val" in splits and "train.eval_every" in ok and cfg.train.eval_every and not splits["val"]:
        p.append(f"{cfg.data.shards_dir} has no validation shards but train.eval_every={cfg.train.eval_every}; "
                 "set train.eval_every=0 or data.val_fraction > 0")
    if "data.on_error" in ok and cfg.data.on_error == "raise":
        p += _absent_shards(man, [s for v in splits.values() for s in v])
    return p


def _absent_shards(man: Manifest, entries: list) -> list[str]:
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    absent = [str(n) for n in names if not isinstance(n, str) or not (man.dir / n).is_file()]
    if not absent:
        return []
    return [f"{man.dir}: {len(absent)} of the {len(names)} shard(s) listed in {MANIFEST} are missing "
            f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}); remake them with "
            "`megamlm make-shards --overwrite`, or set data.on_error=skip to train without them"]
