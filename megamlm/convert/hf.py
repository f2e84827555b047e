"""megamlm weights ↔ a Hugging Face BERT directory (config.json + safetensors / bin + tokenizer files).

Export writes the BertForPreTraining layout (BertForMaskedLM when the run had no pair head) through the
key table; ``arch`` picks BertForMaskedLM or BertModel instead. Import reads BertForPreTraining,
BertForMaskedLM or BertModel (safetensors, sharded safetensors or ``pytorch_model.bin`` read with
``weights_only=True``), checks every tensor's shape against config.json, and reports the heads it lacks
(``--init-from`` initialises them). A non-BERT directory, a post-LN-incompatible setting or an unknown key
is an error naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megamlm.convert.weights import (ACT_FROM_HF, ACT_TO_HF, Weights, check_state, expected_shapes, objective_config,
                                     read_hf_weights, retie)
from megamlm.convert.zero import ConvertError
from megamlm.model.hf_keys import HF_ARCHS, HF_BUFFERS, from_hf_partial, to_hf_arch

__all__ = ["is_hf_dir", "load_hf", "save_hf", "hf_config"]



def is_hf_dir(p: Path) -> bool:
    """A Hugging Face directory: a config.json, or an ELECTRA pair (``discriminator/`` and ``generator/``)."""
    from megamlm.convert.hf_electra import is_hf_electra_dir

    return (p / "config.json").is_file() or is_hf_electra_dir(p)


def hf_config(m: dict, real_vocab_size: int, arch: str, source: str) -> dict:
    """HF BERT's config.json for the model section ``m`` (a dict) with ``real_vocab_size`` pieces."""
    if m.get("norm_position", "post") != "post":
        raise ConvertError(f"{source}: model.norm_position={m['norm_position']!r}: HF BERT is post-LN only")
    return {"architectures": [arch], "model_type": "bert", "vocab_size": real_vocab_size,
            "hidden_size": m["hidden_size"], "num_hidden_layers": m["num_layers"],
            "num_attention_heads": m["num_heads"], "intermediate_size": m["ffn_size"],
            "hidden_act": ACT_TO_HF[m.get("activation", "gelu")], "hidden_dropout_prob": m.get("dropout", 0.1),
            "attention_probs_dropout_prob": m.get("attention_dropout", 0.1),
            "max_position_embeddings": m["max_position_embeddings"], "type_vocab_size": m["type_vocab_size"],
            "initializer_range": m.get("init_std", 0.02), "layer_norm_eps": m.get("layer_norm_eps", 1e-12),
            "pad_token_id": 0, "position_embedding_type": "absolute", "tie_word_embeddings": True,
            "dtype": "float32"}


def save_hf(w: Weights, out: str | Path, arch: str | None = None, tokenizer_model: Path | None = None) -> Path:
    """Write an HF directory for ``arch`` (default: BertForPreTraining, or BertForMaskedLM without a pair
    head). The tokenizer files come from the SentencePiece model beside the weights."""
    from megamlm.convert.hf_electra import DISC_ARCHS, save_hf_electra
    from megamlm.convert.hf_tokenizer import save_hf_tokenizer
    from megamlm.convert.safetensors_io import write_safetensors

    if w.electra:  # the discriminator and the generator, each its own HF directory
        return save_hf_electra(w, Path(out), arch, tokenizer_model)
    if arch in DISC_ARCHS:
        raise ConvertError(f"--hf-arch {arch!r} is for ELECTRA checkpoints; {w.source} is a BERT (MLM) one: choose "
                           f"one of {', '.join(HF_ARCHS)}")
    arch = arch or ("BertForPreTraining" if w.pair != "none" else "BertForMaskedLM")
    if arch not in HF_ARCHS:
        raise ConvertError(f"--hf-arch {arch!r}: choose one of {', '.join(HF_ARCHS)}")
    if arch == "BertForPreTraining" and w.pair == "none":
        raise ConvertError(f"{w.source} has no pair head (objective.pair=none): export BertForMaskedLM or BertModel")
    if arch == "BertModel" and w.pair == "none":
        raise ConvertError(f"{w.source} has no pooler (objective.pair=none): BertModel would load it newly "
                           "initialised; export BertForMaskedLM")
    cfg = hf_config(w.model, w.real_vocab_size, arch, w.source)
    try:
        tensors = to_hf_arch({k: v for k, v in w.state.items()}, arch)
    except ValueError as e:
        raise ConvertError(f"{w.source}: {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.float() for k, v in tensors.items()}, out / "model.safetensors",
                      metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    files = ["config.json", "model.safetensors"]
    spm = tokenizer_model or (next(iter(sorted(Path(w.tokenizer_dir).glob("*.model"))), None)
                              if w.tokenizer_dir else None)
    if spm is not None:
        files += save_hf_tokenizer(spm, out, w.model["max_position_embeddings"])
    (out / "convert_report.json").write_text(json.dumps({**w.report, "hf_arch": arch, "files": files},
                                                        indent=1, default=str) + "\n")
    return out


def load_hf(d: str | Path) -> Weights:
    """An HF BERT directory, or an ELECTRA pair (:mod:`megamlm.convert.hf_electra`) → megamlm weights (heads it
    lacks listed in ``report['initialise']``)."""
    from megamlm.convert.hf_electra import is_hf_electra_dir, load_hf_electra

    d = Path(d)
    if is_hf_electra_dir(d):
        return load_hf_electra(d)
    cfg_file = d / "config.json"
    try:
        c = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{cfg_file}: cannot read ({e})") from None
    archs = c.get("architectures") or []
    if c.get("model_type") == "electra":
        raise ConvertError(f"{cfg_file}: one ELECTRA model; megamlm reads the pair an ELECTRA export writes: a "
                           f"folder with discriminator/ (ElectraForPreTraining) and generator/ (ElectraForMaskedLM)")
    if c.get("model_type") != "bert" or (archs and not set(archs) & set(HF_ARCHS)):
        raise ConvertError(f"{cfg_file}: model_type={c.get('model_type')!r}, architectures={archs}: not a BERT "
                           f"model megamlm converts ({', '.join(HF_ARCHS)})")
    problems = []
    if c.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={c['position_embedding_type']!r} (only 'absolute')")
    if c.get("hidden_act", "gelu") not in ACT_FROM_HF:
        problems.append(f"hidden_act={c.get('hidden_act')!r} (only {', '.join(ACT_FROM_HF)})")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        problems.append("a decoder / cross-attention BERT")
    if problems:
        raise ConvertError(f"{cfg_file}: unsupported: " + "; ".join(problems))
    model = {"vocab_size": 0, "hidden_size": c["hidden_size"], "num_layers": c["num_hidden_layers"],
             "num_heads": c["num_attention_heads"], "ffn_size": c["intermediate_size"],
             "max_position_embeddings": c["max_position_embeddings"], "type_vocab_size": c.get("type_vocab_size", 2),
             "dropout": c.get("hidden_dropout_prob", 0.1), "attention_dropout": c.get("attention_probs_dropout_prob", 0.1),
             "layer_norm_eps": c.get("layer_norm_eps", 1e-12), "norm_position": "post",
             "activation": ACT_FROM_HF[c.get("hidden_act", "gelu")], "init_std": c.get("initializer_range", 0.02)}
    hf_state, wfile = read_hf_weights(d)
    try:
        state, missing, unknown = from_hf_partial(hf_state, c["num_hidden_layers"])
    except ValueError as e:
        raise ConvertError(f"{wfile}: {e}") from None
    if unknown:
        raise ConvertError(f"{wfile}: {len(unknown)} key(s) the BERT key table does not know: "
                           f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    core = [k for k in missing if k.startswith("encoder.")]
    if core:
        raise ConvertError(f"{wfile}: encoder tensors missing: {', '.join(core[:8])}")
    pair = "nsp" if any(k.startswith("pair_head.") for k in state) or "pair_head.pooler.weight" in missing else "none"
    # what a pretraining model needs but the file lacks: kept at their fresh initialisation by --init-from
    initialise = [k for k in missing if pair != "none" or not k.startswith("pair_head.")]
    vocab = int(c["vocab_size"])
    exp = expected_shapes(model, pair, vocab, vocab)
    present = {k: v for k, v in state.items()}
    check_state({**present, **{k: torch.empty(exp[k], device="meta") for k in initialise}}, exp, wfile)
    dropped = sorted(k for k in hf_state if k in HF_BUFFERS or k.split(".", 1)[-1] in
                     {b.split(".", 1)[-1] for b in HF_BUFFERS})
    arch = archs[0] if archs else "?"
    w = Weights({k: v.float() for k, v in present.items()}, model, pair, vocab, None, None, str(d))
    retie(w.state)
    w.report = {"source": str(d), "hf_arch": arch, "weights": wfile, "initialise": initialise,
                "dropped_buffers": dropped, "real_vocab_size": vocab}
    return w


def complete_heads(w: Weights, seed: int = 0) -> Weights:
    """Fill the heads an HF file lacks with megamlm's initialisation (for an export that
    ``pretrain --init-from`` and ``--to hf`` can use as a whole model); they are named in the report."""
    from megamlm.config import ModelConfig
    from megamlm.model import build_model

    missing = w.report.get("initialise") or []
    if not missing:
        return w
    mc = ModelConfig(**{k: v for k, v in w.model.items() if k in ModelConfig.__dataclass_fields__})
    torch.manual_seed(seed)
    fresh = build_model(mc, objective_config(w.pair, w.objective), w.real_vocab_size, w.real_vocab_size).state_dict()
    state = dict(w.state)
    for k in missing:
        state[k] = fresh[k].clone()
    retie(state)
    check_state(state, {k: tuple(v.shape) for k, v in fresh.items()}, w.source)
    out = Weights(state, w.model, w.pair, w.real_vocab_size, w.config_yaml, w.tokenizer_dir, w.source,
                  {**w.report, "initialised": missing}, w.objective)
    return out

