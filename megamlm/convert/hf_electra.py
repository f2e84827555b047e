"""megamlm ELECTRA weights ↔ a Hugging Face ELECTRA pair of directories: ``discriminator/``
(``ElectraForPreTraining``, or ``ElectraModel`` with ``--hf-arch``) and ``generator/`` (``ElectraForMaskedLM``),
each with its config.json, model.safetensors and the tokenizer files, as Google's released ELECTRA models come.

The generator's config has ``embedding_size`` = the discriminator's width (the shared embeddings) and
``hidden_size`` = its own; the key tables are megamlm/model/hf_electra.py. Import reads such a pair back (the
embeddings of the two must be equal) into the ELECTRA model whose ``objective`` keys reproduce the
generator's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megamlm.convert.weights import ACT_FROM_HF, ACT_TO_HF, Weights, check_state, expected_shapes, read_hf_weights, retie
from megamlm.convert.zero import ConvertError
from megamlm.model.hf_electra import electra_from_hf, electra_to_hf

__all__ = ["ELECTRA_PARTS", "is_hf_electra_dir", "electra_hf_configs", "save_hf_electra", "load_hf_electra"]

ELECTRA_PARTS = ("discriminator", "generator")
DISC_ARCHS = ("ElectraForPreTraining", "ElectraModel")


def is_hf_electra_dir(p: Path) -> bool:
    return all((p / part / "config.json").is_file() for part in ELECTRA_PARTS)


def _hf_act(m: dict, source: str) -> str:
    if m.get("norm_position", "post") != "post":
        raise ConvertError(f"{source}: model.norm_position={m['norm_position']!r}: HF ELECTRA is post-LN only")
    return ACT_TO_HF[m.get("activation", "gelu")]


def electra_hf_configs(w: Weights, arch: str) -> tuple[dict, dict]:
    """config.json of the discriminator (``arch``) and of the generator (``ElectraForMaskedLM``)."""
    from megamlm.convert.weights import objective_config

    m = w.model
    width, layers, heads, ffn = objective_config("none", w.objective).generator_shape(m["hidden_size"], m["num_layers"])
    common = {"model_type": "electra", "vocab_size": w.real_vocab_size, "embedding_size": m["hidden_size"],
              "hidden_act": _hf_act(m, w.source), "hidden_dropout_prob": m.get("dropout", 0.1),
              "attention_probs_dropout_prob": m.get("attention_dropout", 0.1),
              "max_position_embeddings": m["max_position_embeddings"], "type_vocab_size": m["type_vocab_size"],
              "initializer_range": m.get("init_std", 0.02), "layer_norm_eps": m.get("layer_norm_eps", 1e-12),
              "pad_token_id": 0, "position_embedding_type": "absolute", "tie_word_embeddings": True, "dtype": "float32"}
    disc = {"architectures": [arch], **common, "hidden_size": m["hidden_size"], "num_hidden_layers": m["num_layers"],
            "num_attention_heads": m["num_heads"], "intermediate_size": m["ffn_size"]}
    gen = {"architectures": ["ElectraForMaskedLM"], **common, "hidden_size": width, "num_hidden_layers": layers,
           "num_attention_heads": heads, "intermediate_size": ffn}
    return disc, gen


def save_hf_electra(w: Weights, out: Path, arch: str | None, tokenizer_model: Path | None) -> Path:
    """Write ``out/discriminator`` and ``out/generator`` (config.json, model.safetensors, tokenizer files) and
    ``out/convert_report.json``."""
    from megamlm.convert.hf_tokenizer import save_hf_tokenizer
    from megamlm.convert.safetensors_io import write_safetensors

    arch = arch or "ElectraForPreTraining"
    if arch not in DISC_ARCHS:
        raise ConvertError(f"{w.source} is an ELECTRA checkpoint (objective.name=electra): --hf-arch {arch!r} has no "
                           f"place for its generator and discriminator head; choose {' or '.join(DISC_ARCHS)} (the "
                           f"generator is written as ElectraForMaskedLM beside it)")
    disc_cfg, gen_cfg = electra_hf_configs(w, arch)
    try:
        disc, gen = electra_to_hf(w.state)
    except ValueError as e:
        raise ConvertError(f"{w.source}: {e}") from None
    if arch == "ElectraModel":
        disc = {k[len("electra."):]: v for k, v in disc.items() if k.startswith("electra.")}
    spm = tokenizer_model or (next(iter(sorted(Path(w.tokenizer_dir).glob("*.model"))), None)
                              if w.tokenizer_dir else None)
    files = {}
    for part, cfg, tensors in (("discriminator", disc_cfg, disc), ("generator", gen_cfg, gen)):
        d = Path(out) / part
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors({k: v.float() for k, v in tensors.items()}, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        files[part] = ["config.json", "model.safetensors"]
        if spm is not None:
            files[part] += save_hf_tokenizer(spm, d, w.model["max_position_embeddings"])
    (Path(out) / "convert_report.json").write_text(json.dumps(
        {**w.report, "hf_arch": {"discriminator": arch, "generator": "ElectraForMaskedLM"}, "files": files},
        indent=1, default=str) + "\n")
    return Path(out)


def _read_config(d: Path, allowed: tuple[str, ...]) -> dict:
    f = d / "config.json"
    try:
        c = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{f}: cannot read ({e})") from None
    archs = c.get("architectures") or []
    if c.get("model_type") != "electra" or (archs and not set(archs) & set(allowed)):
        raise ConvertError(f"{f}: model_type={c.get('model_type')!r}, architectures={archs}: expected an ELECTRA "
                           f"{' / '.join(allowed)}")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{f}: position_embedding_type={c['position_embedding_type']!r} (only 'absolute')")
    return c


def load_hf_electra(d: Path) -> Weights:
    """An HF ELECTRA pair (``d/discriminator``, ``d/generator``) → megamlm ELECTRA weights."""
    dc = _read_config(d / "discriminator", DISC_ARCHS)
    gc = _read_config(d / "generator", ("ElectraForMaskedLM",))
    H = dc["hidden_size"]
    problems = [f"{k}: discriminator {dc.get(k)!r}, generator {gc.get(k)!r}" for k in
                ("vocab_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps") if dc.get(k) != gc.get(k)]
    for name, c in (("discriminator", dc), ("generator", gc)):
        if c.get("embedding_size", c["hidden_size"]) != H:
            problems.append(f"{name} embedding_size={c.get('embedding_size')} differs from the discriminator's "
                            f"hidden_size={H} (megamlm's ELECTRA embeds at the discriminator's width)")
    if dc.get("hidden_act", "gelu") not in ACT_FROM_HF:
        problems.append(f"hidden_act={dc.get('hidden_act')!r} (only {', '.join(ACT_FROM_HF)})")
    if problems:
        raise ConvertError(f"{d}: unsupported ELECTRA pair: " + "; ".join(problems))
    model = {"vocab_size": 0, "hidden_size": H, "num_layers": dc["num_hidden_layers"],
             "num_heads": dc["num_attention_heads"], "ffn_size": dc["intermediate_size"],
             "max_position_embeddings": dc["max_position_embeddings"], "type_vocab_size": dc.get("type_vocab_size", 2),
             "dropout": dc.get("hidden_dropout_prob", 0.1), "attention_dropout": dc.get("attention_probs_dropout_prob", 0.1),
             "layer_norm_eps": dc.get("layer_norm_eps", 1e-12), "norm_position": "post",
             "activation": ACT_FROM_HF[dc.get("hidden_act", "gelu")], "init_std": dc.get("initializer_range", 0.02)}
    objective = {"name": "electra", "pair": "none", "generator_hidden_fraction": gc["hidden_size"] / H,
                 "generator_layers": gc["num_hidden_layers"], "generator_heads": gc["num_attention_heads"],
                 "generator_ffn_size": gc["intermediate_size"]}
    disc_state, dfile = read_hf_weights(d / "discriminator")
    gen_state, gfile = read_hf_weights(d / "generator")
    if not any(k.startswith("discriminator_predictions.") for k in disc_state):  # an ElectraModel
        disc_state = {f"electra.{k}": v for k, v in disc_state.items()}
    try:
        state = electra_from_hf(disc_state, gen_state)
    except ValueError as e:
        raise ConvertError(f"{d}: {e}") from None
    vocab = int(dc["vocab_size"])
    retie(state)
    exp = expected_shapes(model, "none", vocab, vocab, objective)
    missing = sorted(set(exp) - set(state))
    initialise = [k for k in missing if k.startswith("disc_head.")]  # an ElectraModel has no head
    check_state({**state, **{k: torch.empty(exp[k], device="meta") for k in initialise}}, exp, str(d))
    w = Weights({k: v.float() for k, v in state.items()}, model, "none", vocab, None, None, str(d),
                objective=objective)
    w.report = {"source": str(d), "hf_arch": {"discriminator": (dc.get("architectures") or ["?"])[0],
                                              "generator": "ElectraForMaskedLM"},
                "weights": [dfile, gfile], "initialise": initialise, "real_vocab_size": vocab}
    return w
