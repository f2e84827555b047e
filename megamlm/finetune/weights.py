"""The pretrained encoder a fine-tuning run starts from: a megamlm checkpoint (any ZeRO stage, fp32
consolidated) or a Hugging Face BERT directory, through the key table in megamlm/model/hf_keys.py.

A minimal loader kept here until megamlm/convert* offers one (to deduplicate then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megamlm.checkpoint import COMPLETE, LATEST, CheckpointError
from megamlm.config import ModelConfig
from megamlm.model.hf_keys import EMBEDDING_KEYS, LAYER_KEYS

__all__ = ["Pretrained", "load_pretrained"]


@dataclass
class Pretrained:
    model: ModelConfig
    encoder_state: dict[str, torch.Tensor]  # keys without the "encoder." prefix
    pooler_state: dict[str, torch.Tensor] | None  # {"weight", "bias"} of the NSP/SOP pooler, if any
    tokenizer: str  # path of the SentencePiece .model ('' if none found)
    val_fraction: float | None  # pretraining's data.val_fraction (None: unknown, e.g. HF)
    source: str


def _tag_dir(path: Path) -> Path:
    if (path / COMPLETE).is_file():
        return path
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag / COMPLETE).is_file():
            raise CheckpointError(f"{path / LATEST} points at {tag!r}, which is not a complete checkpoint")
        return path / tag
    raise CheckpointError(f"init.checkpoint={str(path)!r} is neither a megamlm checkpoint (no {LATEST} or "
                          f"{COMPLETE}) nor a Hugging Face directory (no config.json)")


def _megamlm_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    if (tag_dir / "vocab_parallel.json").is_file():
        vp = json.loads((tag_dir / "vocab_parallel.json").read_text()).get("vocab_parallel_size", 1)
        if vp != 1:
            raise CheckpointError(f"{tag_dir} was saved with vocab_parallel_size={vp}; merge its shards with the "
                                  "conversion tool first")
    if list(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return {k: v.detach().float() for k, v in sd.items()}
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(f"{tag_dir} has no model states ({states.name})")
    return {k: v.float() for k, v in torch.load(states, map_location="cpu", weights_only=False)["module"].items()}


def _from_megamlm(path: Path) -> Pretrained:
    from megamlm.config import config_from_dict

    tag_dir = _tag_dir(path)
    raw = yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}
    cfg = config_from_dict(raw, str(tag_dir / "config.yaml"))
    sd = _megamlm_weights(tag_dir)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    pooler = None
    if "pair_head.pooler.weight" in sd:
        pooler = {"weight": sd["pair_head.pooler.weight"], "bias": sd["pair_head.pooler.bias"]}
    model = cfg.model
    if not model.vocab_size:
        model.vocab_size = enc["embeddings.word_embeddings.weight"].shape[0]
    toks = sorted((tag_dir / "tokenizer").glob("*.model"))
    return Pretrained(model, enc, pooler, str(toks[0]) if toks else "", cfg.data.val_fraction, str(tag_dir))


_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _from_hf(path: Path) -> Pretrained:
    hc = json.loads((path / "config.json").read_text())
    act = hc.get("hidden_act", "gelu")
    if act not in _ACT:
        raise CheckpointError(f"{path}/config.json: hidden_act={act!r} has no megamlm equivalent (gelu, gelu_tanh)")
    model = ModelConfig(vocab_size=hc["vocab_size"], hidden_size=hc["hidden_size"],
                        num_layers=hc["num_hidden_layers"], num_heads=hc["num_attention_heads"],
                        ffn_size=hc["intermediate_size"], max_position_embeddings=hc["max_position_embeddings"],
                        type_vocab_size=hc.get("type_vocab_size", 2), dropout=hc.get("hidden_dropout_prob", 0.1),
                        attention_dropout=hc.get("attention_probs_dropout_prob", 0.1),
                        layer_norm_eps=hc.get("layer_norm_eps", 1e-12), activation=_ACT[act])
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        hf = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        hf = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{path} has no model.safetensors or pytorch_model.bin")
    hf = {(k if k.startswith(("bert.", "cls.")) else f"bert.{k}"): v.float() for k, v in hf.items()}
    rows = list(EMBEDDING_KEYS) + [(m.format(i=i), tuple(h.format(i=i) for h in hs))
                                   for i in range(model.num_layers) for m, hs in LAYER_KEYS]
    enc = {}
    for m, hs in rows:
        missing = [h for h in hs if h not in hf]
        if missing:
            raise CheckpointError(f"{path}: weights lack {missing[0]} (needed for {m})")
        enc[m[len("encoder."):]] = torch.cat([hf[h] for h in hs], 0) if len(hs) > 1 else hf[hs[0]].clone()
    pooler = None
    if "bert.pooler.dense.weight" in hf:
        pooler = {"weight": hf["bert.pooler.dense.weight"], "bias": hf["bert.pooler.dense.bias"]}
    toks = sorted(path.glob("*.model")) + sorted(path.glob("*/*.model"))
    return Pretrained(model, enc, pooler, str(toks[0]) if toks else "", None, str(path))


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
    """A megamlm checkpoint folder (``latest`` or one tag) or an HF BERT directory → :class:`Pretrained`.
    Uses megamlm.convert when it is present; the minimal loaders below otherwise."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"init.checkpoint={checkpoint!r} does not exist")
    try:
        import megamlm.convert.core  # noqa: F401
    except ImportError:
        pass
    else:
        return _from_convert(path)
    if (path / "config.json").is_file():
        return _from_hf(path)
    return _from_megamlm(path)
