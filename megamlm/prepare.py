"""Corpus preparation from a config: the tokenizer, then the shards (the first two stages of the flow)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from megamlm.config import Config
from megamlm.data.corpus import ReadStats, iter_documents, split_document

log = logging.getLogger(__name__)


def iter_sentences(data_cfg, stats: ReadStats | None = None) -> Iterator[str]:
    for doc in iter_documents(data_cfg.source, list(data_cfg.inputs), text_field=data_cfg.text_field,
                              encoding_errors=data_cfg.encoding_errors, stats=stats):
        yield from split_document(doc.text, data_cfg.sentences)


def train_tokenizer_from_config(cfg: Config, overwrite: bool = False):
    from megamlm.tokenizer import train_tokenizer

    t = cfg.tokenizer
    stats = ReadStats()
    tok = train_tokenizer(
        iter_sentences(cfg.data, stats), t.model, vocab_size=t.vocab_size, model_type=t.model_type,
        character_coverage=t.character_coverage, input_sentence_size=t.input_sentence_size,
        pad_multiple=t.pad_vocab_to_multiple, threads=t.threads, seed=t.seed, overwrite=overwrite,
        provenance={"source": cfg.data.source, "inputs": list(cfg.data.inputs), "sentences": cfg.data.sentences},
    )
    log.info("tokenizer corpus: %d file(s), %d documents, %.1f MB", stats.files, stats.documents, stats.bytes / 1e6)
    return tok


def prepare_corpus(cfg: Config, progress: bool = True) -> dict:
    """Make what is missing: the tokenizer, then the shards. Existing ones are reused when consistent."""
    from megamlm.data.shards import MANIFEST, load_manifest, make_shards
    from megamlm.tokenizer import Tokenizer

    if Path(cfg.tokenizer.model).is_file():
        tok = Tokenizer(cfg.tokenizer.model)
        log.info("reusing tokenizer %s", tok)
    else:
        tok = train_tokenizer_from_config(cfg)
    if Path(cfg.data.shards_dir).is_dir():
        from megamlm.data.outdir import recover

        recover(cfg.data.shards_dir)  # an interrupted make-shards: finish its swap (or clear it) first
    if (Path(cfg.data.shards_dir) / MANIFEST).is_file():
        man = load_manifest(cfg.data.shards_dir)
        man.check_tokenizer(tok)
        log.info("reusing shards in %s", cfg.data.shards_dir)
        return man.raw
    return make_shards(cfg.data, tok.path, progress=progress)
