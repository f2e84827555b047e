"""SentencePiece tokenizer: fixed special ids, lossless round trip, padded vocabulary, sidecar, errors.

A failure here points at megamlm/tokenizer.py (trainer arguments, sidecar, padding arrays) or at
megamlm/prepare.py (the config → tokenizer path).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megamlm.config import load_config
from megamlm.data.corpus import split_sentences, wiki_vital_path
from megamlm.prepare import train_tokenizer_from_config
from megamlm.tokenizer import SPECIAL_IDS, Tokenizer, TokenizerError, sidecar_path, train_tokenizer

WORDS = ("the of and a to in is was for on as with by he that at from his it an were are which this be "
         "or has had first one their its new after who they have her she two been other when there all during "
         "into school time may years more most only over city some world would where later up such used many can "
         "state about national out known university united then made").split()


def fake_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 18))]
        s = " ".join(words).capitalize()
        if rng.random() < 0.3:
            s += f" in {rng.randint(1000, 2025)}"
        if rng.random() < 0.2:
            s += ", naïve café “quoted” — ok"
        out.append(s + rng.choice([".", "!", "?"]))
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "bpe.model"
    return train_tokenizer(fake_sentences(3000), path, vocab_size=700, model_type="bpe", pad_multiple=128)


def test_special_ids_are_fixed(bpe):
    for piece, i in SPECIAL_IDS.items():
        assert bpe.sp.id_to_piece(i) == piece
    assert (bpe.special.pad, bpe.special.unk, bpe.special.cls, bpe.special.sep, bpe.special.mask) == (0, 1, 2, 3, 4)


def test_padded_vocab_is_a_multiple_of_128_and_padding_never_produced(bpe):
    assert bpe.vocab_size == 700
    assert bpe.padded_vocab_size == 768
    ids = [i for s in bpe.encode_batch(fake_sentences(500, seed=9)) for i in s]
    assert max(ids) < bpe.vocab_size
    assert not set(ids) & {0, 2, 3, 4}, "pad/control ids must never come from text"
    assert bpe.special_mask[bpe.vocab_size:].all() and not bpe.word_start[bpe.vocab_size:].any()


def test_literal_special_strings_are_plain_text(bpe):
    ids = bpe.encode("a [MASK] and [CLS] here")
    assert 4 not in ids and 2 not in ids
    assert bpe.decode(ids) == "a [MASK] and [CLS] here"


@pytest.mark.parametrize("text", [
    "Plain sentence.",
    "  double  spaces   and trailing space ",
    "Tabs\tand\u00a0no-break spaces",
    "Ünïcödé — emoji 🧪 and CJK 漢字 unseen in training",
    "digits 1234567890 and symbols {}[]<>~^|\\",
])
def test_lossless_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_word_start_and_random_candidates(bpe):
    ids = bpe.encode("the city was first")
    assert bpe.word_start[ids[0]]
    assert not np.isin([0, 1, 2, 3, 4], bpe.random_candidates).any()
    assert bpe.random_candidates.max() < bpe.vocab_size


def test_sidecar_describes_the_model(bpe):
    meta = json.loads(sidecar_path(bpe.path).read_text())
    assert meta["special_ids"] == SPECIAL_IDS
    assert meta["vocab_size"] == 700 and meta["padded_vocab_size"] == 768
    assert meta["model_type"] == "bpe" and meta["sha256"] == bpe.sha256
    assert meta["settings"]["byte_fallback"] is True


def test_unigram_on_the_real_corpus_round_trips(tmp_path):
    """The default corpus (Wikipedia summaries) through the config path; every sentence round-trips."""
    cfg = load_config(None, [f"tokenizer.model={tmp_path}/u.model", "tokenizer.vocab_size=2000",
                             "tokenizer.input_sentence_size=4000", "data.source=wiki-vital"])
    tok = train_tokenizer_from_config(cfg)
    assert tok.vocab_size == 2000 and tok.padded_vocab_size == 2048
    data = json.loads(wiki_vital_path().read_text(encoding="utf-8"))
    sentences = [s for art in list(data.values())[:300] for s in split_sentences(art.get("extract", ""))]
    assert len(sentences) > 500
    decoded = [tok.decode(ids) for ids in tok.encode_batch(sentences)]
    assert sum(a == b for a, b in zip(decoded, sentences)) == len(sentences)


def test_errors_name_the_file(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="does not exist.*train-tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    # A model without its sidecar.
    lone = tmp_path / "lone.model"
    lone.write_bytes(bpe.path.read_bytes())
    with pytest.raises(TokenizerError, match="sidecar .*lone.json.* is missing"):
        Tokenizer(lone)
    # A model replaced behind its sidecar's back.
    other = train_tokenizer(fake_sentences(800, seed=3), tmp_path / "o.model", vocab_size=500, model_type="bpe")
    (tmp_path / "lone.json").write_text(sidecar_path(other.path).read_text())
    with pytest.raises(TokenizerError, match="does not match its sidecar"):
        Tokenizer(lone)


def test_refuses_to_overwrite_and_rejects_tiny_vocab(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="already exists; pass --overwrite"):
        train_tokenizer(fake_sentences(10), bpe.path, vocab_size=700, model_type="bpe")
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(fake_sentences(10), tmp_path / "t.model", vocab_size=100, model_type="bpe")
    with pytest.raises(TokenizerError, match="corpus is empty"):
        train_tokenizer(["", "  "], tmp_path / "e.model", vocab_size=700, model_type="bpe")
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
