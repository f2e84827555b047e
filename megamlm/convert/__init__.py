"""Offline checkpoint conversion (``megamlm convert``, ``tools/convert_checkpoint.py``).

    megamlm checkpoint (ZeRO 0-3, any vocab-parallel size, fp32/bf16) --to megamlm --> consolidated export
    megamlm checkpoint / export                                        --to hf     --> HF BERT directory
    HF BERT directory (BertForPreTraining / BertForMaskedLM / BertModel) --to megamlm --> export for
                                                                                   ``pretrain --init-from``

No process group, CPU only; the model shape comes from the source. See core.py (formats), zero.py
(ZeRO consolidation, safe loading), hf.py (HF directories), hf_tokenizer.py (SentencePiece → tokenizer.json).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from megamlm.convert.zero import ConvertError

__all__ = ["ConvertError", "convert", "main"]

log = logging.getLogger(__name__)


def convert(src: str | Path, out: str | Path, to: str, *, tag: str | None = None, hf_arch: str | None = None,
            tokenizer: str | Path | None = None) -> dict:
    """Convert ``src`` (any supported source) into ``out`` (``to`` = "megamlm" or "hf"); returns the report."""
    from megamlm.convert.core import load_any, save_export
    from megamlm.convert.hf import complete_heads, save_hf

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out}: output folder exists and is not empty")
    w = load_any(src, tag, lazy=to == "megamlm")  # the export streams ZeRO-3 tensors one at a time
    if w.report.get("initialise"):
        log.warning("%s lacks %d tensor(s), initialised fresh: %s", src, len(w.report["initialise"]),
                    ", ".join(w.report["initialise"]))
        w = complete_heads(w)
    if to not in ("megamlm", "hf"):
        raise ConvertError(f"--to {to!r}: choose 'megamlm' or 'hf'")
    # Written beside the output under a hidden name and renamed when whole: a failure (or a kill) part-way
    # never leaves a partial folder under the final name.
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if to == "megamlm":
            save_export(w, tmp)
        else:
            save_hf(w, tmp, hf_arch, Path(tokenizer) if tokenizer else None)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return w.report


def add_arguments(p) -> None:
    p.add_argument("source", help="megamlm checkpoint folder (with `latest`) or tag folder, megamlm export "
                   "(folder or .safetensors), or Hugging Face BERT directory")
    p.add_argument("output", help="output folder (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=("megamlm", "hf"),
                   help="megamlm: consolidated fp32 safetensors + config.yaml + tokenizer; hf: HF BERT directory")
    p.add_argument("--tag", default=None, help="checkpoint tag inside SOURCE (default: its `latest`)")
    p.add_argument("--hf-arch", default=None, choices=("BertForPreTraining", "BertForMaskedLM", "BertModel"),
                   help="HF class the weights file is written for (default: BertForPreTraining, "
                        "or BertForMaskedLM for a run without a pair head)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model for the HF tokenizer files "
                   "(default: the one saved in the checkpoint)")


def main(args) -> int:
    import json

    report = convert(args.source, args.output, args.to, tag=args.tag, hf_arch=args.hf_arch, tokenizer=args.tokenizer)
    print(f"converted {args.source} -> {args.output} ({args.to})")
    print(json.dumps(report, indent=1, default=str))
    return 0
