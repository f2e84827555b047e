"""What every converter shares: a full fp32 megamlm state dict (:class:`Weights`), the shapes a model
config implies, the check of a state dict against them, and reading a safetensors file.

The lowest module of the conversion formats: core.py (megamlm checkpoints and exports) and hf.py (Hugging
Face directories) both build on it, and it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamlm.convert.zero import ConvertError

__all__ = ["WORD", "TIED", "Weights", "expected_shapes", "check_state", "read_safetensors",
           "safetensors_header"]

WORD = "encoder.embeddings.word_embeddings.weight"
TIED = {"mlm_head.decoder.weight": WORD}


@dataclass
class Weights:
    """A full fp32 megamlm state dict with real vocabulary rows (tied key included) and what describes it."""

    state: dict[str, torch.Tensor]
    model: dict  # the ``model:`` config section (vocab_size as in the source config)
    pair: str  # objective.pair the heads support: nsp / sop / none
    real_vocab_size: int
    config_yaml: str | None = None
    tokenizer_dir: Path | None = None
    source: str = ""
    report: dict = field(default_factory=dict)


def expected_shapes(model: dict, pair: str, rows: int, real: int | None = None) -> dict[str, tuple]:
    """Names and shapes of the megamlm model that ``model`` (a config section) describes, built on meta."""
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.model import build_model

    mc = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    with torch.device("meta"):
        m = build_model(mc, ObjectiveConfig(pair=pair), rows, real)
    return {k: tuple(v.shape) for k, v in m.state_dict(keep_vars=False).items()}


def check_state(state: dict, expected: dict, where: str) -> None:
    """Same keys and shapes, or one error naming every missing / unknown key and mismatching shape."""
    problems = []
    for k in sorted(set(expected) - set(state)):
        problems.append(f"missing {k} (expected {list(expected[k])})")
    for k in sorted(set(state) - set(expected)):
        problems.append(f"unknown key {k} {list(state[k].shape)}")
    for k in sorted(set(state) & set(expected)):
        if tuple(state[k].shape) != expected[k]:
            problems.append(f"{k}: shape {list(state[k].shape)} in the file, {list(expected[k])} from the config")
    if problems:
        raise ConvertError(f"{where}: does not match its model config: " + "; ".join(problems[:12])
                           + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else ""))


def safetensors_header(f: Path) -> dict:
    """The header of the safetensors file ``f``, its sizes checked; a truncated or unreadable file raises
    ConvertError naming it."""
    from megamlm.convert.safetensors_io import HeaderError, read_header

    try:
        return read_header(f)
    except HeaderError as e:
        raise ConvertError(f"{f}: not a readable safetensors file (truncated?): {e}") from e
    except OSError as e:
        raise ConvertError(f"{f}: cannot be read: {e}") from e


def read_safetensors(f: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor and the metadata of a safetensors file; a missing, truncated or foreign file raises
    naming it."""
    from safetensors import SafetensorError, safe_open

    if not f.is_file():
        raise ConvertError(f"{f}: file is missing")
    safetensors_header(f)  # sizes checked first: the library reports a short file and a foreign one alike
    try:
        with safe_open(str(f), "pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}, dict(h.metadata() or {})
    except SafetensorError as e:  # a header safetensors refuses (dtype, overlapping offsets, ...)
        raise ConvertError(f"{f}: not a readable safetensors file: {e}") from e
