"""Shared, cached data fixtures for the data-stage tests: generated text, a small BPE SentencePiece model
and real WebDataset shards made by ``make_shards``.

Built once per process (``functools.cache``) in a temporary folder, so several test modules and the
spawned ranks of a distributed test reuse them; the text is generated here, no third-party text.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from megamlm.config import load_config

_ROOT = Path(tempfile.mkdtemp(prefix="megamlm-data-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor", "len", "mar", "tos",
              "bel", "fin", "gra", "hu", "jo", "wex", "yil"]


def fake_words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        words.append("".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), k)))
    return words


def fake_documents(n_docs: int, seed: int = 0) -> list[list[str]]:
    """Documents as lists of sentences: 1–9 sentences of 3–30 words (Zipf-ish word choice), and every
    25th document one long sentence of 150–300 words (longer than any test sequence)."""
    rng = np.random.default_rng(seed)
    vocab = fake_words(1500, seed + 1)
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    docs = []
    for d in range(n_docs):
        n_sent = int(rng.integers(1, 10))
        sents = []
        for _ in range(n_sent):
            n = int(rng.integers(150, 300)) if d % 25 == 7 else int(rng.integers(3, 31))
            ws = [vocab[int(i)] for i in rng.choice(len(vocab), n, p=weights)]
            sents.append(" ".join(ws).capitalize() + ".")
        docs.append(sents)
    return docs


@functools.cache
def tokenizer_path() -> Path:
    from megamlm.tokenizer import train_tokenizer

    sents = [s for d in fake_documents(600, seed=99) for s in d]
    path = _ROOT / "tok" / "spm.model"
    train_tokenizer(sents, path, vocab_size=600, model_type="bpe", pad_multiple=128, threads=1)
    return path


@functools.cache
def tokenizer():
    from megamlm.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path())


def data_config(shards_dir: Path, *overrides: str):
    return load_config(None, [f"data.shards_dir={shards_dir}", *overrides]).data


@functools.cache
def shards(name: str = "small", n_docs: int = 400, block_tokens: int = 1500, shard_mb: float = 0.05,
           seed: int = 0) -> Path:
    """A shard folder: ``n_docs`` generated documents (one sentence per line, blank line between
    documents), ~``block_tokens`` per block, a few train shards of unequal size, a val shard."""
    from megamlm.data.shards import make_shards

    folder = _ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n\n".join("\n".join(d) for d in fake_documents(n_docs, seed)) + "\n", encoding="utf-8")
    cfg = data_config(folder / "shards", "data.source=text", f"data.inputs=[{text}]", "data.sentences=lines",
                      f"data.shard_size_mb={shard_mb}", "data.val_fraction=0.05")
    make_shards(cfg, tokenizer_path(), workers=1, progress=False, block_tokens=block_tokens)
    return folder / "shards"


def objective(**kw):
    from megamlm.config import ObjectiveConfig

    return ObjectiveConfig(**kw)


def make_loader(shards_dir: Path, tok, pair="nsp", masking="token", seed=5, split="train", state=None, **data):
    """A single-process loader over ``shards_dir`` with :func:`loader_config`'s data section (+ ``data``)."""
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import single_process_topology

    return build_loader(loader_config(shards_dir, **data), tok, single_process_topology(), seed,
                        objective(pair=pair, masking=masking), split=split, state=state)


def loader_config(shards_dir: Path, **kw):
    """A DataConfig for the loader tests: keyword arguments are data.* fields."""
    over = [f"data.{k}={v}" for k, v in kw.items()]
    return data_config(shards_dir, "data.seq_len=64", "data.micro_batch_size=8", "data.num_workers=0",
                       "data.shuffle_buffer=50", *over)
