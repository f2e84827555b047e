"""A fine-tuned model → a Hugging Face directory: ``BertForSequenceClassification`` (sequence, pair joint;
the head's pooler is BERT's pooler) or ``BertForTokenClassification`` (token), with the label names in
config.json (``id2label`` / ``label2id``) and the tokenizer files. Pair ``concat`` and pooler-less
sequence heads have no HF class: refused with the reason.

The encoder goes through the key table of megamlm/model/hf_keys.py; the config through
megamlm.convert.hf's ``hf_config``, as for a pretrained model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from megamlm.errors import MegamlmError
from megamlm.convert import staged_output
from megamlm.convert.hf import hf_config
from megamlm.model.hf_keys import EMBEDDING_KEYS, LAYER_KEYS

log = logging.getLogger(__name__)

__all__ = ["ExportError", "export_hf", "hf_state"]


class ExportError(MegamlmError, ValueError):
    """A fine-tuned model that cannot be exported (its weights file, its task)."""


def hf_state(state: dict[str, torch.Tensor], num_layers: int, task_type: str) -> dict[str, torch.Tensor]:
    """FinetuneModel state dict → the HF classification model's state dict."""
    rows = list(EMBEDDING_KEYS) + [(m.format(i=i), tuple(h.format(i=i) for h in hs))
                                   for i in range(num_layers) for m, hs in LAYER_KEYS]
    out = {}
    for m, hs in rows:
        t = state[m]
        for h, chunk in zip(hs, t.chunk(len(hs), 0) if len(hs) > 1 else (t,)):
            out[h] = chunk.clone().contiguous()
    if task_type != "token":
        out["bert.pooler.dense.weight"] = state["head.pooler.weight"]
        out["bert.pooler.dense.bias"] = state["head.pooler.bias"]
    out["classifier.weight"] = state["head.classifier.weight"]
    out["classifier.bias"] = state["head.classifier.bias"]
    return out


def export_hf(best: str | Path, out: str | Path) -> Path:
    """``<output_dir>/best/model.pt`` (written by ``megamlm finetune``) → an HF directory ``out``."""
    from safetensors.torch import save_file

    best = Path(best)
    if not best.is_file():
        raise ExportError(f"{best} does not exist: run `megamlm finetune` first (it writes the best weights there)")
    ck = torch.load(best, map_location="cpu", weights_only=True)  # plain tensors, dicts, strings
    task, head, model, labels = ck["task"], ck["head"], ck["model"], ck["labels"]
    if model.get("norm_position", "post") != "post":
        raise ExportError("model.norm_position='pre' has no Hugging Face BERT equivalent")
    if task["type"] == "pair" and task["pair_mode"] == "concat":
        raise ExportError("task.pair_mode='concat' encodes A and B apart: no Hugging Face BERT class does that; "
                          "fine-tune with pair_mode=joint to export")
    if task["type"] != "token" and not head["pooler"]:
        raise ExportError("head.pooler=false: BertForSequenceClassification always applies its pooler; fine-tune "
                          "with head.pooler=true to export")
    arch = "BertForTokenClassification" if task["type"] == "token" else "BertForSequenceClassification"
    state = ck["state_dict"]
    vocab = state["encoder.embeddings.word_embeddings.weight"].shape[0]
    tensors = hf_state(state, model["num_layers"], task["type"])
    cfg = hf_config(model, vocab, arch, "fine-tuned model")
    cfg.update(id2label={str(i): n for i, n in enumerate(labels)}, label2id={n: i for i, n in enumerate(labels)},
               num_labels=len(labels), classifier_dropout=head["dropout"],
               problem_type="single_label_classification" if task["type"] != "token" else None)
    cfg.pop("tie_word_embeddings", None)
    if cfg["problem_type"] is None:
        cfg.pop("problem_type")
    out = Path(out)
    with staged_output(out) as tmp:  # a new folder, complete or absent: never a half-written export
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        tok = Path(ck.get("tokenizer") or "")
        if tok.is_file():
            from megamlm.convert.hf_tokenizer import save_hf_tokenizer

            try:
                save_hf_tokenizer(tok, tmp, model["max_position_embeddings"])
            except ImportError as e:  # its optional dependency absent: the weights and config still export
                log.warning("no HF tokenizer files written to %s: %s", out, e)
    return out
