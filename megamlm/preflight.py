"""Every check that needs only a config and the files it names, run before any process group: by
``megamlm check-config`` (which checks what exists and says what it could not check yet) and by the runs
(for which a missing file is a problem like any other).

Pretraining (:func:`pretrain_problems`, :func:`engine_problems`, :func:`check_files`):

* the config's arithmetic with the world size (:func:`megamlm.config.cross_check`) and the engine on this
  machine (:func:`megamlm.engine.device_problems`: engine.kernels, fp16 / LAMB / nccl without CUDA);
* the tokenizer loads (model file, sidecar, sha256, special ids);
* parallel.vocab_parallel_size divides its padded vocabulary (when model.vocab_size is 0; a set
  model.vocab_size is checked by :func:`megamlm.config.cross_check`), and model.vocab_size, when set, holds it;
* the manifest loads, was made with this tokenizer, lists training shards (and validation shards when
  train.eval_every > 0), and the shards it lists exist (when data.on_error=raise, the run would stop there).

Fine-tuning (:func:`finetune_problems`, :func:`check_finetune`): train.batch_size against the world size,
the engine on this machine, init.checkpoint is a pretrained source, its tokenizer (or init.tokenizer) loads,
the task's input exists, and task.heldout_fraction against the checkpoint's data.val_fraction (wiki-*).

This module reads files and imports the tokenizer and the shard reader, so ``megamlm.config`` does not
import it; its callers do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megamlm.config.load import valid_fields, vocab_parallel_hint
from megamlm.config.sections import Config
from megamlm.data.shards import MANIFEST, Manifest, ShardError, load_manifest
from megamlm.tokenizer import Tokenizer, TokenizerError

__all__ = ["FileChecks", "check_files", "file_checks", "engine_problems", "pretrain_problems", "check_finetune",
           "finetune_problems"]


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


def engine_problems(cfg: Config) -> list[str]:
    """Pretraining's engine on this machine (:func:`megamlm.engine.device_problems`), when its engine and
    optim.name fields passed their own checks (the config reports those)."""
    from megamlm.engine import device_problems

    if not _engine_valid(cfg.engine) or "optim.name" not in valid_fields(cfg):
        return []
    return device_problems(cfg.engine, cfg.optim.name)


def pretrain_problems(cfg: Config, world_size: int) -> list[str]:
    """What a pretraining run on ``world_size`` ranks refuses to start with: the config's arithmetic, the
    engine on this machine, the tokenizer and shards (missing ones included)."""
    from megamlm.config import cross_check

    return cross_check(cfg, world_size) + engine_problems(cfg) + file_checks(cfg)


def _engine_valid(engine_cfg) -> bool:
    ok = valid_fields(Config(engine=engine_cfg))  # the other sections are the defaults
    return all(f"engine.{f.name}" in ok for f in dataclasses.fields(engine_cfg))


# ------------------------------------------------------------------------------------------ fine-tuning
def finetune_problems(cfg, world_size: int) -> list[str]:
    """What a fine-tuning run (a :class:`megamlm.finetune.config.FinetuneConfig`) on ``world_size`` ranks
    refuses to start with: :func:`check_finetune`'s problems and missing files."""
    r = check_finetune(cfg, world_size)
    return r.problems + r.missing


def check_finetune(cfg, world_size: int | None = None) -> FileChecks:
    """The fine-tuning checks; a field of the wrong type (reported by the config) is skipped."""
    r = FileChecks()
    bs = cfg.train.batch_size
    if world_size is None:
        r.unchecked.append("train.batch_size against the world size (pass --world-size N)")
    elif isinstance(bs, int) and bs >= 1 and bs % world_size:
        r.problems.append(f"train.batch_size={bs} is not a multiple of the world size {world_size}")
    if _engine_valid(cfg.engine):
        from megamlm.engine import device_problems

        r.problems += device_problems(cfg.engine)
    source = _pretrained_source(cfg, r)
    _finetune_tokenizer(cfg, source, r)
    _task_input(cfg, r)
    _heldout(cfg, source, r)
    return r


def _pretrained_source(cfg, r: FileChecks):
    from megamlm.errors import MegamlmError
    from megamlm.finetune.weights import inspect_pretrained

    ck = cfg.init.checkpoint
    if not isinstance(ck, str) or not ck:
        return None  # the config says init.checkpoint is empty
    if not Path(ck).exists():
        r.missing.append(f"init.checkpoint={ck!r} does not exist")
        r.unchecked.append(f"init.checkpoint {ck!r} does not exist yet (megamlm pretrain makes it): its tokenizer "
                           "and its data.val_fraction against task.heldout_fraction")
        return None
    try:
        return inspect_pretrained(ck)
    except (MegamlmError, OSError) as e:
        r.problems.append(f"init.checkpoint: {e}")
        return None


def _finetune_tokenizer(cfg, source, r: FileChecks) -> None:
    named = cfg.init.tokenizer
    if isinstance(named, str) and named:
        where, path = "init.tokenizer", Path(named)
    elif source is None:
        return  # no checkpoint to find it in (said above)
    elif not source.tokenizer:
        r.problems.append(f"{source.folder} holds no SentencePiece tokenizer: set init.tokenizer")
        return
    else:
        where, path = f"the tokenizer of init.checkpoint ({source.folder})", Path(source.tokenizer)
    try:
        Tokenizer(path)
    except TokenizerError as e:
        if path.is_file():
            r.problems.append(f"{where}: {e}")
        else:
            r.missing.append(f"{where}: {e}")
            r.unchecked.append(f"{where} {str(path)!r} does not exist yet: that it loads")


def _task_input(cfg, r: FileChecks) -> None:
    from megamlm.errors import MegamlmError
    from megamlm.finetune.config import READERS
    from megamlm.finetune.data import task_input

    t = cfg.task
    if t.reader not in READERS or not isinstance(t.path, str) or (t.reader in ("conll", "tsv") and not t.path):
        return  # the config reports these
    try:
        path = task_input(t)
    except MegamlmError as e:
        r.problems.append(str(e))
        return
    if not path.exists():
        r.problems.append(f"task.path={t.path!r} does not exist" if t.path else f"{path} does not exist")
    r.unchecked.append(f"the examples of {path} (labels, lengths, empty splits): read when the run starts")


def _heldout(cfg, source, r: FileChecks) -> None:
    """wiki-*: the held-out articles the task uses must be ones the encoder never trained on."""
    t = cfg.task
    if t.reader not in ("wiki-topic", "wiki-pair") or not isinstance(t.heldout_fraction, (int, float)) \
            or source is None:
        return
    val = source.val_fraction if isinstance(source.val_fraction, (int, float)) else None
    heldout = t.heldout_fraction or (val or 0.0)
    if heldout <= 0:
        r.problems.append("task.heldout_fraction=0 and the init checkpoint names no data.val_fraction: set it")
    elif val is None:
        r.unchecked.append(f"task.heldout_fraction={heldout} against the pretraining data.val_fraction "
                           f"({source.folder} does not name it): the encoder may have seen these articles")
    elif heldout > val + 1e-12:
        r.problems.append(f"task.heldout_fraction={heldout} exceeds the pretraining data.val_fraction={val} of "
                          f"{source.folder}: the encoder saw some of these articles; pretrain with "
                          f"data.val_fraction >= {heldout}")


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
    rows, vp, pad = cfg.model.vocab_size, cfg.parallel.vocab_parallel_size, cfg.tokenizer.pad_vocab_to_multiple
    if rows:  # its divisibility is cross_check's; the tokenizer must fit in it
        if rows < tok.padded_vocab_size:
            return [f"model.vocab_size={rows} is smaller than the padded vocabulary {tok.padded_vocab_size} of "
                    f"tokenizer.model {str(tok.path)!r}; set model.vocab_size=0 (the tokenizer's) or >= "
                    f"{tok.padded_vocab_size}"]
        return []
    padded = tok.padded_vocab_size
    if padded % vp == 0:
        return []
    trained = tok.meta.get("pad_vocab_to_multiple")
    note = ""
    if trained is not None and trained != pad:
        note = (f"; tokenizer.pad_vocab_to_multiple={pad} applies when a tokenizer is trained: this one was "
                f"padded to a multiple of {trained}")
    return [f"parallel.vocab_parallel_size={vp} does not divide the padded vocabulary of {padded} rows "
            f"(tokenizer.model {str(tok.path)!r}: {tok.vocab_size} pieces, padded to {padded}{note}): "
            f"{vocab_parallel_hint(padded, vp, pad)}, or retrain the tokenizer (and remake the shards) with "
            f"tokenizer.pad_vocab_to_multiple a multiple of {vp}"]


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
