"""What every converter shares: a full fp32 megamlm state dict (:class:`Weights`), the shapes a model
config implies, the check of a state dict against them, and reading a safetensors file.

The lowest module of the conversion formats: core.py (megamlm checkpoints and exports) and hf.py (Hugging
Face directories) both build on it, and it imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamlm.convert.zero import ConvertError, safe_load

__all__ = ["WORD", "TIED", "ACT_TO_HF", "ACT_FROM_HF", "read_hf_weights", "retie", "Weights", "expected_shapes", "objective_config", "check_state",
           "read_safetensors", "safetensors_header"]

WORD = "encoder.embeddings.word_embeddings.weight"
#: model.activation ↔ Hugging Face's hidden_act (BERT and ELECTRA)
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
#: tied aliases (one tensor): the MLM decoder's weight, BERT's or the ELECTRA generator's, is the word embedding
TIED = {"mlm_head.decoder.weight": WORD, "generator.mlm_head.decoder.weight": WORD}


def retie(state: dict) -> dict:
    """Set, in place, the tied aliases of :data:`TIED` whose decoder the state holds (its bias is there);
    returns the state."""
    for alias, src in TIED.items():
        if alias.replace(".weight", ".bias") in state and src in state:
            state[alias] = state[src]
    return state


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
    objective: dict = field(default_factory=dict)  # the ``objective:`` section when it shapes the model (ELECTRA)

    @property
    def electra(self) -> bool:
        return self.objective.get("name") == "electra"


def objective_config(pair: str, objective: dict | None = None):
    """The :class:`ObjectiveConfig` that shapes a model: ``objective`` (a config section, e.g. ELECTRA's
    generator keys) with ``pair``."""
    from megamlm.config import ObjectiveConfig

    fields = ObjectiveConfig.__dataclass_fields__
    return ObjectiveConfig(**{**{k: v for k, v in (objective or {}).items() if k in fields}, "pair": pair})


def expected_shapes(model: dict, pair: str, rows: int, real: int | None = None,
                    objective: dict | None = None) -> dict[str, tuple]:
    """Names and shapes of the megamlm model that ``model`` (a config section; with ``objective``, the
    objective section: ELECTRA's generator) describes, built on meta."""
    from megamlm.config import ModelConfig
    from megamlm.model import build_model

    mc = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    with torch.device("meta"):
        m = build_model(mc, objective_config(pair, objective), rows, real)
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


def read_hf_weights(d: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of an HF directory (model.safetensors, a sharded index, or pytorch_model.bin loaded with
    ``weights_only=True``) and the file they came from."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    binf = d / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single)[0], str(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({e})") from None
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(read_safetensors(d / s)[0])
        return out, str(index)
    if binf.is_file():
        sd = safe_load(binf)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{binf}: not a flat state dict of tensors")
        return dict(sd), str(binf)
    raise ConvertError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
