"""Offline conversion: megamlm checkpoint ↔ consolidated fp32 export ↔ Hugging Face BERT directory.

Runs on one CPU with no process group and takes the model shape from the source (config.yaml of a
megamlm checkpoint, config.json of an HF directory), never from flags. Every tensor goes through the key
table (megamlm/model/hf_keys.py, shared with the parity tests) and is checked against the shape the
source's config implies; unknown keys are listed in the error, never dropped. What this module and hf.py
share (:class:`Weights`, the shape check, reading safetensors) lives below both, in weights.py; the names
stay importable from here.

Formats:

* megamlm export (``--to megamlm``): ``model.safetensors`` (fp32, real vocabulary rows only, tied decoder
  weight stored once, metadata ``format=megamlm-export/1``), ``config.yaml`` (the resolved config),
  ``tokenizer/`` (SentencePiece model + sidecar, when the source had one), ``convert_report.json``.
* HF directory (``--to hf``): ``config.json``, ``model.safetensors`` for ``BertForPreTraining`` (or
  ``BertForMaskedLM`` / ``BertModel`` with ``--hf-arch``), ``tokenizer.json`` + ``tokenizer_config.json`` +
  ``special_tokens_map.json`` built from the SentencePiece model, ``convert_report.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from megamlm.convert.hf import is_hf_dir, load_hf
from megamlm.convert.weights import (TIED, WORD, Weights, check_state, expected_shapes, read_safetensors, retie,
                                     safetensors_header)
from megamlm.convert.zero import ConvertError, consolidate, materialize, resolve_checkpoint

log = logging.getLogger(__name__)

EXPORT_FORMAT = "megamlm-export/1"
VOCAB_ROWS = (WORD, "mlm_head.decoder.bias", "generator.mlm_head.decoder.bias")  # one row per vocabulary id
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "ffn_size", "max_position_embeddings", "type_vocab_size",
              "norm_position", "activation", "layer_norm_eps")


# ------------------------------------------------------------------------------------------- helpers
def strip_vocab(state: dict, real: int) -> dict:
    out = dict(state)
    for k in VOCAB_ROWS:
        if k in state:
            out[k] = materialize(state[k])[:real]  # leading rows of a contiguous tensor: contiguous, no copy
    return retie(out)


def pad_vocab(state: dict, rows: int, init_std: float = 0.02, seed: int = 0) -> dict:
    """Real rows → ``rows`` rows: padded embedding rows drawn N(0, init_std), padded bias rows 0 (they
    are never targets nor inputs)."""
    out = dict(state)
    n = state[WORD].shape[0]
    if rows < n:
        raise ConvertError(f"cannot pad a {n}-row vocabulary to {rows} rows")
    if rows > n:
        g = torch.Generator().manual_seed(seed)
        extra = torch.randn(rows - n, state[WORD].shape[1], generator=g) * init_std
        out[WORD] = torch.cat([state[WORD], extra.to(state[WORD].dtype)])
        for k in VOCAB_ROWS[1:]:
            if k in state:
                out[k] = torch.cat([state[k], state[k].new_zeros(rows - n)])
    return retie(out)


def _pair_of(state: dict, default: str = "nsp") -> str:
    return default if "pair_head.classifier.weight" in state else "none"


# ------------------------------------------------------------------------------- megamlm checkpoint
def load_megamlm_checkpoint(path: str | Path, tag: str | None = None, lazy: bool = False) -> Weights:
    """A megamlm checkpoint folder (with ``latest``) or tag folder → consolidated fp32 weights, padding
    stripped, checked tensor by tensor against the checkpoint's own config.yaml. ``lazy``: ZeRO-3 tensors
    other than the vocabulary rows stay lazy until written (:func:`save_export` gathers one at a time)."""
    import yaml

    from megamlm.config import ConfigError, config_from_dict

    folder = resolve_checkpoint(path, tag)
    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise ConvertError(f"{folder}: no config.yaml: not a megamlm checkpoint")
    try:
        text = cfg_file.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConvertError(f"{cfg_file}: not a readable YAML config: {e}") from e
    try:
        cfg = config_from_dict(raw or {}, source=str(cfg_file))
    except ConfigError as e:  # every problem, one per line
        raise ConvertError(f"{cfg_file}: {e}") from e
    full, layout = consolidate(folder, cfg.engine.zero_stage, lazy)
    tok_dir = folder / "tokenizer"
    side = next(iter(sorted(tok_dir.glob("*.json"))), None) if tok_dir.is_dir() else None
    meta = json.loads(side.read_text()) if side else {}
    rows = int(layout.get("padded_vocab_size") or cfg.model.vocab_size or meta.get("padded_vocab_size") or
               full[WORD].shape[0])
    real = int(layout.get("real_vocab_size") or meta.get("vocab_size") or rows)
    from megamlm.config import config_to_dict

    model, objective = config_to_dict(cfg.model), config_to_dict(cfg.objective)
    check_state(full, expected_shapes(model, cfg.objective.pair, rows, real, objective), str(folder))
    w = Weights(strip_vocab(full, real), model, cfg.objective.pair, real, text,
                tok_dir if any(tok_dir.glob("*.model")) else None, str(folder), objective=objective)
    w.report = {"source": str(folder), "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                "vocab_parallel_size": int(layout.get("vocab_parallel_size", 1)), "padded_vocab_size": rows,
                "real_vocab_size": real}
    return w


# --------------------------------------------------------------------------------- megamlm export
def save_export(w: Weights, out: str | Path) -> Path:
    import yaml

    from megamlm.convert.safetensors_io import write_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in w.state.items() if k not in TIED}  # lazy ones are gathered one by one
    write_safetensors(tensors, out / "model.safetensors",
                      metadata={"format": EXPORT_FORMAT, "real_vocab_size": str(w.real_vocab_size), "pair": w.pair,
                                "objective": w.objective.get("name", "mlm")})
    objective = {**w.objective, "pair": w.pair}
    text = w.config_yaml or yaml.safe_dump({"model": w.model, "objective": objective}, sort_keys=False)
    (out / "config.yaml").write_text(text, encoding="utf-8")
    if w.tokenizer_dir is not None:
        (out / "tokenizer").mkdir(exist_ok=True)
        for f in sorted(Path(w.tokenizer_dir).iterdir()):
            if f.suffix in (".model", ".json"):
                shutil.copy2(f, out / "tokenizer" / f.name)
    (out / "convert_report.json").write_text(json.dumps(w.report, indent=1, default=str) + "\n")
    return out


def is_export(path: Path) -> bool:
    """``path`` (a folder with ``model.safetensors``, or the file) is a megamlm export: a safetensors file
    with megamlm metadata. False for anything else; a ``.safetensors`` file whose header cannot be read,
    or that is shorter than its header says, raises naming the file (a truncated copy is not "something
    else")."""
    f = path / "model.safetensors" if path.is_dir() else path
    if not f.is_file() or f.suffix != ".safetensors":
        return False
    header = safetensors_header(f)
    meta = header.get("__metadata__")
    return isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT


def load_export(path: str | Path) -> Weights:
    import yaml

    p = Path(path)
    f = p / "model.safetensors" if p.is_dir() else p
    root = f.parent
    state, meta = read_safetensors(f)
    if meta.get("format") != EXPORT_FORMAT:
        raise ConvertError(f"{f}: not a megamlm export (metadata format {meta.get('format')!r})")
    cfg_file = root / "config.yaml"
    if not cfg_file.is_file():
        raise ConvertError(f"{root}: megamlm export without config.yaml")
    text = cfg_file.read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    model = raw.get("model", {})
    objective = raw.get("objective") or {}
    pair = meta.get("pair") or objective.get("pair", "nsp")
    real = int(meta["real_vocab_size"])
    retie(state)
    check_state(state, expected_shapes(model, pair, real, real, objective), str(f))
    tok = root / "tokenizer"
    return Weights(state, model, pair, real, text, tok if any(tok.glob("*.model")) else None, str(f),
                   {"source": str(f)}, objective)


# ------------------------------------------------------------------------------ any source → weights
def load_any(path: str | Path, tag: str | None = None, lazy: bool = False) -> Weights:
    """A megamlm checkpoint folder / tag folder, a megamlm export, or an HF BERT directory. ``lazy``: see
    :func:`load_megamlm_checkpoint` (only for :func:`save_export`)."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or folder")
    if p.is_dir() and ((p / "latest").is_file() or (p / "COMPLETE").is_file() or tag):
        return load_megamlm_checkpoint(p, tag, lazy)
    if is_export(p):
        return load_export(p)
    if p.is_dir() and is_hf_dir(p):
        return load_hf(p)
    raise ConvertError(f"{p}: neither a megamlm checkpoint (no `latest` / COMPLETE), a megamlm export "
                       "(model.safetensors with megamlm metadata) nor a Hugging Face directory (config.json)")


def init_state_for(model, w: Weights, real_vocab_size: int) -> tuple[dict, list[str]]:
    """The state dict to load into a freshly built ``model`` for ``--init-from``: vocabulary padded to the
    model's rows, missing heads left at their fresh initialisation (returned by name). Shape or vocabulary
    mismatches raise naming the key; tensors the model has no place for raise too."""
    if w.real_vocab_size != real_vocab_size:
        raise ConvertError(f"{w.source}: vocabulary of {w.real_vocab_size} ids, but this run's tokenizer has "
                           f"{real_vocab_size}: ids would mean other pieces")
    own = model.state_dict()
    rows = own[WORD].shape[0]
    state = pad_vocab(w.state, rows, seed=0)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConvertError(f"{w.source}: tensors this run's model has no place for (objective.pair differs?): "
                           f"{', '.join(unknown[:8])}")
    bad = [f"{k}: {list(state[k].shape)} in {w.source}, {list(own[k].shape)} in this run's model"
           for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConvertError("--init-from shape mismatch: " + "; ".join(bad[:8]))
    missing = sorted(set(own) - set(state))
    merged = {k: state.get(k, own[k]) for k in own}
    return merged, missing
