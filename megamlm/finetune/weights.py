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

__all__ = ["Pretrained", "load_pretrained"]


@dataclass
class Pretrained:
    model: ModelConfig
    encoder_state: dict[str, torch.Tensor]  # keys without the "encoder." prefix
    pooler_state: dict[str, torch.Tensor] | None  # {"weight", "bias"} of the NSP/SOP pooler, if any
    tokenizer: str  # path of the SentencePiece .model ('' if none found)
    val_fraction: float | None  # pretraining's data.val_fraction (None: unknown, e.g. HF)
    source: str


def _from_convert(path: Path) -> Pretrained:
    """Through megamlm.convert (consolidation from any ZeRO stage / vocab-parallel size, HF import)."""
    from megamlm.convert.core import load_any

    w = load_any(path)
    enc = {k[len("encoder."):]: v.float() for k, v in w.state.items() if k.startswith("encoder.")}
    model = ModelConfig(**{k: v for k, v in w.model.items() if k in ModelConfig.__dataclass_fields__})
    model.vocab_size = enc["embeddings.word_embeddings.weight"].shape[0]  # real rows (padding stripped)
    pooler = None
    if "pair_head.pooler.weight" in w.state:
        pooler = {"weight": w.state["pair_head.pooler.weight"].float(), "bias": w.state["pair_head.pooler.bias"].float()}
    val = None
    if w.config_yaml:
        val = ((yaml.safe_load(w.config_yaml) or {}).get("data") or {}).get("val_fraction")
    toks = sorted(Path(w.tokenizer_dir).glob("*.model")) if w.tokenizer_dir else []
    if not toks:
        toks = sorted(path.glob("*.model")) + sorted(path.glob("*/*.model"))
    return Pretrained(model, enc, pooler, str(toks[0]) if toks else "", val, w.source or str(path))


def load_pretrained(checkpoint: str) -> Pretrained:
    """A megamlm checkpoint folder (``latest`` or one tag), a megamlm export or an HF BERT directory →
    :class:`Pretrained`, through megamlm.convert (any ZeRO stage and vocab-parallel size, safe loading)."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"init.checkpoint={checkpoint!r} does not exist")
    return _from_convert(path)
