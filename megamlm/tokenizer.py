"""SentencePiece tokenizer: training, loading, and the special ids every later stage relies on.

Fixed ids (documented in the README; never produced by encoding text):

    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]

[CLS], [SEP] and [MASK] are SentencePiece *control* symbols, so a literal "[MASK]" in the text is
encoded as ordinary characters. The normaliser is the identity and whitespace is kept, with byte
fallback, so decode(encode(text)) == text for ordinary text. The model's vocabulary is padded up to a
multiple of ``pad_vocab_to_multiple``; padding ids exist only as embedding rows and are never targets.

A sidecar ``<model>.json`` beside ``<model>.model`` records the special ids, the sizes, the training
settings and the model file's sha256, so a tokenizer directory describes itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megamlm.errors import MegamlmError

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_IDS = {PAD: 0, UNK: 1, CLS: 2, SEP: 3, MASK: 4}
WORD_START = "\u2581"  # SentencePiece's "▁"
SIDECAR_FORMAT = "megamlm-tokenizer/1"


class TokenizerError(MegamlmError, ValueError):
    """A tokenizer file is missing, unreadable or inconsistent with its sidecar."""


def padded_size(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".json")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class SpecialIds:
    pad: int = 0
    unk: int = 1
    cls: int = 2
    sep: int = 3
    mask: int = 4


class Tokenizer:
    """A loaded SentencePiece model plus the facts the data and model stages need."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model {str(self.path)!r} does not exist "
                                 "(train one with `megamlm train-tokenizer CONFIG`)")
        side = sidecar_path(self.path)
        if not side.is_file():
            raise TokenizerError(f"tokenizer sidecar {str(side)!r} is missing; it is written by "
                                 "`megamlm train-tokenizer` beside the .model file")
        try:
            self.meta = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"tokenizer sidecar {str(side)!r} is not valid JSON: {e}") from None
        if self.meta.get("format") != SIDECAR_FORMAT:
            raise TokenizerError(f"{str(side)!r}: format {self.meta.get('format')!r}, expected {SIDECAR_FORMAT!r}")
        self.sha256 = file_sha256(self.path)
        if self.meta.get("sha256") != self.sha256:
            raise TokenizerError(f"{str(self.path)!r} does not match its sidecar (sha256 {self.sha256[:12]} vs "
                                 f"{str(self.meta.get('sha256'))[:12]}): the model file was replaced")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = int(self.sp.get_piece_size())
        self.padded_vocab_size = int(self.meta["padded_vocab_size"])
        s = self.meta["special_ids"]
        self.special = SpecialIds(pad=s[PAD], unk=s[UNK], cls=s[CLS], sep=s[SEP], mask=s[MASK])
        for name, i in s.items():
            if self.sp.id_to_piece(i) != name:
                raise TokenizerError(f"{str(self.path)!r}: id {i} is {self.sp.id_to_piece(i)!r}, sidecar says {name!r}")
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self._pieces = pieces
        # word_start[i]: piece i begins a new word ("▁..."); special, byte and padding ids are False.
        ws = np.zeros(self.padded_vocab_size, dtype=bool)
        ws[: self.vocab_size] = [p.startswith(WORD_START) for p in pieces]
        is_special = np.zeros(self.padded_vocab_size, dtype=bool)
        is_special[[self.special.pad, self.special.cls, self.special.sep, self.special.mask]] = True
        is_special[self.vocab_size:] = True  # padding rows
        ws &= ~is_special
        self.word_start = ws
        self.special_mask = is_special
        # Ids a "random token" replacement may draw: every real piece but the control/pad/unk ids.
        cand = np.ones(self.vocab_size, dtype=bool)
        cand[[self.special.pad, self.special.unk, self.special.cls, self.special.sep, self.special.mask]] = False
        self.random_candidates = np.flatnonzero(cand).astype(np.int64)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text; ``num_threads`` of SentencePiece's own pool (-1: all cores; 1 in
        processes that are themselves one of several workers, so cores are not oversubscribed)."""
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i] if i < self.vocab_size else f"<pad-row-{i}>"

    def identity(self) -> dict:
        """What a shard manifest records to tie itself to this tokenizer."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size,
                "padded_vocab_size": self.padded_vocab_size, "special_ids": dict(self.meta["special_ids"]),
                "model_type": self.meta.get("model_type")}

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab={self.vocab_size}, padded={self.padded_vocab_size}, "
                f"sha256={self.sha256[:12]})")


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    return Tokenizer(model_path)


def _sample_sentences(sentences: Iterator[str], limit: int, seed: int) -> tuple[list[str], int]:
    """Reservoir-sample ``limit`` sentences (all when limit is 0); returns them and the count seen."""
    rng = random.Random(seed)
    out: list[str] = []
    n = 0
    for s in sentences:
        n += 1
        if not limit or len(out) < limit:
            out.append(s)
        else:
            j = rng.randrange(n)
            if j < limit:
                out[j] = s
    return out, n


def train_tokenizer(sentences: Iterable[str], model_path: str | Path, *, vocab_size: int, model_type: str,
                    character_coverage: float = 0.9995, input_sentence_size: int = 0, pad_multiple: int = 128,
                    threads: int = 0, seed: int = 1234, provenance: dict | None = None,
                    overwrite: bool = False) -> Tokenizer:
    """Train a SentencePiece model on ``sentences`` and write ``model_path`` plus its sidecar.

    The files are written under temporary names and renamed at the end, so an interrupted run never
    leaves a model without its sidecar.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise TokenizerError(f"tokenizer model path {str(model_path)!r} must end in .model")
    if model_path.exists() and not overwrite:
        raise TokenizerError(f"{str(model_path)!r} already exists; pass --overwrite to replace it")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sample, seen = _sample_sentences(iter(sentences), input_sentence_size, seed)
    sample = [s for s in sample if s.strip()]
    if not sample:
        raise TokenizerError("no text to train the tokenizer on: the corpus is empty")
    n_special = len(SPECIAL_IDS)
    if vocab_size <= n_special + 256:
        raise TokenizerError(f"tokenizer.vocab_size={vocab_size} is too small: byte fallback needs 256 pieces "
                             f"plus {n_special} special tokens; use at least {n_special + 256 + 64}")
    prefix = model_path.parent / f".{model_path.stem}.tmp-{os.getpid()}"
    _run_trainer(sample, prefix, vocab_size=vocab_size, model_type=model_type,
                 character_coverage=character_coverage, threads=threads, seed=seed)
    tmp_model = Path(str(prefix) + ".model")
    tmp_vocab = Path(str(prefix) + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_model))
    for name, i in SPECIAL_IDS.items():
        if sp.id_to_piece(i) != name:  # pragma: no cover - guarded by the trainer arguments
            raise TokenizerError(f"trained model places {name} at {sp.piece_to_id(name)}, expected {i}")
    real = sp.get_piece_size()
    meta = {
        "format": SIDECAR_FORMAT,
        "sha256": file_sha256(tmp_model),
        "vocab_size": real,
        "padded_vocab_size": padded_size(real, pad_multiple),
        "pad_vocab_to_multiple": pad_multiple,
        "special_ids": dict(SPECIAL_IDS),
        "model_type": model_type,
        "settings": {"character_coverage": character_coverage, "normalization_rule_name": "identity",
                     "remove_extra_whitespaces": False, "byte_fallback": True, "split_digits": True,
                     "input_sentence_size": input_sentence_size, "seed": seed},
        "trained_on": {"sentences_seen": seen, "sentences_used": len(sample), **(provenance or {})},
        "sentencepiece_version": getattr(spm, "__version__", "unknown"),
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    side_tmp = Path(str(prefix) + ".json")
    side_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_vocab, model_path.with_suffix(".vocab"))
    os.replace(tmp_model, model_path)
    os.replace(side_tmp, sidecar_path(model_path))
    log.info("trained %s tokenizer: %d pieces (padded to %d) on %d of %d sentences in %.1fs -> %s",
             model_type, real, meta["padded_vocab_size"], len(sample), seen, meta["train_seconds"], model_path)
    return Tokenizer(model_path)


def _run_trainer(sample: list[str], prefix: Path, *, vocab_size: int, model_type: str, character_coverage: float,
                 threads: int, seed: int) -> None:
    """SentencePiece's trainer on ``sample`` into ``prefix``.model / .vocab with megamlm's fixed settings
    (special ids, byte fallback, identity normalisation, split digits); TokenizerError on failure, with
    the partial files removed."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=SPECIAL_IDS[PAD], pad_piece=PAD,
            unk_id=SPECIAL_IDS[UNK], unk_piece=UNK,
            bos_id=-1, eos_id=-1,
            control_symbols=[CLS, SEP, MASK],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            split_digits=True,
            num_threads=threads or (os.cpu_count() or 1),
            input_sentence_size=0,
            max_sentence_length=1 << 16,
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        for suffix in (".model", ".vocab"):
            Path(str(prefix) + suffix).unlink(missing_ok=True)
        raise TokenizerError(f"SentencePiece training failed: {e}") from None
