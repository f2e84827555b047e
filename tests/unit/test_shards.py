"""``make-shards``: counts, determinism, safety (staging, the swap, recovery), bad input.

A failure here points at megamlm/data/shards.py (writer, manifest, tar layout), megamlm/data/outdir.py
(staging and the swap), or at megamlm/cli.py for the command-line checks. The corpus readers are
tests/unit/test_corpus.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamlm.config import load_config
from megamlm.data.corpus import CorpusError, split_sentences
from megamlm.cli import main as cli_main
from megamlm.data.outdir import OWNER
from megamlm.data.shards import STAGING, ShardError, iter_shard, load_manifest, make_shards, verify_shard
from megamlm.tokenizer import train_tokenizer

from .test_tokenizer import fake_sentences

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(fake_sentences(3000), tmp_path_factory.mktemp("tok") / "spm.model", vocab_size=700,
                           model_type="bpe")


def write_text_corpus(path: Path, n_docs: int, seed: int = 0, empty_every: int = 0) -> list[str]:
    """Documents of 1–8 generated sentences separated by blank lines (``.txt``) or as JSON lines
    (``.jsonl``, where ``empty_every`` also makes empty documents); returns their texts."""
    rng = np.random.default_rng(seed)
    sents = fake_sentences(n_docs * 8, seed=seed)
    docs, k = [], 0
    for i in range(n_docs):
        if empty_every and i % empty_every == 0:
            docs.append("")
            continue
        n = int(rng.integers(1, 9))
        docs.append(" ".join(sents[k:k + n]))
        k += n
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    else:
        assert not empty_every, "plain text has no empty documents: a blank line only separates"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


def data_cfg(tmp_path, *over):
    return load_config(None, [f"data.shards_dir={tmp_path}/shards", "data.shard_size_mb=0.02",
                              "data.val_fraction=0.1", *over]).data


def read_all(shards_dir: Path, split: str):
    man = load_manifest(shards_dir)
    out = {}
    for entry, path in zip(man.shards(split), man.shard_paths(split)):
        verify_shard(path, entry)
        for index, ids, lens in iter_shard(path):
            assert index not in out
            out[index] = (ids, lens)
    return man, out


# --------------------------------------------------------------------------- sentences and readers

def test_counts_add_up_and_shards_hold_the_text(tmp_path, tok):
    docs = write_text_corpus(tmp_path / "corpus.jsonl", 300, empty_every=37)
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/corpus.jsonl", "data.source=jsonl")
    man = make_shards(cfg, tok.path, workers=1, progress=False, block_tokens=500)
    n_empty = sum(1 for d in docs if not d)
    assert man["skipped"]["empty_documents"] == n_empty > 0
    tr, va = man["splits"]["train"]["totals"], man["splits"]["val"]["totals"]
    assert tr["documents"] + va["documents"] + n_empty == man["read"]["documents"] == 300
    assert len(man["splits"]["train"]["shards"]) > 2 and va["documents"] > 0
    seen = {}
    for split in ("train", "val"):
        m, got = read_all(tmp_path / "shards", split)
        totals = m.raw["splits"][split]["totals"]
        assert len(got) == totals["documents"]
        assert sum(ids.size for ids, _ in got.values()) == totals["tokens"]
        seen.update(got)
    # Each document decodes back to its sentences, in order, under its corpus position.
    for i, text in enumerate(docs):
        if not text:
            assert i not in seen
            continue
        ids, lens = seen[i]
        bounds = np.cumsum(lens)[:-1]
        assert [tok.decode(s) for s in np.split(ids, bounds)] == split_sentences(text)


def test_output_identical_for_one_and_two_processes(tmp_path, tok):
    write_text_corpus(tmp_path / "c.txt", 200, seed=4)
    a = make_shards(data_cfg(tmp_path / "a", f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path,
                    workers=1, progress=False, block_tokens=300)
    b = make_shards(data_cfg(tmp_path / "b", f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path,
                    workers=2, progress=False, block_tokens=300)
    assert a["splits"] == b["splits"]  # includes every shard's sha256
    # many small raw chunks: documents and blocks now straddle what each worker is given
    c = make_shards(data_cfg(tmp_path / "c", f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path,
                    workers=2, progress=False, block_tokens=300, chunk_bytes=997)
    assert c["splits"] == a["splits"] and c["read"] == a["read"]


def test_val_split_is_by_document_hash_not_position(tmp_path, tok):
    docs = write_text_corpus(tmp_path / "c.txt", 120, seed=5)
    make_shards(data_cfg(tmp_path, f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path, workers=1,
                progress=False)
    _, val = read_all(tmp_path / "shards", "val")
    # Reverse the corpus: the same texts land in validation.
    (tmp_path / "r.txt").write_text("\n\n".join(reversed(docs)), encoding="utf-8")
    make_shards(data_cfg(tmp_path / "r", f"data.inputs={tmp_path}/r.txt", "data.source=text"), tok.path, workers=1,
                progress=False)
    _, val_r = read_all(tmp_path / "r" / "shards", "val")
    assert sorted(docs[i] for i in val) == sorted(docs[::-1][i] for i in val_r)


def test_shards_are_valid_webdataset(tmp_path, tok):
    import webdataset as wds

    write_text_corpus(tmp_path / "c.txt", 60)
    make_shards(data_cfg(tmp_path, f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path, workers=1,
                progress=False, block_tokens=200)
    man = load_manifest(tmp_path / "shards")
    urls = [str(p) for p in man.shard_paths("train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert samples and set(samples[0]) >= {"__key__", "ids.npy", "sents.npy", "docs.npy", "index.npy"}
    assert sum(s["index.npy"].size for s in samples) == man.raw["splits"]["train"]["totals"]["documents"]


def test_long_document_is_kept_whole(tmp_path, tok):
    long_doc = " ".join(fake_sentences(400, seed=11))
    (tmp_path / "l.txt").write_text(long_doc, encoding="utf-8")
    man = make_shards(data_cfg(tmp_path, f"data.inputs={tmp_path}/l.txt", "data.source=text", "data.val_fraction=0"),
                      tok.path, workers=1, progress=False)
    assert man["splits"]["train"]["totals"]["documents"] == 1
    assert man["splits"]["train"]["totals"]["tokens"] > 4000


def test_refuses_to_overwrite_and_names_other_tokenizer(tmp_path, tok):
    write_text_corpus(tmp_path / "c.txt", 30)
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/c.txt", "data.source=text")
    make_shards(cfg, tok.path, workers=1, progress=False)
    with pytest.raises(ShardError, match="already holds .* shard file.*--overwrite"):
        make_shards(cfg, tok.path, workers=1, progress=False)
    other = train_tokenizer(fake_sentences(500, seed=8), tmp_path / "o.model", vocab_size=500, model_type="bpe")
    with pytest.raises(ShardError, match="made with another tokenizer"):
        make_shards(cfg, other.path, workers=1, progress=False)
    man = make_shards(cfg, other.path, workers=1, progress=False, overwrite=True)
    assert man["tokenizer"]["sha256"] == other.sha256
    assert load_manifest(cfg.shards_dir).tokenizer_sha256 == other.sha256


def test_failure_mid_way_leaves_no_partial_shard_and_no_manifest(tmp_path, tok):
    good = "\n".join(json.dumps({"text": s}) for s in fake_sentences(400))
    (tmp_path / "c.jsonl").write_text(good + "\n{broken\n", encoding="utf-8")
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/c.jsonl", "data.source=jsonl")
    with pytest.raises(CorpusError, match=r"c.jsonl:401: not valid JSON.*removed .* the folder .*shards it had created"):
        make_shards(cfg, tok.path, workers=2, progress=False, block_tokens=100)
    assert not Path(cfg.shards_dir).exists()  # the run created it: gone with what it wrote


def test_empty_input_is_an_error(tmp_path, tok):
    (tmp_path / "e.txt").write_text("\n\n   \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="nothing to shard"):
        make_shards(data_cfg(tmp_path, f"data.inputs={tmp_path}/e.txt", "data.source=text"), tok.path, workers=1,
                    progress=False)


def test_corrupt_and_tampered_shards_are_named(tmp_path, tok):
    write_text_corpus(tmp_path / "c.txt", 80)
    make_shards(data_cfg(tmp_path, f"data.inputs={tmp_path}/c.txt", "data.source=text"), tok.path, workers=1,
                progress=False, block_tokens=200)
    man = load_manifest(tmp_path / "shards")
    path, entry = man.shard_paths("train")[0], man.shards("train")[0]
    raw = bytearray(path.read_bytes())
    raw[600] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"shard {path}: sha256 .* differs"):
        verify_shard(path, entry)
    path.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ShardError, match=f"shard {path}"):
        list(iter_shard(path))


def test_cli_make_shards_and_tools_wrapper(tmp_path, tok):
    write_text_corpus(tmp_path / "c.txt", 50)
    cmd = [sys.executable, str(ROOT / "tools/make_shards.py"), str(ROOT / "configs/tiny-cpu.yaml"),
           f"tokenizer.model={tok.path}", "--input", str(tmp_path / "c.txt"), "--source", "text",
           "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and (tmp_path / "out" / "manifest.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    digest = hashlib.sha256((tmp_path / "out" / "train-000000.tar").read_bytes()).hexdigest()
    assert digest == load_manifest(tmp_path / "out").shards("train")[0]["sha256"]


# --------------------------------------------------------------------------- a failed run, --overwrite, recovery

def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → sha256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def bad_second_file(folder: Path) -> Path:
    """A folder of two inputs: a.txt makes several shards, b.txt (read second) holds a non-UTF-8 byte."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_corpus(folder / "a.txt", 300)
    (folder / "b.txt").write_bytes(b"Fine text here.\n\nBad \xff byte.\n")
    return folder


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("folder_existed", [False, True])
def test_a_failed_run_leaves_the_folder_as_it_found_it(tmp_path, tok, workers, folder_existed):
    """A bad byte in the second input, after shards of the first were finished: no shard, no staging
    folder left (and the folder itself removed when this run made it); a later run needs no --overwrite."""
    inputs = bad_second_file(tmp_path / "in")
    cfg = data_cfg(tmp_path, f"data.inputs={inputs}", "data.source=text")
    out = Path(cfg.shards_dir)
    if folder_existed:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = snapshot(out) if folder_existed else None
    with pytest.raises(CorpusError, match=r"b.txt: not UTF-8 at byte offset 21") as e:
        make_shards(cfg, tok.path, workers=workers, progress=False, block_tokens=300)
    if folder_existed:
        assert snapshot(out) == before and "left" in str(e.value) and "as it found it" in str(e.value)
    else:
        assert not out.exists() and "it had created" in str(e.value)
    (inputs / "b.txt").unlink()
    man = make_shards(cfg, tok.path, workers=workers, progress=False, block_tokens=300)
    assert len(man["splits"]["train"]["shards"]) > 2  # the failed run had finished some before b.txt
    assert not (out / STAGING).exists()


def test_a_failed_overwrite_keeps_the_old_set(tmp_path, tok):
    inputs = bad_second_file(tmp_path / "in")
    good = data_cfg(tmp_path, f"data.inputs={inputs}/a.txt", "data.source=text")
    make_shards(good, tok.path, workers=1, progress=False, block_tokens=300)
    out = Path(good.shards_dir)
    before = snapshot(out)
    bad = data_cfg(tmp_path, f"data.inputs={inputs}", "data.source=text", "data.val_fraction=0.3")
    with pytest.raises(CorpusError, match="not UTF-8.*as it found it"):
        make_shards(bad, tok.path, workers=2, progress=False, block_tokens=300, overwrite=True)
    assert snapshot(out) == before
    read_all(out, "train")  # the old set still verifies and reads


def test_overwrite_replaces_the_set_and_only_shard_files(tmp_path, tok):
    write_text_corpus(tmp_path / "big.txt", 300)
    write_text_corpus(tmp_path / "small.txt", 30, seed=3)
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/big.txt", "data.source=text")
    big = make_shards(cfg, tok.path, workers=1, progress=False, block_tokens=300)
    out = Path(cfg.shards_dir)
    (out / "notes.txt").write_text("mine\n")
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/small.txt", "data.source=text")
    small = make_shards(cfg, tok.path, workers=1, progress=False, block_tokens=300, overwrite=True)
    names = {sh["name"] for sp in small["splits"].values() for sh in sp["shards"]}
    assert len(names) < len(big["splits"]["train"]["shards"])
    assert set(snapshot(out)) == names | {"manifest.json", "notes.txt"}
    _, docs = read_all(out, "train")
    assert len(docs) == small["splits"]["train"]["totals"]["documents"]


def interrupted_swap(tmp_path, tok, stage: str):
    """The folder as a run killed at ``stage`` of its swap leaves it (outdir.py's steps 1-5), built from real
    sets: the old one in the folder, the new one made elsewhere and placed in the staging folder."""
    write_text_corpus(tmp_path / "old.txt", 300)
    write_text_corpus(tmp_path / "new.txt", 60, seed=7)
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/old.txt", "data.source=text")
    make_shards(cfg, tok.path, workers=1, progress=False, block_tokens=300)
    new = make_shards(data_cfg(tmp_path / "elsewhere", f"data.inputs={tmp_path}/new.txt", "data.source=text"),
                      tok.path, workers=1, progress=False, block_tokens=300)
    out, staging = Path(cfg.shards_dir), Path(cfg.shards_dir) / STAGING
    shutil.copytree(tmp_path / "elsewhere" / "shards", staging)
    (staging / OWNER).write_text(f"{__import__('socket').gethostname()} {dead_pid()}\n")
    names = sorted(sh["name"] for sp in new["splits"].values() for sh in sp["shards"])
    if stage == "before 1":
        return cfg, new, names
    (out / "manifest.json").unlink()  # 1
    if stage == "after 1":
        return cfg, new, names
    for p in out.glob("*.tar"):  # 2
        if p.name not in names:
            p.unlink()
    (staging / names[0]).replace(out / names[0])  # 3, the first shard
    if stage == "during 3":
        return cfg, new, names
    for n in names[1:]:
        (staging / n).replace(out / n)
    (staging / "manifest.json").replace(out / "manifest.json")  # 4
    return cfg, new, names


@pytest.mark.parametrize("stage", ["before 1", "after 1", "during 3", "after 4"])
def test_an_interrupted_swap_is_finished_by_the_next_run(tmp_path, tok, stage):
    cfg, new, names = interrupted_swap(tmp_path, tok, stage)
    out = Path(cfg.shards_dir)
    if stage in ("after 1", "during 3"):
        with pytest.raises(ShardError, match="interrupted while moving its shards"):
            load_manifest(out)  # the loader says what to do
    finished = r"an interrupted make-shards run was finished \(its complete set is in place, ready to use as is\): " if stage != "after 4" else ""
    with pytest.raises(ShardError, match=f"^{finished}.* already holds {len(names)} shard file"):
        make_shards(cfg, tok.path, workers=1, progress=False)  # recovery first, then the usual refusal
    assert not (out / STAGING).exists()
    assert set(snapshot(out)) == set(names) | {"manifest.json"}
    assert load_manifest(out).raw == new
    for split in ("train", "val"):
        read_all(out, split)


@pytest.mark.parametrize("damage", ["missing", "truncated", "same name, old bytes"])
def test_a_staging_set_that_is_not_whole_changes_nothing(tmp_path, tok, damage):
    """Recovery finds the staging manifest but not every shard it lists whole (a power loss before the
    names reached the disk, a hand deletion): the old set stays untouched, and the error says so."""
    cfg, new, names = interrupted_swap(tmp_path, tok, "before 1")
    out, staging = Path(cfg.shards_dir), Path(cfg.shards_dir) / STAGING
    victim = next(n for n in names if (out / n).is_file()) if damage == "same name, old bytes" else names[0]
    if damage == "truncated":
        (staging / victim).write_bytes((staging / victim).read_bytes()[:100])
    else:
        (staging / victim).unlink()
    if damage == "missing":
        (out / victim).unlink(missing_ok=True)
    before = snapshot(out)
    with pytest.raises(ShardError, match=f"does not hold a whole shard set .*{victim}.* was not changed: remove"):
        make_shards(cfg, tok.path, workers=1, progress=False)
    assert snapshot(out) == before and (out / "manifest.json").is_file()


@pytest.mark.parametrize("stage", ["before 1", "during 3"])
def test_prepare_finishes_an_interrupted_swap_then_reuses_the_new_set(tmp_path, tok, stage):
    """``megamlm prepare`` after a make-shards run was killed in its swap: with the old manifest still in
    place ("before 1") it must not reuse the old set while the complete new one waits in staging; with no
    manifest ("during 3") it must not refuse the folder. Either way it finishes the swap and reuses it."""
    from megamlm.prepare import prepare_corpus

    cfg, new, names = interrupted_swap(tmp_path, tok, stage)
    full = load_config(None, [f"data.shards_dir={cfg.shards_dir}", f"tokenizer.model={tok.path}"])
    assert prepare_corpus(full, progress=False) == new
    out = Path(cfg.shards_dir)
    assert not (out / STAGING).exists() and set(snapshot(out)) == set(names) | {"manifest.json"}


def test_a_killed_runs_staging_is_removed_but_a_live_ones_is_left_alone(tmp_path, tok):
    import socket

    write_text_corpus(tmp_path / "c.txt", 40)
    cfg = data_cfg(tmp_path, f"data.inputs={tmp_path}/c.txt", "data.source=text")
    staging = Path(cfg.shards_dir) / STAGING
    staging.mkdir(parents=True)
    (staging / "train-000000.tar.partial").write_bytes(b"half a shard")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (staging / OWNER).write_text(f"{socket.gethostname()} {sleeper.pid}\n")
        with pytest.raises(ShardError, match=f"belongs to make-shards process {sleeper.pid}, which is still running"):
            make_shards(cfg, tok.path, workers=1, progress=False)
        assert (staging / "train-000000.tar.partial").exists()
        (staging / OWNER).write_text(f"other-host.example {sleeper.pid}\n")
        with pytest.raises(ShardError, match="on host other-host.example .* remove"):
            make_shards(cfg, tok.path, workers=1, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    (staging / OWNER).write_text(f"{socket.gethostname()} {dead_pid()}\n")
    make_shards(cfg, tok.path, workers=1, progress=False)
    assert not staging.exists() and load_manifest(cfg.shards_dir)


def test_output_that_is_a_file_is_a_shard_error(tmp_path, tok, capsys):
    write_text_corpus(tmp_path / "c.txt", 20)
    f = tmp_path / "taken"
    f.write_text("not a folder\n")
    with pytest.raises(ShardError, match=f"{f} is a file, not a folder"):
        make_shards(data_cfg(tmp_path, f"data.shards_dir={f}", f"data.inputs={tmp_path}/c.txt"), tok.path,
                    workers=1, progress=False)
    with pytest.raises(ShardError, match=f"cannot create the shard folder {f}/sub"):
        make_shards(data_cfg(tmp_path, f"data.shards_dir={f}/sub", f"data.inputs={tmp_path}/c.txt"), tok.path,
                    workers=1, progress=False)
    assert f.read_text() == "not a folder\n"
    rc = cli_main(["make-shards", str(ROOT / "configs/tiny-cpu.yaml"), f"tokenizer.model={tok.path}", "--input",
                   str(tmp_path / "c.txt"), "--source", "text", "--output", str(f), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"megamlm make-shards: error: {f} is a file, not a folder: make-shards " \
        "writes a folder of shards (--output / data.shards_dir)"
