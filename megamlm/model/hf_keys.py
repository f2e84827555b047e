"""The megamlm ↔ Hugging Face ``BertForPreTraining`` key table, as data, and the two mappings over it.

Each row is ``(megamlm key, HF keys)``; ``{i}`` is the layer index. One HF key is a rename; several HF
keys are concatenated along dim 0 into the megamlm tensor (the fused ``qkv`` = query; key; value) and
split back in equal parts. Tied tensors are listed apart: they are written on export and checked or
dropped on import. Pre-LN models (``encoder.final_norm``) have no HF BERT equivalent: the mappings
refuse keys that the table does not know rather than drop them.

Used by the parity tests and by the checkpoint conversion tool (``convert.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EMBEDDING_KEYS", "LAYER_KEYS", "MLM_HEAD_KEYS", "PAIR_HEAD_KEYS", "TIED_MEGAMLM", "TIED_HF",
           "HF_ARCHS", "HF_ARCH_DROPS", "HF_BUFFERS", "key_table", "to_hf", "from_hf", "map_grads_to_hf",
           "to_hf_arch", "hf_with_prefix", "from_hf_partial"]

EMBEDDING_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("encoder.embeddings.word_embeddings.weight", ("bert.embeddings.word_embeddings.weight",)),
    ("encoder.embeddings.position_embeddings.weight", ("bert.embeddings.position_embeddings.weight",)),
    ("encoder.embeddings.token_type_embeddings.weight", ("bert.embeddings.token_type_embeddings.weight",)),
    ("encoder.embeddings.norm.weight", ("bert.embeddings.LayerNorm.weight",)),
    ("encoder.embeddings.norm.bias", ("bert.embeddings.LayerNorm.bias",)),
]

_HF_LAYER = "bert.encoder.layer.{i}"
LAYER_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("encoder.layers.{i}.attn.qkv.weight", tuple(f"{_HF_LAYER}.attention.self.{n}.weight"
                                                 for n in ("query", "key", "value"))),
    ("encoder.layers.{i}.attn.qkv.bias", tuple(f"{_HF_LAYER}.attention.self.{n}.bias"
                                               for n in ("query", "key", "value"))),
    ("encoder.layers.{i}.attn.out.weight", (f"{_HF_LAYER}.attention.output.dense.weight",)),
    ("encoder.layers.{i}.attn.out.bias", (f"{_HF_LAYER}.attention.output.dense.bias",)),
    ("encoder.layers.{i}.attn_norm.weight", (f"{_HF_LAYER}.attention.output.LayerNorm.weight",)),
    ("encoder.layers.{i}.attn_norm.bias", (f"{_HF_LAYER}.attention.output.LayerNorm.bias",)),
    ("encoder.layers.{i}.ffn.up.weight", (f"{_HF_LAYER}.intermediate.dense.weight",)),
    ("encoder.layers.{i}.ffn.up.bias", (f"{_HF_LAYER}.intermediate.dense.bias",)),
    ("encoder.layers.{i}.ffn.down.weight", (f"{_HF_LAYER}.output.dense.weight",)),
    ("encoder.layers.{i}.ffn.down.bias", (f"{_HF_LAYER}.output.dense.bias",)),
    ("encoder.layers.{i}.ffn_norm.weight", (f"{_HF_LAYER}.output.LayerNorm.weight",)),
    ("encoder.layers.{i}.ffn_norm.bias", (f"{_HF_LAYER}.output.LayerNorm.bias",)),
]

MLM_HEAD_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("mlm_head.dense.weight", ("cls.predictions.transform.dense.weight",)),
    ("mlm_head.dense.bias", ("cls.predictions.transform.dense.bias",)),
    ("mlm_head.norm.weight", ("cls.predictions.transform.LayerNorm.weight",)),
    ("mlm_head.norm.bias", ("cls.predictions.transform.LayerNorm.bias",)),
    ("mlm_head.decoder.bias", ("cls.predictions.bias",)),
]

PAIR_HEAD_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("pair_head.pooler.weight", ("bert.pooler.dense.weight",)),
    ("pair_head.pooler.bias", ("bert.pooler.dense.bias",)),
    ("pair_head.classifier.weight", ("cls.seq_relationship.weight",)),
    ("pair_head.classifier.bias", ("cls.seq_relationship.bias",)),
]

# tied key → the key it is tied to (same tensor)
TIED_MEGAMLM: dict[str, str] = {"mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}
TIED_HF: dict[str, str] = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                           "cls.predictions.decoder.bias": "cls.predictions.bias"}


def key_table(num_layers: int, pair: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """The table expanded for ``num_layers`` blocks (with the pooler / pair classifier if ``pair``)."""
    rows = list(EMBEDDING_KEYS)
    for i in range(num_layers):
        rows += [(m.format(i=i), tuple(h.format(i=i) for h in hs)) for m, hs in LAYER_KEYS]
    rows += MLM_HEAD_KEYS
    if pair:
        rows += PAIR_HEAD_KEYS
    return rows


def _num_layers(keys, prefix: str, marker: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix) and marker in k}
    return max(idx) + 1 if idx else 0


def _check_unknown(state: Mapping, known: set[str], what: str) -> None:
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} {what} key(s) have no entry in the HF key table: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")


def to_hf(state: Mapping[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """megamlm state dict → HF ``BertForPreTraining`` state dict (tied HF keys included if ``tied``)."""
    n = _num_layers(state, "encoder.layers.", ".attn.qkv.weight")
    pair = "pair_head.pooler.weight" in state
    table = key_table(n, pair)
    _check_unknown(state, {m for m, _ in table} | set(TIED_MEGAMLM), "megamlm")
    out: dict[str, torch.Tensor] = {}
    for m, hs in table:
        t = state[m]
        chunks = t.chunk(len(hs), dim=0) if len(hs) > 1 else (t,)
        for h, p in zip(hs, chunks):
            out[h] = p.clone()
    if tied:
        for h, src in TIED_HF.items():
            out[h] = out[src]
    return out


def from_hf(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``BertForPreTraining`` state dict → megamlm state dict (tied keys filled in)."""
    n = _num_layers(hf_state, "bert.encoder.layer.", ".attention.self.query.weight")
    pair = "cls.seq_relationship.weight" in hf_state
    table = key_table(n, pair)
    optional = set(TIED_HF) | {"bert.embeddings.position_ids"}
    _check_unknown(hf_state, {h for _, hs in table for h in hs} | optional, "HF")
    out: dict[str, torch.Tensor] = {}
    for m, hs in table:
        missing = [h for h in hs if h not in hf_state]
        if missing:
            raise ValueError(f"HF state dict lacks {missing[0]} (needed for {m})")
        out[m] = torch.cat([hf_state[h] for h in hs], dim=0) if len(hs) > 1 else hf_state[hs[0]].clone()
    for m, src in TIED_MEGAMLM.items():
        out[m] = out[src]
    return out


def map_grads_to_hf(named_grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients by megamlm parameter name → by HF parameter name (tied grads appear once, as in
    ``named_parameters``)."""
    return to_hf({k: v for k, v in named_grads.items() if k not in TIED_MEGAMLM}, tied=False)


# ---------------------------------------------------------------------------------------------------
# The three HF BERT classes a conversion writes or reads. Each is the BertForPreTraining layout (above)
# minus some prefixes; BertModel also has no "bert." in front of its keys.
HF_ARCHS = ("BertForPreTraining", "BertForMaskedLM", "BertModel")
HF_ARCH_DROPS: dict[str, tuple[str, ...]] = {
    "BertForPreTraining": (),
    "BertForMaskedLM": ("bert.pooler.", "cls.seq_relationship."),
    "BertModel": ("cls.",),
}
HF_BASE_PREFIX = "bert."
# non-persistent buffers older transformers versions saved: read and dropped (reported), never mapped
HF_BUFFERS = ("bert.embeddings.position_ids",)


def to_hf_arch(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """megamlm state dict → the state dict of HF ``arch`` (tied decoder weight left out, as HF saves it)."""
    if arch not in HF_ARCHS:
        raise ValueError(f"unknown HF architecture {arch!r}; choose one of {', '.join(HF_ARCHS)}")
    out = {k: v for k, v in to_hf(state, tied=False).items() if not k.startswith(HF_ARCH_DROPS[arch])}
    if arch == "BertModel":
        out = {k[len(HF_BASE_PREFIX):]: v for k, v in out.items()}
    return out


def hf_with_prefix(hf_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Keys of a BertModel checkpoint (no "bert." prefix) given the BertForPreTraining prefix; returns
    (state, whether it was a bare BertModel)."""
    bare = not any(k.startswith((HF_BASE_PREFIX, "cls.")) for k in hf_state)
    if not bare:
        return dict(hf_state), False
    return {HF_BASE_PREFIX + k: v for k, v in hf_state.items()}, True


def from_hf_partial(hf_state: Mapping[str, torch.Tensor], num_layers: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Any of the three HF layouts → (megamlm state dict, megamlm keys absent from the checkpoint,
    HF keys the table does not know). A table row is mapped whole or reported missing whole; a row
    present in part (e.g. a query without its key) raises. Tied HF copies must equal their source."""
    hf, _ = hf_with_prefix(hf_state)
    n = _num_layers(hf, "bert.encoder.layer.", ".attention.self.query.weight") if num_layers is None else num_layers
    table = key_table(n, pair=True)
    known = {h for _, hs in table for h in hs} | set(TIED_HF) | set(HF_BUFFERS)
    unknown = sorted(set(hf) - known)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for m, hs in table:
        have = [h for h in hs if h in hf]
        if not have:
            missing.append(m)
            continue
        if len(have) != len(hs):
            raise ValueError(f"HF checkpoint has {have[0]} but lacks {sorted(set(hs) - set(have))[0]} (both needed "
                             f"for {m})")
        out[m] = torch.cat([hf[h] for h in hs], dim=0) if len(hs) > 1 else hf[hs[0]].clone()
    for h, src in TIED_HF.items():
        if h in hf and src in hf and not torch.equal(hf[h], hf[src]):
            raise ValueError(f"HF checkpoint has {h} different from {src}: an untied decoder, which megamlm's tied "
                             f"MLM head cannot represent")
    for m, src in TIED_MEGAMLM.items():
        if src in out:
            out[m] = out[src]
    return out, missing, unknown
