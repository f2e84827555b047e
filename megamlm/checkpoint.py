"""Checkpoints: DeepSpeed's engine state plus megamlm's training state, saved so a run can be killed
at any moment and resumed exactly.

Layout of ``<checkpoint dir>``::

    latest                 the tag of the newest *complete* checkpoint (replaced atomically)
    step00000100/          one checkpoint (tag)
        <DeepSpeed files>  model, optimizer (ZeRO partitions), LR schedule
        train_state.json   step, consumed samples/tokens, loader position, counters (rank 0)
        rng/rank00000.pt   each rank's torch (and CUDA) and Python RNG states
        config.yaml        the resolved config (the checkpoint describes itself)
        vocab_parallel.json  the vocabulary split: {"vocab_parallel_size": t, "padded_vocab_size": V,
                           "real_vocab_size": n, "sharded": {param name: dim}} (rank 0); with t > 1
                           DeepSpeed writes one mp_rank_XX_model_states.pt per vocab-parallel rank, whose
                           sharded tensors concatenated along dim in rank order give the full ones
        tokenizer/         a copy of the SentencePiece model and its sidecar
        COMPLETE           written last, after every rank finished
    universal/step00000100/  DeepSpeed's universal form of that checkpoint (per-parameter fp32 weights and
                           Adam moments), made by :func:`to_universal` when a run resumes it on another
                           data-parallel size; removed with its checkpoint by retention

``latest`` moves only after ``COMPLETE`` exists, so a run killed mid-save resumes from the previous
checkpoint; incomplete folders are removed (with a log line) when the next save completes.

What a run may do to a folder (:func:`resolve_resume`): a fresh run (no ``--resume``, or ``none``) into a
folder that holds checkpoints is refused before any work (the ways out: ``--resume auto``, another
``train.output_dir``, or ``--move-old-run``, which moves the old run's files aside: :func:`move_old_run`);
``--resume TAG`` is refused while newer complete checkpoints exist (its saves would overwrite them).
So every checkpoint in a folder belongs to one lineage, and retention (:func:`prune`) only ever deletes
that lineage's older checkpoints and interrupted saves, never the one just written, and :func:`save`
never replaces a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megamlm.errors import MegamlmError

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
VOCAB_PARALLEL_JSON = "vocab_parallel.json"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step(\d{8})$")


class CheckpointError(MegamlmError, RuntimeError):
    """A checkpoint is missing, incomplete, or from another model shape; the message names it."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    loader: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    # the layout it was saved with: world_size, data_parallel_size, vocab_parallel_size, num_workers
    topology: dict = field(default_factory=dict)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def is_complete(ckpt_dir: str | Path, tag: str) -> bool:
    return (Path(ckpt_dir) / tag / COMPLETE).is_file()


def step_folders(ckpt_dir: str | Path) -> list[str]:
    """Every ``stepNNNNNNNN`` folder in ``ckpt_dir``, complete or not, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    return [t for t in step_folders(ckpt_dir) if is_complete(ckpt_dir, t)]


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None without a ``latest`` file; a tag that is not a complete
    checkpoint is refused, naming the newest complete one beside it."""
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not is_complete(ckpt_dir, tag):
        done = complete_tags(ckpt_dir)
        offer = (f"; the newest complete checkpoint there is {done[-1]}: resume from it with --resume {done[-1]}"
                 if done else "; the folder holds no complete checkpoint")
        what = "a folder that does not exist" if not (Path(ckpt_dir) / tag).exists() else "an incomplete checkpoint"
        raise CheckpointError(f"{p} points at {tag!r}, {what}{offer}")
    return tag


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> str | None:
    """The checkpoint tag a run starts from (None: fresh), or CheckpointError before any work.

    * ``None`` / ``"none"``: fresh; refused when the folder holds a complete checkpoint or ``latest``.
    * ``"auto"``: the newest complete checkpoint — ``latest``, or a newer complete one when a save was
      interrupted between ``COMPLETE`` and ``latest`` (logged) — or fresh when there is none.
    * a tag or a tag folder: that complete checkpoint; refused while newer complete ones exist.
    Incomplete step folders (interrupted saves) are named in the log: the next save removes them."""
    ckpt_dir = Path(ckpt_dir)
    done = complete_tags(ckpt_dir)
    partial = [t for t in step_folders(ckpt_dir) if t not in done]
    if partial:
        log.warning("%s: incomplete checkpoint folder(s) %s (no %s marker: an interrupted save); they are "
                    "never resumed from and are removed at this run's next save", ckpt_dir, ", ".join(partial),
                    COMPLETE)
    if not resume or resume == "none":
        if done or (ckpt_dir / LATEST).exists():
            raise CheckpointError(
                f"{ckpt_dir} already holds checkpoints ({', '.join(done[-3:]) or 'a latest file'}"
                f"{', ...' if len(done) > 3 else ''}) and this run starts fresh: it would mix with them and "
                f"retention would delete them. Continue that run with --resume auto, choose another "
                f"train.output_dir (or checkpoint.dir), or pass --move-old-run to move the old run's files aside "
                f"(nothing is deleted)")
        return None
    if resume == "auto":
        tag = read_latest(ckpt_dir)
        if tag is None and not done:
            return None
        newest = done[-1]
        if tag is None:
            log.warning("%s has no %s file; resuming from the newest complete checkpoint %s", ckpt_dir, LATEST,
                        newest)
        elif newest != tag:
            log.warning("%s names %s but %s is complete and newer (a save interrupted before %s moved); "
                        "resuming from %s", ckpt_dir / LATEST, tag, newest, LATEST, newest)
        return newest
    tag = Path(resume).name if Path(resume).is_dir() else resume
    if Path(resume).is_dir() and Path(resume).absolute().parent != ckpt_dir.absolute():
        raise CheckpointError(f"--resume {resume!r} is not in this run's checkpoint folder {ckpt_dir}: a run resumes "
                              f"its own checkpoints (to start from another run's weights, use --init-from)")
    if not TAG_RE.match(tag) or not is_complete(ckpt_dir, tag):
        raise CheckpointError(f"--resume {resume!r}: {ckpt_dir / tag} is not a complete checkpoint"
                              + (f" (complete ones: {', '.join(done[-5:])})" if done else ""))
    newer = [t for t in done if step_of(t) > step_of(tag)]
    if newer:
        raise CheckpointError(
            f"--resume {resume!r}: {ckpt_dir} holds newer checkpoints ({', '.join(newer[:5])}); resuming from "
            f"{tag} would overwrite or delete them as the run goes on. Resume from the newest with --resume "
            f"auto, or move the newer ones out of {ckpt_dir} first")
    return tag


def move_old_run(output_dir: str | Path, ckpt_dir: str | Path, inputs=(), stamp: str | None = None) -> list[Path]:
    """``--move-old-run``: move an earlier run's files aside, deleting nothing, keeping what this run reads.

    Every entry of ``output_dir`` goes into a new sibling folder ``<name>.old-<UTC time>`` (same names),
    except an entry that is or holds one of ``inputs`` (the tokenizer, the shards, an ``--init-from``
    checkpoint: the configs keep them in the run folder), which stays, with a log line; ``ckpt_dir``
    outside ``output_dir`` is renamed to ``<name>.old-<UTC time>`` beside it. Refused, before anything
    moves, when the checkpoint folder itself holds an input, or a folder to move is the current folder or
    above it. One rename per entry: a crash leaves each entry either where it was or moved whole.
    Returns the paths moved to."""
    import time

    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out, ck = Path(output_dir).absolute(), Path(ckpt_dir).absolute()
    reads = [Path(p).absolute() for p in inputs if p]

    def holds_input(p: Path) -> Path | None:
        return next((i for i in reads if i == p or p in i.parents), None)

    def unique(p: Path) -> Path:
        dst, k = p.with_name(f"{p.name}.old-{stamp}"), 1
        while dst.exists():
            dst, k = p.with_name(f"{p.name}.old-{stamp}-{k}"), k + 1
        return dst

    for src in (out, ck):
        if src.exists() and (src == Path(src.anchor) or src == Path.cwd() or src in Path.cwd().parents):
            raise CheckpointError(f"--move-old-run: will not move {src} (the current folder or one above it) "
                                  "aside; set train.output_dir to a folder of its own")
    if ck.exists() and holds_input(ck):
        raise CheckpointError(f"--move-old-run: {holds_input(ck)}, which this run reads, lies in the checkpoint "
                              f"folder {ck} the move would rename; copy it elsewhere first")
    plan: list[tuple[Path, Path]] = []
    if out.is_dir():
        root = unique(out)
        for entry in sorted(out.iterdir()):
            kept = holds_input(entry)
            if kept is None:
                plan.append((entry, root / entry.name))
            elif ck == entry or entry in ck.parents:
                raise CheckpointError(f"--move-old-run: {entry} holds both the checkpoints and {kept}, which "
                                      "this run reads; move one of them elsewhere first")
            else:
                log.info("--move-old-run: %s stays (this run reads %s)", entry, kept)
    if ck.exists() and out not in ck.parents and ck != out:
        plan.append((ck, unique(ck)))
    done = []
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        log.warning("--move-old-run: %s moved to %s", src, dst)
        done.append(dst)
    return done


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, ckpt_dir: str | Path, state: TrainState, *, rank: int, config_yaml: str,
         tokenizer_path: str | Path | None, keep_last: int, barrier, vocab_parallel: dict | None = None,
         agree=None) -> str:
    """Save a checkpoint on every rank (collective); returns its tag. ``vocab_parallel``: the layout
    written to ``vocab_parallel.json`` (see :func:`megamlm.parallel.vocab.vocab_parallel_layout`).
    ``agree(x)``: the sum of ``x`` over all ranks (a host all-reduce), so that rank 0 failing to make the
    folder fails every rank (without it, a plain barrier: the other ranks would wait for rank 0)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.step)
    out = ckpt_dir / tag
    failed: BaseException | None = None
    if rank == 0:
        try:
            if is_complete(ckpt_dir, tag):  # resolve_resume keeps this from happening: refuse, never replace
                raise CheckpointError(f"{out} is already a complete checkpoint; it is not overwritten")
            if out.exists():  # a leftover from a run killed mid-save at this very step
                log.warning("removing %s: an interrupted save of this step (no %s marker)", out, COMPLETE)
                shutil.rmtree(out)
            out.mkdir(parents=True)
        except (OSError, CheckpointError) as e:
            failed = e
            if agree is None:
                raise
    if agree is not None:
        if agree(1.0 if failed is not None else 0.0):
            if failed is not None:
                raise failed
            raise CheckpointError(f"rank 0 could not create the checkpoint folder {out} (see its log)")
    else:
        barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    (out / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), out / "rng" / f"rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        _write_text_atomic(out / "train_state.json", json.dumps(asdict(state), indent=1))
        _write_text_atomic(out / "config.yaml", config_yaml)
        if vocab_parallel is not None:
            _write_text_atomic(out / VOCAB_PARALLEL_JSON, json.dumps(vocab_parallel, indent=1))
        if tokenizer_path:
            tdir = out / "tokenizer"
            tdir.mkdir(exist_ok=True)
            src = Path(tokenizer_path)
            shutil.copy2(src, tdir / src.name)
            side = src.with_suffix(".json")
            if side.exists():
                shutil.copy2(side, tdir / side.name)
        _write_text_atomic(out / COMPLETE, tag + "\n")  # first COMPLETE, then latest: see the docstring
        _write_text_atomic(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep_last, tag)
    barrier()
    log.info("checkpoint %s saved", out)
    return tag


def prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Retention after ``current`` was saved: keep it and the newest ``keep_last`` complete checkpoints up to
    it; remove older complete ones and incomplete folders, each with a log line. Never anything newer than
    ``current`` (:func:`resolve_resume` refuses runs that would leave such checkpoints beside it).
    The ``COMPLETE`` marker goes first: a crash in the middle of a removal leaves an incomplete folder,
    never resumed from, which the next save removes."""
    ckpt_dir = Path(ckpt_dir)
    tags = [t for t in step_folders(ckpt_dir) if step_of(t) <= step_of(current)]
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    keep = set(complete[-keep_last:]) | {current}
    for t in tags:
        if t in keep:
            continue
        marker = ckpt_dir / t / COMPLETE
        log.info("retention (checkpoint.keep_last=%d): removing %s%s", keep_last, ckpt_dir / t,
                 "" if marker.exists() else " (an interrupted save)")
        marker.unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
        shutil.rmtree(ckpt_dir / UNIVERSAL / t, ignore_errors=True)


def to_universal(ckpt_dir: str | Path, tag: str, workers: int = 1) -> Path:
    """Checkpoint ``tag`` in DeepSpeed's universal layout, ``<ckpt_dir>/universal/<tag>/`` (made once, by
    one process: the caller's rank 0), which loads on any data-parallel size at ZeRO 1-3: DeepSpeed's
    ``ds_to_universal`` in a subprocess (its memory is its own), into a temporary folder renamed when
    complete. Returns the folder; CheckpointError with the converter's last output when it fails."""
    src, out = Path(ckpt_dir) / tag, Path(ckpt_dir) / UNIVERSAL / tag
    saved = saved_topology(src)
    ranks = int(saved.get("data_parallel_size", 0))
    missing = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)
               if not any((src / f"{p}zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file() for p in ("", "bf16_"))]
    if not ranks or missing:
        raise CheckpointError(f"{src} cannot be resumed on another data-parallel size: "
                              + (f"its ZeRO partitions {', '.join(missing)} are missing" if missing else
                                 "train_state.json does not say how many ranks saved it"))
    if (out / COMPLETE).is_file():
        log.info("universal form of %s already made: %s", src, out)
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {src} to DeepSpeed's universal layout failed (exit {r.returncode}): "
                              f"{(r.stderr or r.stdout)[-1500:]}")
    (tmp / COMPLETE).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    log.info("converted %s to DeepSpeed's universal layout in %s: %.1f s, converter peak RSS %.0f MB", src, out,
             time.time() - t0, peak_mb)
    return out


def saved_vocab_parallel_size(ckpt: Path, saved_cfg: dict | None = None) -> int:
    """The vocab-parallel size a checkpoint was saved with: ``vocab_parallel.json``, else its config.yaml."""
    f = Path(ckpt) / VOCAB_PARALLEL_JSON
    if f.is_file():
        return int(json.loads(f.read_text())["vocab_parallel_size"])
    return int(((saved_cfg or {}).get("parallel") or {}).get("vocab_parallel_size", 1))


def saved_topology(ckpt: Path) -> dict:
    """The layout a checkpoint was saved with (``data_parallel_size``, ``num_workers``, ...): its
    train_state.json ``topology``; for checkpoints older than that field, what its loader state says."""
    f = Path(ckpt) / "train_state.json"
    if not f.is_file():
        raise CheckpointError(f"{ckpt} has no train_state.json: not a megamlm checkpoint, or incomplete")
    raw = json.loads(f.read_text())
    topo = dict(raw.get("topology") or {})
    loader = raw.get("loader") or {}
    if "data_parallel_size" not in topo and "dp_size" in loader:
        topo["data_parallel_size"] = int(loader["dp_size"])
    if "num_workers" not in topo and "num_workers" in loader:
        topo["num_workers"] = int(loader["num_workers"])
    return topo


def check_shape(ckpt: Path, model_cfg: dict, vocab_parallel_size: int | None = None) -> None:
    """Refuse a checkpoint of another model shape with the differing keys named; with
    ``vocab_parallel_size``, also one saved with another vocab-parallel size (its shards would not fit)."""
    import yaml

    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml: not a megamlm checkpoint, or incomplete")
    saved_cfg = yaml.safe_load(cfg_file.read_text()) or {}
    saved = saved_cfg.get("model", {})
    shape_keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position_embeddings",
                  "type_vocab_size", "norm_position")
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {model_cfg.get(k)!r}" for k in shape_keys
            if saved.get(k) != model_cfg.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} is from another model shape: " + "; ".join(diff))
    if vocab_parallel_size is not None:
        saved_t = saved_vocab_parallel_size(ckpt, saved_cfg)
        if saved_t != vocab_parallel_size:
            raise CheckpointError(
                f"checkpoint {ckpt} was saved with parallel.vocab_parallel_size={saved_t} but this run uses "
                f"parallel.vocab_parallel_size={vocab_parallel_size}: its vocabulary shards do not fit; resume "
                f"with parallel.vocab_parallel_size={saved_t}, or merge the shards with the conversion tool")


def load(engine, ckpt_dir: str | Path, tag: str, *, rank: int, model_cfg: dict,
         vocab_parallel_size: int | None = None, universal: bool = False) -> TrainState:
    """Load engine state, this rank's RNG and the training state of checkpoint ``tag``. ``universal``: the
    engine state from its universal form (:func:`to_universal`; an engine built with ``load_universal``)."""
    path = Path(ckpt_dir) / tag
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    check_shape(path, model_cfg, vocab_parallel_size)
    load_dir = Path(ckpt_dir) / UNIVERSAL if universal else Path(ckpt_dir)
    if universal and not (load_dir / tag / COMPLETE).is_file():
        raise CheckpointError(f"{load_dir / tag} is missing or incomplete: the universal form of {path} "
                              f"(checkpoint.to_universal makes it)")
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rng_file = path / "rng" / f"rank{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for rank %d (saved with another world size?): dropout streams "
                    "will differ from the uninterrupted run", path, rank)
    raw = json.loads((path / "train_state.json").read_text())
    return TrainState(**raw)
