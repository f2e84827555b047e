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

``latest`` moves only after ``COMPLETE`` exists, so a run killed mid-save resumes from the previous
checkpoint; incomplete folders are removed with the old ones when the next save completes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
VOCAB_PARALLEL_JSON = "vocab_parallel.json"
TAG_RE = re.compile(r"^step(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or from another model shape; the message names it."""

    user_facing = True  # the CLI prints it as one message, no traceback


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    loader: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    elapsed_seconds: float = 0.0


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def read_latest(ckpt_dir: str | Path) -> str | None:
    p = Path(ckpt_dir) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not (Path(ckpt_dir) / tag / COMPLETE).is_file():
        raise CheckpointError(f"{p} points at {tag!r}, which is not a complete checkpoint")
    return tag


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
         tokenizer_path: str | Path | None, keep_last: int, barrier, vocab_parallel: dict | None = None) -> str:
    """Save a checkpoint on every rank (collective); returns its tag. ``vocab_parallel``: the layout
    written to ``vocab_parallel.json`` (see :func:`megamlm.parallel.vocab.vocab_parallel_layout`)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.step)
    out = ckpt_dir / tag
    if rank == 0:
        if out.exists():  # a leftover from a run killed mid-save at this very step
            shutil.rmtree(out)
        out.mkdir(parents=True)
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
        _write_text_atomic(out / COMPLETE, tag + "\n")
        _write_text_atomic(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep_last)
    barrier()
    log.info("checkpoint %s saved", out)
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; remove older ones and incomplete ones."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    complete = [t for t in tags if (ckpt_dir / t / COMPLETE).is_file()]
    keep = set(complete[-keep_last:])
    for t in tags:
        if t not in keep:
            shutil.rmtree(ckpt_dir / t, ignore_errors=True)


def saved_vocab_parallel_size(ckpt: Path, saved_cfg: dict | None = None) -> int:
    """The vocab-parallel size a checkpoint was saved with: ``vocab_parallel.json``, else its config.yaml."""
    f = Path(ckpt) / VOCAB_PARALLEL_JSON
    if f.is_file():
        return int(json.loads(f.read_text())["vocab_parallel_size"])
    return int(((saved_cfg or {}).get("parallel") or {}).get("vocab_parallel_size", 1))


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
         vocab_parallel_size: int | None = None) -> TrainState:
    """Load engine state, this rank's RNG and the training state of checkpoint ``tag``."""
    path = Path(ckpt_dir) / tag
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    check_shape(path, model_cfg, vocab_parallel_size)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
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
