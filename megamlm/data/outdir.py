"""The output folder of ``make-shards``: staged writing, the swap into place, clean-up, recovery.

    out = ShardOutput(folder)
    staging = out.open(tokenizer_sha256, overwrite)   # refuses a folder holding shards, unless overwrite
    ... write shards into staging ...
    out.commit(manifest)                              # or, on any exception: note = out.abort()

A run writes its shards and manifest into ``<folder>/.make-shards.staging/`` (``STAGING``, with an
``owner`` file: host and pid) and moves them into ``<folder>`` only when all are written, so the set an
``--overwrite`` run replaces stays whole and readable until then (the disk holds both meanwhile). The
swap, in this order, keeps the rule that a manifest in the folder lists exactly the complete shards beside
it (readers open only what a manifest lists):

1. the old ``manifest.json`` is removed (from here to 4 the folder holds a set no reader accepts);
2. the old shard files the new set does not replace are removed;
3. each new shard is renamed into the folder (over an old one of the same name);
4. the new ``manifest.json`` is renamed into the folder: the new set is in place;
5. the staging folder (now only its owner file) is removed.

A run that fails with an exception before the swap removes what it wrote (its staging folder, and the
folder and parents it created, when empty): the folder is as it found it; :meth:`ShardOutput.abort`
says so for the error message. An exception during the swap keeps the staging folder, which then holds
the complete new set. A run killed outright leaves the staging folder behind; the next run into the
folder (:func:`recover`, first thing in :meth:`ShardOutput.open`) finishes the swap when the staging
folder holds a manifest (each step can be redone), else removes it. A staging folder whose owner still
runs (same host, live pid), or ran on another host, is left alone: that run stops with a ShardError.
Files this module did not write are never touched, except old shard files an ``--overwrite`` replaces.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

from megamlm.data.shard_format import MANIFEST, STAGING, ShardError, existing_shards, verify_shard

log = logging.getLogger(__name__)

__all__ = ["ShardOutput", "recover", "OWNER"]

OWNER = "owner"  # in the staging folder: "<host> <pid>" of the run writing it


class ShardOutput:
    """One make-shards run's output folder: :meth:`open`, write into :attr:`staging`, then :meth:`commit`
    or (on an exception) :meth:`abort`."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.staging = self.dir / STAGING
        self._created: list[Path] = []  # folders this run created, deepest first
        self._own_staging = False
        self._swapping = False

    def open(self, tokenizer_sha256: str, overwrite: bool) -> Path:
        """Create the folder if needed, finish or clear an interrupted run's staging, refuse a folder that
        holds shards (unless ``overwrite``), and return this run's empty staging folder."""
        self._make_folder()
        try:
            finished = recover(self.dir)
            _refuse_existing(self.dir, tokenizer_sha256, overwrite, finished)
            self.staging.mkdir()
            self._own_staging = True
            (self.staging / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        except BaseException:
            self.abort()
            raise
        return self.staging

    def commit(self, manifest: dict) -> None:
        """Write the manifest into the staging folder, then swap the new set into the folder."""
        _fsync_dir(self.staging)  # the shards' names are durable before the manifest that lists them
        tmp = self.staging / (MANIFEST + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.staging / MANIFEST)
        self._swapping = True  # from here the staging folder is the only whole copy of the new set
        removed = _swap(self.dir, self.staging)
        self._swapping = self._own_staging = False
        if removed:
            log.info("--overwrite: %d old shard file(s) in %s replaced or removed", removed, self.dir)

    def abort(self) -> str:
        """Undo what this run wrote (not during the swap: see the module docstring); a sentence saying
        what the folder is left as, for the error message."""
        if self._swapping:
            return (f"the new shard set is complete in {self.staging} but not all moved into {self.dir}: "
                    "run make-shards on this folder again to finish (it does that first)")
        n = 0
        if self._own_staging and self.staging.is_dir():
            n = sum(1 for p in self.staging.iterdir() if p.name != OWNER)
            shutil.rmtree(self.staging, ignore_errors=True)
            self._own_staging = False
        created = self._remove_created()
        if created is not None:
            return f"make-shards removed the {n} file(s) it had written and the folder {created} it had created"
        return f"make-shards left {self.dir} as it found it (removed the {n} file(s) this run had written)"

    def _make_folder(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise ShardError(f"{self.dir} is a file, not a folder: make-shards writes a folder of shards "
                             "(--output / data.shards_dir)")
        p = self.dir.absolute()
        while not p.exists() and not p.is_symlink():
            self._created.append(p)
            p = p.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent that is a file, a dangling link, no permission
            self._created = []
            raise ShardError(f"cannot create the shard folder {self.dir}: {e.strerror or e}") from None

    def _remove_created(self) -> Path | None:
        """Remove the folders this run created while they are empty; the topmost one removed, or None."""
        top = None
        for p in self._created:
            try:
                p.rmdir()
            except OSError:
                break
            top = p
        self._created = []
        return top


def recover(folder: str | Path) -> bool:
    """Finish or clear what an interrupted make-shards run left in ``folder``; True when it finished a
    swap (the folder then holds that run's set). Refuses a staging folder another live run owns."""
    folder = Path(folder)
    staging = folder / STAGING
    if not staging.exists() and not staging.is_symlink():
        return False
    if staging.is_symlink() or not staging.is_dir():
        raise ShardError(f"{staging} is in the way (make-shards writes a folder there): remove it")
    _check_owner(staging)
    if (staging / MANIFEST).is_file():
        log.warning("finishing an interrupted make-shards run: moving its complete shard set from %s into %s",
                    staging, folder)
        _swap(folder, staging)
        return True
    log.warning("removing %s: the unfinished output of an interrupted make-shards run", staging)
    shutil.rmtree(staging)
    return False


def _check_owner(staging: Path) -> None:
    try:
        host, pid = (staging / OWNER).read_text(encoding="utf-8").split()
        pid_n = int(pid)
    except (OSError, ValueError):
        return  # no owner file: its run was killed right after creating the folder
    if host != socket.gethostname():
        raise ShardError(f"{staging} belongs to a make-shards run on host {host} (pid {pid}): if that run is "
                         f"over, remove {staging} and run again")
    if pid_n != os.getpid() and _alive(pid_n):
        raise ShardError(f"{staging} belongs to make-shards process {pid}, which is still running: two runs "
                         "cannot write one folder; wait for it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_existing(folder: Path, tokenizer_sha256: str, overwrite: bool, finished: bool) -> None:
    old = existing_shards(folder)
    man = folder / MANIFEST
    if overwrite or (not old and not man.exists()):
        return
    detail = ""
    if man.exists():
        try:
            sha = json.loads(man.read_text(encoding="utf-8")).get("tokenizer", {}).get("sha256", "")
            if sha and sha != tokenizer_sha256:
                detail = f" made with another tokenizer (sha256 {sha[:12]}, this one is {tokenizer_sha256[:12]})"
        except (OSError, ValueError, AttributeError):
            detail = " with an unreadable manifest.json"
    first = ("an interrupted make-shards run was finished (its complete set is in place, ready to use as is): "
             if finished else "")
    raise ShardError(f"{first}{folder} already holds {len(old)} shard file(s){detail}; pass --overwrite "
                     "to replace them, or choose another data.shards_dir")


def _swap(folder: Path, staging: Path) -> int:
    """Steps 1-5 of the module docstring; each can be redone after a crash. The old files removed."""
    try:
        new = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
        entries = {s["name"]: s for split in new["splits"].values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{staging / MANIFEST} is unreadable ({e}); remove {staging} and run again") from None
    names = set(entries)
    for name, entry in sorted(entries.items()):  # the whole new set exists, before anything old is removed
        try:
            if (staging / name).is_file():
                if "bytes" in entry and (staging / name).stat().st_size != int(entry["bytes"]):
                    raise ShardError(f"shard {staging / name} has {(staging / name).stat().st_size} bytes, its "
                                     f"manifest says {entry['bytes']}")
            else:  # moved by an interrupted swap, or missing: the one in the folder must be the new one
                verify_shard(folder / name, entry)
        except (ShardError, KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{staging} does not hold a whole shard set ({e}); {folder} was not changed: remove "
                             f"{staging} and run make-shards again") from None
    old = existing_shards(folder)
    (folder / MANIFEST).unlink(missing_ok=True)  # 1
    for p in old:  # 2
        if p.name not in names:
            p.unlink()
    for name in sorted(names):  # 3
        if (staging / name).is_file():
            os.replace(staging / name, folder / name)
    _fsync_dir(folder)
    os.replace(staging / MANIFEST, folder / MANIFEST)  # 4
    _fsync_dir(folder)
    shutil.rmtree(staging)  # 5
    return len(old)


def _fsync_dir(folder: Path) -> None:
    """Make the renames into ``folder`` durable, in order (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
