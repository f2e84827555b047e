"""The pretrained encoder a fine-tuning run starts from: a megamlm checkpoint (any ZeRO stage or
vocab-parallel size, fp32 consolidated), a megamlm export or a Hugging Face BERT directory, loaded by
megamlm.convert (the key table in megamlm/model/hf_keys.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megamlm.checkpoint import CheckpointError
from megamlm.config import ModelConfig

__all__ = ["Pretrained", "SourceInfo", "inspect_pretrained", "load_pretrained"]


@dataclass
class Pretrained:
    model: ModelConfig
    encoder_state: dict[str, torch.Tensor]  # keys without the "encoder." prefix
    pooler_state: dict[str, torch.Tensor] | None  # {"weight", "bias"} of the NSP/SOP pooler, if any
    tokenizer: str  # path of the SentencePiece .model ('' if none found)
    val_fraction: float | None  # pretraining's data.val_fraction (None: unknown, e.g. HF)
    source: str


@dataclass
class SourceInfo:
    """What a pretrained source says about itself, read from its small files only (no weights): for
    preflight (megamlm.preflight) and :func:`load_pretrained` alike."""

    kind: str  # "checkpoint" (a megamlm checkpoint's tag folder), "export" (megamlm) or "hf"
    folder: Path  # where its config and tokenizer/ live
    tokenizer: str  # path of the SentencePiece .model ('' if none found)
    val_fraction: float | None  # pretraining's data.val_fraction (None: unknown, e.g. HF)


def inspect_pretrained(checkpoint: str) -> SourceInfo:
    """``init.checkpoint`` → :class:`SourceInfo`, telling the sources apart as megamlm.convert's
    ``load_any`` does; CheckpointError (missing) or ConvertError (not a source) naming the path."""
    from megamlm.convert.core import is_export
    from megamlm.convert.hf import is_hf_dir
    from megamlm.convert.zero import ConvertError, resolve_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"init.checkpoint={checkpoint!r} does not exist")
    if path.is_dir() and ((path / "latest").is_file() or (path / "COMPLETE").is_file()):
        kind, folder = "checkpoint", resolve_checkpoint(path)
    elif is_export(path):
        kind, folder = "export", path if path.is_dir() else path.parent
    elif path.is_dir() and is_hf_dir(path):
        kind, folder = "hf", path
    else:
        raise ConvertError(f"{path}: neither a megamlm checkpoint (no `latest` / COMPLETE), a megamlm export "
                           "(model.safetensors with megamlm metadata) nor a Hugging Face directory (config.json)")
    val = None
    if kind != "hf" and (folder / "config.yaml").is_file():
        try:
            raw = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConvertError(f"{folder / 'config.yaml'}: not a readable YAML config: {e}") from e
        data = raw.get("data") if isinstance(raw, dict) else None
        val = data.get("val_fraction") if isinstance(data, dict) else None
    toks = sorted((folder / "tokenizer").glob("*.model")) if kind != "hf" else []
    if not toks:
        toks = sorted(path.glob("*.model")) + sorted(path.glob("*/*.model"))
    return SourceInfo(kind, folder, str(toks[0]) if toks else "", val)


def _from_convert(path: Path, info: SourceInfo) -> Pretrained:
    """Through megamlm.convert (consolidation from any ZeRO stage / vocab-parallel size, HF import)."""
    from megamlm.convert.core import load_any

    w = load_any(path)
    enc = {k[len("encoder."):]: v.float() for k, v in w.state.items() if k.startswith("encoder.")}
    model = ModelConfig(**{k: v for k, v in w.model.items() if k in ModelConfig.__dataclass_fields__})
    model.vocab_size = enc["embeddings.word_embeddings.weight"].shape[0]  # real rows (padding stripped)
    pooler = None
    if "pair_head.pooler.weight" in w.state:
        pooler = {"weight": w.state["pair_head.pooler.weight"].float(), "bias": w.state["pair_head.pooler.bias"].float()}
    return Pretrained(model, enc, pooler, info.tokenizer, info.val_fraction, w.source or str(path))


def load_pretrained(checkpoint: str) -> Pretrained:
    """A megamlm checkpoint folder (``latest`` or one tag), a megamlm export or an HF BERT directory →
    :class:`Pretrained`, through megamlm.convert (any ZeRO stage and vocab-parallel size, safe loading)."""
    return _from_convert(Path(checkpoint), inspect_pretrained(checkpoint))
