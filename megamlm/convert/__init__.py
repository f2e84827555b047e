"""Offline checkpoint conversion (``megamlm convert``, ``tools/convert_checkpoint.py``).

    megamlm checkpoint (ZeRO 0-3, any vocab-parallel size, fp32/bf16) --to megamlm --> consolidated export
    megamlm checkpoint / export                                        --to hf     --> HF BERT directory
    HF BERT directory (BertForPreTraining / BertForMaskedLM / BertModel) --to megamlm --> export for
                                                                                   ``pretrain --init-from``

No process group, CPU only; the model shape comes from the source. See core.py (formats), zero.py
(ZeRO consolidation, safe loading), hf.py (HF directories), hf_tokenizer.py (SentencePiece → tokenizer.json).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator

from megamlm.convert.zero import ConvertError

__all__ = ["ConvertError", "convert", "main", "staged_output", "check_output"]

log = logging.getLogger(__name__)


def convert(src: str | Path, out: str | Path, to: str, *, tag: str | None = None, hf_arch: str | None = None,
            tokenizer: str | Path | None = None) -> dict:
    """Convert ``src`` (any supported source) into ``out`` (``to`` = "megamlm" or "hf"); returns the report.

    ``out`` must not exist or be an empty folder. Everything is written into a new hidden sibling folder
    (created here, so no one else's) and renamed onto ``out`` once complete and synced: ``out`` is at every
    moment either absent (or the empty folder it was) or the whole output; a failure removes the sibling.
    """
    from megamlm.convert.core import load_any, save_export
    from megamlm.convert.hf import complete_heads, save_hf

    if to not in ("megamlm", "hf"):
        raise ConvertError(f"--to {to!r}: choose 'megamlm' or 'hf'")
    with staged_output(Path(out)) as tmp:  # before loading: an output that cannot be written fails in seconds
        w = load_any(src, tag, lazy=to == "megamlm")  # the export streams ZeRO-3 tensors one at a time
        if w.report.get("initialise"):
            log.warning("%s lacks %d tensor(s), initialised fresh: %s", src, len(w.report["initialise"]),
                        ", ".join(w.report["initialise"]))
            w = complete_heads(w)
        if to == "megamlm":
            save_export(w, tmp)
        else:
            save_hf(w, tmp, hf_arch, Path(tokenizer) if tokenizer else None)
    return w.report


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Write a new output folder ``out`` safely: yields a new hidden sibling to write into; when the block
    ends, it is synced and renamed onto ``out`` in one rename(2). ``out`` must not exist or be an empty
    folder (else ConvertError before anything is written); a failure removes the sibling and the parent
    folders made here, and leaves ``out`` as it was."""
    check_output(out)
    parents = _make_parents(out.parent)
    tmp = None
    try:
        tmp = _new_sibling(out)
        yield tmp
        _sync_tree(tmp)
        _rename_into_place(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # ours: created by _new_sibling
        for d in reversed(parents):  # the folders above it that this call made, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def check_output(out: Path) -> None:
    """Raise ConvertError unless ``out`` can be a new output folder (absent or empty; see :func:`staged_output`)."""
    if out.name in ("", ".", ".."):
        raise ConvertError(f"{out}: name the output folder itself (e.g. ../{Path.cwd().name}-hf)")
    if out.is_symlink():
        raise ConvertError(f"{out}: output is a symbolic link; name a folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConvertError(f"{out}: output folder exists and is not empty; name a new folder (nothing is "
                           "overwritten)")
    prefix = f".{out.name}.partial"
    stale = sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix)) if out.parent.is_dir() else []
    if stale:
        log.warning("left by an interrupted conversion into %s (delete them when none is running): %s", out,
                    ", ".join(str(p) for p in stale))


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; returns the ones created, outermost first."""
    created = []
    for p in [p for p in [folder, *folder.parents] if not p.exists()][::-1]:
        try:
            p.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours
            continue
        created.append(p)
    return created


def _new_sibling(out: Path) -> Path:
    """A new hidden folder beside ``out`` (``mkdir`` fails rather than reuse one that exists)."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _sync_tree(folder: Path) -> None:
    """fsync every file, then the folder: after the rename, a crash of the machine cannot leave the final
    name holding files whose bytes never reached the disk."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [p for p in sorted(folder.rglob("*")) if p.is_dir()] + [folder]:
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    """Make a folder's entries durable where the file system can (some network and FUSE mounts cannot open
    or fsync a folder: that is not a failed conversion)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_into_place(tmp: Path, out: Path) -> None:
    """One rename(2): onto an absent name, or atomically replacing the empty folder ``out`` (POSIX allows
    that, and refuses a non-empty one, so a folder filled meanwhile is never lost). The empty folder's
    mode is kept."""
    if out.is_dir() and not out.is_symlink():
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
    try:
        os.rename(tmp, out)
    except OSError as e:
        raise ConvertError(f"{out}: the finished output cannot be renamed into place ({e.strerror}): was it "
                           "filled while converting? Nothing was overwritten; the conversion is discarded") from e
    _fsync_dir(out.parent)


def add_arguments(p) -> None:
    p.add_argument("source", help="megamlm checkpoint folder (with `latest`) or tag folder, megamlm export "
                   "(folder or .safetensors), Hugging Face BERT directory, or ELECTRA pair (discriminator/ + generator/)")
    p.add_argument("output", help="output folder: must not exist, or be empty (nothing is overwritten)")
    p.add_argument("--to", required=True, choices=("megamlm", "hf"),
                   help="megamlm: consolidated fp32 safetensors + config.yaml + tokenizer; hf: HF BERT directory "
                   "(ELECTRA: discriminator/ and generator/ directories)")
    p.add_argument("--tag", default=None, help="checkpoint tag inside SOURCE (default: its `latest`)")
    p.add_argument("--hf-arch", default=None, choices=("BertForPreTraining", "BertForMaskedLM", "BertModel",
                                                          "ElectraForPreTraining", "ElectraModel"),
                   help="HF class the weights file is written for (default: BertForPreTraining, "
                        "or BertForMaskedLM for a run without a pair head; ELECTRA: the discriminator's, "
                        "ElectraForPreTraining by default, the generator being ElectraForMaskedLM)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model for the HF tokenizer files "
                   "(default: the one saved in the checkpoint)")


def main(args) -> int:
    import json

    report = convert(args.source, args.output, args.to, tag=args.tag, hf_arch=args.hf_arch, tokenizer=args.tokenizer)
    print(f"converted {args.source} -> {args.output} ({args.to})")
    print(json.dumps(report, indent=1, default=str))
    return 0
