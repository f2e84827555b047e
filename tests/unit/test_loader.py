"""The loader in one process: Batch fields, exactly-once epochs, exact resume, worker-count independence,
bad shards. Real WebDataset tars (made by make_shards) and a real SentencePiece model.

A failure points at megamlm/data/stream.py (unit split, windows, cursors, collation) or loader.py
(epochs, errors, stops, state); a failure in the WebDataset cross-check points at the tar layout
written by megamlm/data/shards.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch

from megamlm.data.batch import IGNORE_INDEX
from megamlm.data.loader import LoaderStopped, build_loader
from megamlm.data.units import epoch_units
from megamlm.data.shards import ShardError, iter_shard, load_manifest, npy_bytes, npy_load
from megamlm.distributed.topology import single_process_topology
from tests import data_fixtures as F

FIELDS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "mlm_positions", "mlm_targets")


make = F.make_loader


def one_epoch(loader, include_dropped=True):
    """(batch, info) of the loader's current epoch."""
    out, epoch = [], loader.epoch
    for b, info in loader.iter_with_info(include_dropped=include_dropped):
        if info["epoch"] != epoch:
            break
        out.append((b, info))
    return out


def same(b1, b2) -> bool:
    ok = all(torch.equal(getattr(b1, f), getattr(b2, f)) for f in FIELDS) and b1.n_tokens == b2.n_tokens
    return ok and ((b1.pair_labels is None and b2.pair_labels is None) or torch.equal(b1.pair_labels, b2.pair_labels))


@contextlib.contextmanager
def within(seconds: float):
    """Fail instead of hanging when the block runs longer (a loader that loops over empty epochs)."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def train_docs(shards_dir):
    man = load_manifest(shards_dir)
    return {i: (ids, sl) for p in man.shard_paths("train") for i, ids, sl in iter_shard(p)}


@pytest.mark.parametrize("pair,pad_to", [("nsp", "longest"), ("sop", "max"), ("none", "longest")])
def test_batch_fields(shards, tok, pair, pad_to):
    loader = make(shards, tok, pair=pair, masking="whole_word", pad_to=pad_to)
    it = iter(loader)
    for _ in range(5):
        b = next(it)
        B, T = b.input_ids.shape
        assert B == 8 and (T == 64 if pad_to == "max" else T <= 64)
        lens = b.attention_mask.sum(1)
        assert pad_to == "max" or int(lens.max()) == T  # padded to the longest
        assert b.n_tokens == int(lens.sum())
        assert (b.input_ids[~b.attention_mask] == tok.special.pad).all()
        assert (b.mlm_labels[~b.attention_mask] == IGNORE_INDEX).all()
        flat = b.mlm_labels.reshape(-1)
        assert torch.equal(b.mlm_positions, torch.nonzero(flat != IGNORE_INDEX).reshape(-1))
        assert torch.equal(b.mlm_targets, flat[b.mlm_positions]) and b.n_targets > 0
        assert all(getattr(b, f).dtype == torch.int64 for f in FIELDS if f != "attention_mask")
        assert b.attention_mask.dtype == torch.bool
        assert (b.input_ids[:, 0] == tok.special.cls).all()
        if pair == "none":
            assert b.pair_labels is None and (b.token_type_ids == 0).all()
        else:
            assert b.pair_labels.shape == (B,) and set(b.pair_labels.tolist()) <= {0, 1}
            assert (b.token_type_ids.sum(1) > 0).all()


@pytest.mark.parametrize("pair", ["nsp", "sop", "none"])
def test_every_document_once_per_epoch(shards, tok, pair):
    docs = train_docs(shards)
    loader = make(shards, tok, pair=pair)
    seen = []
    for _, info in one_epoch(loader):
        seen += [d for ds in info["docs"] for d in (ds if pair == "none" else ds[:1])]
    if pair == "none":  # a document may span two sequences: each of its pieces counts once
        assert set(seen) == set(docs)
    else:
        expected = {i for i, (_, sl) in docs.items() if pair == "nsp" or sl.size >= 2}
        assert sorted(set(seen)) == sorted(expected)
        if pair == "sop":
            assert loader.epoch_stats["short_documents"] == len(docs) - len(expected)
    assert loader.epoch_stats["documents"] == len(docs)
    assert loader.epoch_stats["dropped_batches"] == 0 and loader.stats["epochs"] == 1


def test_epochs_differ_and_shards_are_reordered(shards, tok):
    man = load_manifest(shards)
    samples = [s["samples"] for s in man.shards("train")]
    u0, u1 = epoch_units(samples, 5, 0, 1, True), epoch_units(samples, 5, 1, 1, True)
    assert sorted(map(tuple, u0)) == sorted(map(tuple, u1)) and not np.array_equal(u0[:, 0], u1[:, 0])
    loader = make(shards, tok)
    e0 = one_epoch(loader)
    e1 = one_epoch(loader)
    assert not same(e0[0][0], e1[0][0])
    ids0 = {x for _, i in e0 for x in i["ident"]}
    assert len(ids0) == sum(len(i["ident"]) for _, i in e0)  # identities are unique within an epoch


@pytest.mark.parametrize("workers,stop,pair,masking", [(0, 37, "nsp", "token"), (2, 41, "none", "whole_word"),
                                                   (2, -4, "sop", "span")])
def test_resume_is_exact(shards, tok, workers, stop, pair, masking):
    """Stop after ``stop`` batches (negative: that many before the end of epoch 0), rebuild from the JSON
    state: the concatenation equals the uninterrupted stream batch for batch, into epoch 1, and every
    counter (telemetry's data_*) continues: the resumed loader's equal the uninterrupted one's, the
    window re-read to resume in its middle not counted twice."""
    kw = dict(pair=pair, masking=masking, num_workers=workers)
    ref_loader = make(shards, tok, **kw)
    ref, epoch_len, it = [], 0, iter(ref_loader)
    while len(ref) < epoch_len + 20:
        ref.append(next(it))
        epoch_len += ref_loader.epoch == 0
    n = len(ref)
    stop = stop if stop >= 0 else epoch_len + stop
    a = make(shards, tok, **kw)
    it = iter(a)
    got = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(a.state_dict()))
    del it
    b = make(shards, tok, state=state, **kw)
    it = iter(b)
    got += [next(it) for _ in range(n - stop)]
    for i, (x, y) in enumerate(zip(ref, got)):
        assert same(x, y), f"batch {i} differs after resuming at {stop}"
    assert b.stats == ref_loader.stats and b.stats["documents"] > 0 and b.stats["epochs"] == 1
    assert b.epoch_stats == ref_loader.epoch_stats


def test_masks_do_not_depend_on_the_worker_count(shards, tok):
    def table(workers):
        loader = make(shards, tok, pair="nsp", masking="whole_word", num_workers=workers)
        out = {}
        for b, info in one_epoch(loader):
            for row, ident in enumerate(info["ident"]):
                n = int(b.attention_mask[row].sum())
                out[ident] = (b.input_ids[row, :n].tolist(), b.mlm_labels[row, :n].tolist(),
                              b.token_type_ids[row, :n].tolist(), int(b.pair_labels[row]))
        return out

    one, two = table(1), table(2)
    assert len(one) > 1000 and one == two


def _examples(batches):
    """{identity: (input ids, labels, pair label)} of (batch, info) pairs of padded batches, and the count of
    identities seen (to catch an example read twice)."""
    out, seen = {}, 0
    for b, info in batches:
        for row, ident in enumerate(info["ident"]):
            n = int(b.attention_mask[row].sum())
            out[ident] = (b.input_ids[row, :n].tolist(), b.mlm_labels[row, :n].tolist(), int(b.pair_labels[row]))
            seen += 1
    return out, seen


def _take(loader, n):
    got = []
    for b, info in loader.iter_with_info():
        got.append((b, info))
        if len(got) == n:
            return got
    raise AssertionError("unreachable: the loader is endless")


@pytest.mark.parametrize("before,after,stop", [(0, 2, 3), (2, 3, 11), (3, 1, 17), (2, 0, 2)])
def test_a_state_resumes_on_another_worker_count_with_every_example_once(shards, tok, before, after, stop, caplog):
    """Elastic resume (elastic.py): ``stop`` batches on ``before`` workers, then the rest of epoch 0 on
    ``after``: every example of the epoch (identity, tokens, masks, pair label: the uninterrupted run's) once,
    none twice, in partly read windows too (shuffle_buffer 50 documents: a stop lands inside a window);
    epoch 1 then runs on the default split. The state is plain JSON, format 2, and carries the plan."""
    full, n_full = _examples(one_epoch(make(shards, tok, num_workers=before)))
    a = make(shards, tok, num_workers=before)
    head = _take(a, stop)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["format"] == "megamlm-loader/2" and state["ranks"][0]["batches"] == stop and state["plan"] is None
    assert any(w[2] > 0 for w in state["ranks"][0]["workers"])  # a window was left partly read
    with caplog.at_level(logging.INFO, logger="megamlm.data.loader"):
        b = make(shards, tok, num_workers=after, state=state)
    assert "are redistributed, each example still read once" in caplog.text and b.epoch == 0
    tail, nxt, planned = [], [], False
    for x, info in b.iter_with_info(include_dropped=True):
        if info["epoch"] == 0:
            tail.append((x, info))
            planned = planned or (len(tail) == 1 and b.state_dict()["plan"] is not None)
            continue
        nxt.append(x)
        if len(nxt) == 6:
            break
    got_head, n_head = _examples(head)
    got_tail, n_tail = _examples(tail)
    assert n_head + n_tail == n_full == len(full) and not set(got_head) & set(got_tail)
    assert {**got_head, **got_tail} == full
    assert planned and b.state_dict()["plan"] is None  # the plan travels with epoch 0's states, not after
    ref = make(shards, tok, num_workers=after)
    ref.reset(1)
    assert all(same(x, y) for x, y in zip(nxt, [x for x, _ in _take(ref, 6)]))


def test_an_elastic_state_resumes_exactly_on_its_own_layout(shards, tok):
    """A plan-carrying state (saved after an elastic resume) resumed on the same layout: the same batches as
    going on without the stop."""
    a = make(shards, tok, num_workers=2)
    _take(a, 7)
    mid = json.loads(json.dumps(a.state_dict()))
    b = make(shards, tok, num_workers=3, state=mid)
    _take(b, 5)
    state = json.loads(json.dumps(b.state_dict()))
    assert state["plan"] is not None
    ref = [x for x, _ in _take(b, 12)]
    c = make(shards, tok, num_workers=3, state=state)
    got = [x for x, _ in _take(c, 12)]
    assert all(same(x, y) for x, y in zip(ref, got))


def test_a_format_1_state_on_another_layout_starts_the_next_epoch(shards, tok, caplog):
    a = make(shards, tok)
    _take(a, 3)
    state = a.state_dict()
    state["format"] = "megamlm-loader/1"
    for r in state["ranks"]:
        r["workers"] = [w[:4] for w in r["workers"]]
    state.pop("plan")
    with caplog.at_level(logging.WARNING):
        b = make(shards, tok, num_workers=2, state=state)
    assert b.epoch == 1 and "does not record where windows end" in caplog.text


@pytest.mark.parametrize("pair", ["none", "nsp"])
def test_shuffle_buffer_1_keeps_the_manifest_order(shards, tok, pair):
    """``data.shuffle_buffer: 1`` (1 = no shuffle): shards, documents and examples in manifest order,
    every epoch (the shard order is not permuted either)."""
    order = list(train_docs(shards))  # manifest shard order, then file order
    seen: dict[int, list] = {0: [], 1: []}
    for _, info in make(shards, tok, pair=pair, shuffle_buffer=1).iter_with_info():
        if info["epoch"] == 2:
            break
        seen[info["epoch"]] += [d for ds in info["docs"] for d in (ds if pair == "none" else ds[:1])]
    for epoch, docs in seen.items():
        assert list(dict.fromkeys(docs)) == order, f"epoch {epoch}"


def test_val_split_is_ordered_and_repeatable(shards, tok):
    v = make(shards, tok, split="val")
    first = [b for _, b in zip(range(3), v)]
    v.reset()
    again = [b for _, b in zip(range(3), v)]
    assert all(same(x, y) for x, y in zip(first, again))


def test_webdataset_reads_the_same_blocks(shards):
    import webdataset as wds

    man = load_manifest(shards)
    urls = [str(p) for p in man.shard_paths("train")]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
    n, ids = 0, []
    for sample in ds:
        ids.append(npy_load(sample["ids.npy"]))
        n += 1
    assert n == sum(s["samples"] for s in man.shards("train"))
    mine = np.concatenate([x for p in man.shard_paths("train") for _, x, _ in iter_shard(p)])
    assert np.array_equal(np.concatenate(ids), mine)


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def broken(shards, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def drain(loader):
    for _ in one_epoch(loader):
        pass


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def test_truncated_shard_is_named(broken, tok):
    truncate(broken / "train-000001.tar")
    with pytest.raises(ShardError, match=r"train-000001\.tar.*sha256"):
        drain(make(broken, tok, num_workers=1))  # raised in a worker, re-raised here
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        drain(make(broken, tok, verify_checksums="false"))


def test_checksum_mismatch_is_named(broken, tok):
    p = broken / "train-000002.tar"
    data = bytearray(p.read_bytes())
    data[600] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256 .* differs"):
        drain(make(broken, tok))


def test_shards_of_another_tokenizer(broken, tok):
    # a shard holding ids beyond this tokenizer's vocabulary (checksums off, or it fails on the sha256)
    p = broken / "train-000000.tar"
    members = []
    with tarfile.open(p) as t:
        for m in t:
            data = t.extractfile(m).read()
            if m.name.endswith(".ids.npy"):
                data = npy_bytes(npy_load(data).astype(np.uint16) + 2000)
            members.append((m.name, data))
    with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar.*outside the tokenizer"):
        drain(make(broken, tok, verify_checksums="false"))
    man = json.loads((broken / "manifest.json").read_text())
    man["tokenizer"]["sha256"] = "0" * 64
    (broken / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ShardError, match="made with tokenizer sha256 000000000000"):
        make(broken, tok)


def test_on_error_skip_warns_counts_and_goes_on(broken, tok, caplog):
    truncate(broken / "train-000001.tar")
    (broken / "train-000003.tar").unlink()
    with caplog.at_level(logging.WARNING):
        loader = make(broken, tok, on_error="skip")
        batches = one_epoch(loader)
    assert loader.epoch_stats["skipped_shards"] == 2 and loader.epoch_stats["skipped_blocks"] > 0
    assert "train-000001.tar" in caplog.text and "train-000003.tar" in caplog.text
    assert len(batches) > 50


@pytest.mark.parametrize("split,workers,verify", [("train", 0, "true"), ("train", 2, "false"), ("val", 0, "true"),
                                                  ("val", 1, "false")])
def test_every_shard_skipped_is_a_shard_error_not_an_endless_loop(broken, tok, split, workers, verify):
    """on_error=skip with every shard of the split bad: the first epoch yields nothing, and the next ones
    would too; the loader says so, naming the skipped shards, instead of starting epoch after epoch."""
    names = [s["name"] for s in load_manifest(broken).shards(split)]
    for n in names:  # nothing readable in them, with or without the checksum
        (broken / n).write_bytes((broken / n).read_bytes()[:100])
    loader = make(broken, tok, split=split, on_error="skip", num_workers=workers, verify_checksums=verify)
    with within(30), pytest.raises(ShardError, match=rf"epoch 0 of the '{split}' split yielded no batch: every "
                                                     r"shard was skipped \(data.on_error=skip\): shard ") as e:
        next(iter(loader))
    named = [n for n in names if n in str(e.value)]
    assert len(named) >= min(len(names), 5 if workers == 0 else 1)
    if len(names) > 5 and workers == 0:
        assert f"and {len(names) - 5} more" in str(e.value)
    assert loader.epoch_stats["batches"] == 0 and loader.epoch_stats["skipped_shards"] >= len(names)


def test_the_rest_of_a_bad_epoch_goes_on(broken, tok):
    """Only some shards bad: batches from the others, no error (the skip case that must keep working)."""
    for n in [s["name"] for s in load_manifest(broken).shards("train")][1:]:
        truncate(broken / n)
    loader = make(broken, tok, on_error="skip")
    epochs = []
    with within(30):
        for _, info in loader.iter_with_info():
            if info["epoch"] == 3:
                break
            epochs.append(info["epoch"])
    assert loader.stats["epochs"] == 3 and all(epochs.count(e) > 0 for e in range(3))


@pytest.mark.parametrize("workers", [0, 2])
def test_should_stop_raises_loader_stopped_and_the_state_resumes(shards, tok, workers):
    """``should_stop`` is asked at packets that are not batches and between epochs: True raises
    LoaderStopped (a RuntimeError); the state saved then continues the uninterrupted stream exactly,
    the batches read ahead with the packet included."""
    ref_it = iter(make(shards, tok, num_workers=workers))
    epoch_len = len(one_epoch(make(shards, tok, num_workers=workers), include_dropped=False))
    ref = [next(ref_it) for _ in range(epoch_len + 3)]
    asked = []
    loader = make(shards, tok, num_workers=workers)
    loader.should_stop = lambda: asked.append(1) or True
    got = []
    with within(30), pytest.raises(LoaderStopped, match="asked to stop") as e:
        for b in loader:
            got.append(b)
    assert isinstance(e.value, RuntimeError) and asked and 0 < len(got) <= epoch_len
    if workers == 0:  # its first non-batch packet is the end of the epoch, met while reading a window ahead:
        # the batches read with it are not yielded (the resumed run reads them again)
        assert len(got) == epoch_len // loader.agree_every * loader.agree_every
    state = json.loads(json.dumps(loader.state_dict()))
    it = iter(make(shards, tok, num_workers=workers, state=state))
    got += [next(it) for _ in range(len(ref) - len(got))]
    assert all(same(x, y) for x, y in zip(ref, got))


def test_should_stop_wins_over_an_endless_wait(broken, tok):
    for n in [s["name"] for s in load_manifest(broken).shards("train")]:
        truncate(broken / n)
    loader = build_loader(F.loader_config(broken, on_error="skip"), tok, single_process_topology(), 5,
                          F.objective(pair="nsp"), should_stop=lambda: True)
    with within(30), pytest.raises(LoaderStopped):
        next(iter(loader))


def test_state_at_the_mark_is_the_state_when_it_was_marked(shards, tok):
    """``mark()`` is local and cheap (the trainer marks every step); ``state_dict(at_mark=True)`` later
    returns the position of the mark, counters included, across an epoch's end."""
    a = make(shards, tok, num_workers=2)
    it = iter(a)
    with pytest.raises(RuntimeError, match="without a mark"):
        a.state_dict(at_mark=True)
    next(it)
    a.mark()
    before = json.loads(json.dumps(a.state_dict()))
    start = a.epoch
    while a.epoch == start:  # into the next epoch
        next(it)
    assert a.state_dict(at_mark=True) == before != a.state_dict()


def test_a_state_resumes_over_the_same_shards_moved_but_not_over_other_shards(shards, tok, tmp_path):
    """The state records which shards it read (names, blocks, sha256 of the manifest's entries, not the
    path): the same folder copied elsewhere resumes, another corpus is refused naming both folders."""
    a = make(shards, tok)
    _take(a, 3)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["shards"]["dir"] == str(shards) and state["shards"]["split"] == "train"
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    assert make(moved, tok, state=state).epoch == 0
    other = F.shards("other", n_docs=120, seed=3)
    with pytest.raises(ShardError, match=f"saved over the 'train' shards of {shards} and this run reads other "
                                         f"shards \\({other}: data.shards_dir\\)"):
        make(other, tok, state=state)
