"""The corpus readers (megamlm/data/corpus.py): sentence splitting, the text / JSON lines / wiki-vital
readers, chunked reading, and errors that name the file, the line or the byte offset.

A failure here points at megamlm/data/corpus.py; the shards written from these documents are
tests/unit/test_shards.py.
"""

import json
import random
from pathlib import Path

import pytest

from megamlm.data.corpus import CorpusError, ReadStats, iter_documents, split_document, split_sentences


def test_split_sentences_keeps_abbreviations_and_initials():
    text = ("Dr. Smith met J. R. R. Tolkien in the U.S. in 1950. It rained! Did it? "
            "Yes, e.g. twice. \"Quoted.\" (Bracketed.) The end")
    assert split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. in 1950.", "It rained!", "Did it?",
        "Yes, e.g. twice.", "\"Quoted.\"", "(Bracketed.)", "The end"]
    assert split_sentences("   ") == []
    assert split_sentences("3.14 is pi. no capital after this. Next") == ["3.14 is pi. no capital after this.", "Next"]


def test_split_document_modes():
    doc = "First line. Still first\nSecond line"
    assert split_document(doc, "lines") == ["First line. Still first", "Second line"]
    assert split_document(doc, "rules") == ["First line.", "Still first Second line"]


def test_text_reader_documents_and_offsets(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\n  \nthree\n\nfour", encoding="utf-8")
    docs = list(iter_documents("text", [str(tmp_path)]))
    assert [d.text for d in docs] == ["one\ntwo", "three", "four"]
    assert docs[1].origin == f"{f}:6"


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good line\n\nbad \xff byte here\n")
    with pytest.raises(CorpusError, match=r"bad.txt: not UTF-8 at byte offset 15 \(byte 0xff\)"):
        list(iter_documents("text", [str(f)]))
    stats = ReadStats()
    docs = list(iter_documents("text", [str(f)], encoding_errors="replace", stats=stats))
    assert docs[1].text == "bad \ufffd byte here" and stats.replacements == 1


def test_jsonl_reader_errors_name_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "Hello there."}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c.jsonl:3: no 'text' field .*'body'"):
        list(iter_documents("jsonl", [str(f)]))
    f.write_text('{"text": "Hello there."}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c.jsonl:2: not valid JSON"):
        list(iter_documents("jsonl", [str(f)]))
    assert next(iter_documents("jsonl", [str(f)], text_field="text")).text == "Hello there."


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_chunked_reading_gives_the_same_documents_for_any_chunk_size(tmp_path, source):
    # Files are cut into raw chunks on document boundaries (make-shards parses them in its workers):
    # documents, origins (file:line) and counts must not depend on where the cuts fall.
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta.", "Eta", "theta,"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(80)]
    f = tmp_path / ("c.txt" if source == "text" else "c.jsonl")
    if source == "text":
        seps = ["\n\n", "\n \t\n", "\r\n\r\n", "\n\n\n\n"]
        body = "".join(d.replace(" zeta.", "\nzeta.") + rng.choice(seps) for d in docs)
    else:
        body = "".join(json.dumps({"text": d}) + ("\n\n" if i % 7 == 0 else "\n") for i, d in enumerate(docs))
    f.write_bytes(body.encode("utf-8"))
    ref = [(d.text, d.origin) for d in iter_documents(source, [str(f)], chunk_bytes=1 << 20)]
    assert len(ref) == 80
    for size in (1, 7, 64, 333):
        stats = ReadStats()
        got = [(d.text, d.origin) for d in iter_documents(source, [str(f)], chunk_bytes=size, stats=stats)]
        assert got == ref, size
        assert stats.bytes == f.stat().st_size and stats.documents == 80


def test_non_utf8_offset_is_absolute_in_a_later_chunk(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = b'{"text": "fine"}\n' * 50
    f.write_bytes(good + b'{"text": "bad \xfe"}\n')
    with pytest.raises(CorpusError, match=rf"bad.jsonl: not UTF-8 at byte offset {len(good) + 14} \(byte 0xfe\)"):
        list(iter_documents("jsonl", [str(f)], chunk_bytes=64))
    docs = list(iter_documents("jsonl", [str(f)], chunk_bytes=64, encoding_errors="replace"))
    assert docs[-1].origin == f"{f}:51" and docs[-1].replaced == 1


def test_missing_input_is_named(tmp_path):
    with pytest.raises(CorpusError, match="do not exist: 'nowhere.txt'"):
        list(iter_documents("text", ["nowhere.txt"]))


def test_wiki_vital_reader_reads_the_packaged_corpus():
    docs = iter_documents("wiki-vital", [])
    first = [next(docs) for _ in range(50)]
    assert all(d.origin.startswith(str(Path(d.origin.split("#")[0]))) for d in first)
    assert sum(len(split_sentences(d.text)) >= 2 for d in first) > 35


# --------------------------------------------------------------------------- make-shards
