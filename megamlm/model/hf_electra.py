"""The megamlm ELECTRA ↔ Hugging Face key tables, as data: the discriminator as ``ElectraForPreTraining``,
the generator as ``ElectraForMaskedLM`` (with ``embedding_size`` = the discriminator's width, so that
``electra.embeddings_project`` is the generator's projection), and the two mappings.

The rows reuse the BERT table of :mod:`megamlm.model.hf_keys` (same embeddings and blocks; Hugging Face's
ELECTRA names them ``electra.`` where BERT says ``bert.``). The two HF models share megamlm's embeddings:
both files get a copy, and on import the copies must be equal (a generator trained apart from its
discriminator's embeddings is not this model).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megamlm.model.hf_keys import EMBEDDING_KEYS, LAYER_KEYS

__all__ = ["DISC_HEAD_KEYS", "GEN_HEAD_KEYS", "ELECTRA_ARCHS", "electra_tables", "electra_to_hf", "electra_from_hf",
           "is_electra_state"]

DISC_HEAD_KEYS = [
    ("disc_head.dense.weight", "discriminator_predictions.dense.weight"),
    ("disc_head.dense.bias", "discriminator_predictions.dense.bias"),
    ("disc_head.dense_prediction.weight", "discriminator_predictions.dense_prediction.weight"),
    ("disc_head.dense_prediction.bias", "discriminator_predictions.dense_prediction.bias"),
]
GEN_HEAD_KEYS = [
    ("generator.mlm_head.dense.weight", "generator_predictions.dense.weight"),
    ("generator.mlm_head.dense.bias", "generator_predictions.dense.bias"),
    ("generator.mlm_head.norm.weight", "generator_predictions.LayerNorm.weight"),
    ("generator.mlm_head.norm.bias", "generator_predictions.LayerNorm.bias"),
    ("generator.mlm_head.decoder.bias", "generator_lm_head.bias"),
]
GEN_PROJECT_KEYS = [("generator.project.weight", "electra.embeddings_project.weight"),
                    ("generator.project.bias", "electra.embeddings_project.bias")]
WORD = "encoder.embeddings.word_embeddings.weight"
#: megamlm aliases of one tensor (not saved apart); the HF generator's decoder weight is tied the same way
TIED_ELECTRA = {"generator.mlm_head.decoder.weight": WORD}
HF_GEN_TIED = {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}
#: what the export writes: HF class → the file's megamlm part
ELECTRA_ARCHS = ("ElectraForPreTraining", "ElectraModel", "ElectraForMaskedLM")


def _hf(key: str) -> str:
    return key.replace("bert.", "electra.", 1)


def _layers(n: int, megamlm_prefix: str) -> list[tuple[str, tuple[str, ...]]]:
    rows = []
    for i in range(n):
        rows += [(megamlm_prefix + m.format(i=i)[len("encoder."):], tuple(_hf(h.format(i=i)) for h in hs))
                 for m, hs in LAYER_KEYS]
    return rows


def electra_tables(disc_layers: int, gen_layers: int, project: bool):
    """(discriminator rows, generator rows): ``(megamlm key, HF keys)`` as in :func:`megamlm.model.hf_keys.key_table`."""
    embeddings = [(m, tuple(_hf(h) for h in hs)) for m, hs in EMBEDDING_KEYS]
    disc = embeddings + _layers(disc_layers, "encoder.") + [(m, (h,)) for m, h in DISC_HEAD_KEYS]
    gen = embeddings + ([(m, (h,)) for m, h in GEN_PROJECT_KEYS] if project else [])
    gen += _layers(gen_layers, "generator.encoder.") + [(m, (h,)) for m, h in GEN_HEAD_KEYS]
    return disc, gen


def is_electra_state(state: Mapping) -> bool:
    """Whether a megamlm state dict is an ELECTRA model's (it has a discriminator head)."""
    return "disc_head.dense.weight" in state


def _count(keys, prefix: str) -> int:
    marker = ".attn.qkv.weight" if not prefix.startswith("electra") else ".attention.self.query.weight"
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix) and marker in k}
    return max(idx) + 1 if idx else 0


def _tables_of(state: Mapping):
    return electra_tables(_count(state, "encoder.layers."), _count(state, "generator.encoder.layers."),
                          "generator.project.weight" in state)


def electra_to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """megamlm ELECTRA state dict → (``ElectraForPreTraining`` state dict, ``ElectraForMaskedLM`` state dict),
    the generator's tied decoder weight left out (as HF saves it). ``ElectraModel``: the first without
    ``discriminator_predictions.`` and ``electra.``."""
    disc_rows, gen_rows = _tables_of(state)
    known = {m for m, _ in disc_rows + gen_rows} | set(TIED_ELECTRA)
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} megamlm key(s) have no entry in the ELECTRA key table: {', '.join(unknown[:5])}")
    out = []
    for rows in (disc_rows, gen_rows):
        hf = {}
        for m, hs in rows:
            t = state[m]
            for h, part in zip(hs, t.chunk(len(hs), dim=0) if len(hs) > 1 else (t,)):
                hf[h] = part.clone()
        out.append(hf)
    return out[0], out[1]


def electra_from_hf(disc: Mapping[str, torch.Tensor], gen: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(``ElectraForPreTraining`` state dict, ``ElectraForMaskedLM`` state dict) → the megamlm ELECTRA state dict;
    the generator's copy of the embeddings must equal the discriminator's (ValueError naming the key)."""
    disc_rows, gen_rows = electra_tables(_count(disc, "electra.encoder.layer."), _count(gen, "electra.encoder.layer."),
                                         "electra.embeddings_project.weight" in gen)
    out: dict[str, torch.Tensor] = {}
    for rows, hf, what in ((disc_rows, disc, "ElectraForPreTraining"), (gen_rows, gen, "ElectraForMaskedLM")):
        optional = set(HF_GEN_TIED) | {"electra.embeddings.position_ids"}
        unknown = sorted(set(hf) - {h for _, hs in rows for h in hs} - optional)
        if unknown:
            raise ValueError(f"{what}: {len(unknown)} key(s) have no entry in the ELECTRA key table: "
                             f"{', '.join(unknown[:5])}")
        for m, hs in rows:
            missing = [h for h in hs if h not in hf]
            if missing:
                raise ValueError(f"{what} lacks {missing[0]} (needed for {m})")
            t = torch.cat([hf[h] for h in hs], dim=0) if len(hs) > 1 else hf[hs[0]].clone()
            if m in out and not torch.equal(out[m], t):
                raise ValueError(f"{what} has {hs[0]} different from the discriminator's: megamlm's ELECTRA shares "
                                 f"the embeddings between generator and discriminator")
            out[m] = t
    for h, src in HF_GEN_TIED.items():
        if h in gen and not torch.equal(gen[h], gen[src]):
            raise ValueError(f"ElectraForMaskedLM has {h} different from {src}: an untied generator decoder")
    for m, src in TIED_ELECTRA.items():
        out[m] = out[src]
    return out
