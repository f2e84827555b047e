"""The loader over spawned gloo ranks: exactly-once epochs and equal batch counts per data-parallel rank,
identical batches within a vocab-parallel group, a resume state that is the same on every rank, errors,
empty epochs and stops raised on every rank together.

A failure points at megamlm/data/loader.py (the per-batch MIN all-reduce, draining and counting, the
epoch's closing agreement, state gathering), at megamlm/data/units.py and stream.py (unit split by
data-parallel rank, blocks cut into parts) or at megamlm/distributed/topology.py (groups).
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from megamlm.data.shards import iter_shard, load_manifest
from tests import data_fixtures as F
from tests._spawn import spawn


def _digest(b) -> str:
    return hashlib.sha1(b.input_ids.numpy().tobytes() + b.mlm_labels.numpy().tobytes()).hexdigest()


def _rank_epoch(rank, world, shards_dir, tok_path, workers, vp, agree_every=16):
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    topo = build_topology(vp)
    tok = Tokenizer(tok_path)
    cfg = F.loader_config(shards_dir, num_workers=workers, agree_every=agree_every)
    obj = ObjectiveConfig(pair="nsp", masking="span")
    loader = build_loader(cfg, tok, topo, 11, obj)
    yielded, dropped = [], []
    for b, info in loader.iter_with_info(include_dropped=True):
        if info["epoch"] != 0:
            break  # every rank stops at its first batch of epoch 1, after the same collectives
        (dropped if info["dropped"] else yielded).append(
            (_digest(b), [d[0] for d in info["docs"]], info["ident"]))
    state = loader.state_dict()  # collective
    ref = [_digest(b) for _, b in zip(range(4), loader)]
    again = build_loader(cfg, tok, topo, 11, obj, state=state)
    resumed = [_digest(b) for _, b in zip(range(4), again)]
    return {"yielded": yielded, "dropped": dropped, "stats": loader.epoch_stats, "state": state,
            "agreements": loader.agreements,
            "ref": ref, "resumed": resumed, "dp_rank": topo.dp_rank}


def test_two_ranks_two_workers_every_document_once_equal_batches():
    shards_dir = F.shards()
    docs = {i for p in load_manifest(shards_dir).shard_paths("train") for i, _, _ in iter_shard(p)}
    r0, r1 = spawn(_rank_epoch, 2, args=(str(shards_dir), str(F.tokenizer_path()), 2, 1), timeout=180)
    assert len(r0["yielded"]) == len(r1["yielded"]) > 50  # no rank ran dry: equal batch counts
    assert min(len(r0["yielded"]) + len(r0["dropped"]), len(r1["yielded"]) + len(r1["dropped"])) \
        == len(r0["yielded"])  # the epoch ended when the first rank ran out, no earlier
    for r in (r0, r1):
        assert r["stats"]["dropped_batches"] == len(r["dropped"])
        assert r["stats"]["batches"] == len(r["yielded"])
    owner = {}
    for rank, r in enumerate((r0, r1)):
        for _, ds, _ in r["yielded"] + r["dropped"]:
            for d in ds:
                assert owner.setdefault(d, rank) == rank, f"document {d} read by both ranks"
    assert set(owner) == docs  # every train document, on exactly one rank (yielded or counted as dropped)
    idents = [x for r in (r0, r1) for _, _, ids in r["yielded"] + r["dropped"] for x in ids]
    assert len(idents) == len(set(idents))
    assert r0["state"] == r1["state"] and r0["state"]["dp_size"] == 2
    assert r0["ref"] == r0["resumed"] and r1["ref"] == r1["resumed"]


def test_agreeing_once_per_window_yields_the_batches_of_an_agreement_per_batch():
    """data.agree_every=W: one host collective per W micro-batches instead of one per micro-batch, and the
    same batches on each rank, the same dropped at the epoch's end, the same state."""
    shards_dir = F.shards()
    runs = {w: spawn(_rank_epoch, 2, args=(str(shards_dir), str(F.tokenizer_path()), 2, 1, w), timeout=180)
            for w in (1, 7)}
    for r1, r7 in zip(runs[1], runs[7]):
        assert r7["yielded"] == r1["yielded"] and r7["dropped"] == r1["dropped"] and r7["state"] == r1["state"]
        n = len(r1["yielded"])
        assert r1["agreements"] >= n + 2  # one per batch, the one that found a rank out, the epoch's closing one
        assert r7["agreements"] <= n // 7 + 4, (n, r7["agreements"])


def test_a_vocab_parallel_group_gets_the_same_batches():
    shards_dir = F.shards()
    r0, r1 = spawn(_rank_epoch, 2, args=(str(shards_dir), str(F.tokenizer_path()), 0, 2), timeout=180)
    assert r0["dp_rank"] == r1["dp_rank"] == 0
    assert [y[0] for y in r0["yielded"]] == [y[0] for y in r1["yielded"]] and not r0["dropped"]
    assert r0["state"] == r1["state"]


def _rank_until_error(rank, world, shards_dir, tok_path):
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    loader = build_loader(F.loader_config(shards_dir), Tokenizer(tok_path), build_topology(1), 11,
                          ObjectiveConfig(pair="sop"))
    try:
        for _ in loader:
            pass
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, str(e)
    return None


def test_a_bad_shard_on_one_rank_stops_every_rank(tmp_path):
    """A shard only rank 1 reads is truncated: rank 1 raises ShardError naming it, rank 0 is told and
    raises too, instead of waiting forever in the next collective."""
    import shutil

    from megamlm.data.units import epoch_units, split_range

    src = F.shards()
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    man = load_manifest(dst)
    units = epoch_units([s["samples"] for s in man.shards("train")], 11, 0, 2, True)
    lo, hi = split_range(len(units), 1, 2)
    only_rank1 = set(units[lo:hi, 0].tolist()) - set(units[:lo, 0].tolist())
    name = man.shards("train")[sorted(only_rank1)[-1]]["name"]
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    r0, r1 = spawn(_rank_until_error, 2, args=(str(dst), str(F.tokenizer_path())), timeout=120)
    assert r1[0] == "ShardError" and name in r1[1]
    assert r0[0] == "RuntimeError" and "another data-parallel rank failed" in r0[1]


def _ruin(path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # not one readable member


def _rank_scenarios(rank, world, all_bad, one_rank_bad, good, tok_path):
    """Three loaders one after the other on every rank; each must end with an exception on every rank at
    the same agreement (else the next scenario's collectives would pair with the wrong ones and hang)."""
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    topo, tok, obj = build_topology(1), Tokenizer(tok_path), ObjectiveConfig(pair="nsp")
    out = {}
    for name, folder, stop in (("all_bad", all_bad, None), ("one_rank_bad", one_rank_bad, None),
                               ("stop", good, (lambda: True) if rank == 0 else None)):
        loader = build_loader(F.loader_config(folder, on_error="skip"), tok, topo, 11, obj, should_stop=stop)
        n = 0
        try:
            for _ in loader:
                n += 1
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[name] = (type(e).__name__, str(e), n)
        if name == "stop":
            out["state"] = loader.state_dict()  # collective: every rank got here
    return out


def test_empty_epochs_and_stops_raise_on_every_rank(tmp_path):
    """on_error=skip: every train shard bad → ShardError on both ranks (not endless empty epochs); every
    shard rank 1 reads bad → ShardError on both, rank 1 saying why it made nothing, rank 0 that its batches
    were dropped; should_stop on rank 0 only → LoaderStopped on both, and a state both can save."""
    from megamlm.data.units import epoch_units, split_range

    src = F.shards()
    dirs = {k: tmp_path / k for k in ("all_bad", "one_rank_bad")}
    for d in dirs.values():
        shutil.copytree(src, d)
    man = load_manifest(src)
    names = [s["name"] for s in man.shards("train")]
    for n in names:
        _ruin(dirs["all_bad"] / n)
    units = epoch_units([s["samples"] for s in man.shards("train")], 11, 0, 2, True)
    lo, hi = split_range(len(units), 1, 2)
    rank1 = sorted(set(units[lo:hi, 0].tolist()))
    assert set(units[:lo, 0].tolist()) - set(rank1), "rank 0 must keep a good shard"
    for s in rank1:
        _ruin(dirs["one_rank_bad"] / names[s])
    r0, r1 = spawn(_rank_scenarios, 2, args=(str(dirs["all_bad"]), str(dirs["one_rank_bad"]), str(src),
                                              str(F.tokenizer_path())), timeout=180)
    for r in (r0, r1):
        kind, msg, n = r["all_bad"]
        assert kind == "ShardError" and n == 0
        assert "epoch 0 of the 'train' split yielded no batch" in msg and "nor did any other" in msg
        assert "every shard was skipped (data.on_error=skip)" in msg and any(x in msg for x in names)
    kind, msg, n = r1["one_rank_bad"]
    assert kind == "ShardError" and n == 0
    assert "data-parallel rank 1 of 2 made none, the others' batches were dropped" in msg
    assert "every shard was skipped" in msg and names[rank1[0]] in msg
    kind, msg, n = r0["one_rank_bad"]
    assert kind == "ShardError" and n == 0 and "another data-parallel rank made none" in msg
    assert r0["stop"][0] == r1["stop"][0] == "LoaderStopped"
    assert "another data-parallel rank was asked to stop" in r1["stop"][1]
    assert r0["state"] == r1["state"]


def _rank_two_epochs(rank, world, shards_dir, tok_path, workers):
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    topo, tok, obj = build_topology(1), Tokenizer(tok_path), ObjectiveConfig(pair="nsp")
    loader = build_loader(F.loader_config(shards_dir, num_workers=workers), tok, topo, 11, obj)
    rows = []
    for _, info in loader.iter_with_info(include_dropped=True):
        if info["epoch"] == 2:
            break
        rows.append((info["epoch"], info["dropped"], [d[0] for d in info["docs"]], info["ident"]))
    val = build_loader(F.loader_config(shards_dir), tok, topo, 11, obj, split="val")
    val_docs: list | tuple = []
    try:
        for _, info in val.iter_with_info(include_dropped=True):
            if info["epoch"] == 1:
                break
            val_docs += [d[0] for d in info["docs"]]
    except Exception as e:  # noqa: BLE001 - the test inspects it
        val_docs = (type(e).__name__, str(e))
    return rows, val_docs


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 0)])
def test_one_block_read_by_more_ranks_every_document_once(world, workers):
    """A split of exactly one block: the block is cut into one part per rank (units.py); every epoch each
    train document is read (yielded or dropped) by exactly one rank and the ranks yield equally many
    batches. A validation block holding fewer documents than ranks leaves a rank with nothing: a
    ShardError on every rank that says so, not an endless run of empty epochs."""
    shards_dir = F.shards("one-block", n_docs=60, block_tokens=10**9, shard_mb=100)
    man = load_manifest(shards_dir)
    assert [s["samples"] for s in man.shards("train")] == [1] and [s["samples"] for s in man.shards("val")] == [1]
    docs = {i for p in man.shard_paths("train") for i, _, _ in iter_shard(p)}
    n_val = man.raw["splits"]["val"]["totals"]["documents"]
    results = spawn(_rank_two_epochs, world, args=(str(shards_dir), str(F.tokenizer_path()), workers), timeout=240)
    for epoch in (0, 1):
        owner, idents = {}, []
        for rank, (rows, _) in enumerate(results):
            for e, _, ds, ids in rows:
                if e == epoch:
                    idents += ids
                    for d in ds:
                        assert owner.setdefault(d, rank) == rank, f"epoch {epoch}: document {d} read by two ranks"
        assert set(owner) == docs, f"epoch {epoch}"
        assert len(idents) == len(set(idents))
        yielded = [sum(1 for e, dropped, _, _ in rows if e == epoch and not dropped) for rows, _ in results]
        assert len(set(yielded)) == 1 and yielded[0] > 0
    if n_val >= world:
        assert sorted(d for _, v in results for d in set(v)) == sorted({i for p in man.shard_paths("val")
                                                                         for i, _, _ in iter_shard(p)})
    else:
        for _, (kind, msg) in results:
            assert kind == "ShardError" and "epoch 0 of the 'val' split yielded no batch" in msg
        assert any("there was no document to read" in msg for _, (_, msg) in results)


def _rank_stop_after(rank, world, shards_dir, tok_path, workers, stop, state=None):
    """This rank's first ``stop`` batches (all of epoch 0's rest when ``stop`` is 0) and the state after them,
    on ``world`` ranks x ``workers``, from ``state`` when given: (identities read, state)."""
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    topo = build_topology(1)
    cfg = F.loader_config(shards_dir, num_workers=workers)
    loader = build_loader(cfg, Tokenizer(tok_path), topo, 11, ObjectiveConfig(pair="nsp", masking="span"),
                          state=state)
    read, batches = [], 0
    for _, info in loader.iter_with_info(include_dropped=True):
        if info["epoch"] != 0:
            break
        read += [tuple(x) for x in info["ident"]]
        batches += 1
        if batches == stop:
            break
    return read, loader.state_dict()


@pytest.mark.parametrize("later", [3, 1])
def test_a_state_of_two_ranks_resumes_on_another_rank_count_with_every_example_once(later):
    """Elastic resume across data-parallel sizes: 2 ranks read 9 batches each, then the rest of epoch 0 runs
    on ``later`` ranks (2 workers each) from the state; every example of the epoch is read exactly once
    (yielded, or drained and counted at the epoch's end), the same set as one rank reads in one go."""
    shards_dir, tok = str(F.shards()), str(F.tokenizer_path())
    whole, _ = _rank_stop_after(0, 1, shards_dir, tok, 0, 0)
    first = spawn(_rank_stop_after, 2, args=(shards_dir, tok, 1, 9), timeout=180)
    state = first[0][1]
    assert state == first[1][1] and state["dp_size"] == 2 and state["format"] == "megamlm-loader/2"
    if later == 1:
        rest = [_rank_stop_after(0, 1, shards_dir, tok, 2, 0, state)]
    else:
        rest = spawn(_rank_stop_after, later, args=(shards_dir, tok, 2, 0, state), timeout=180)
    read = [x for r in first for x in r[0]] + [x for r in rest for x in r[0]]
    assert len(read) == len(set(read)) == len(whole) and set(read) == set(whole)
