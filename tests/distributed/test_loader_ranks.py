"""The loader over spawned gloo ranks: exactly-once epochs and equal batch counts per data-parallel rank,
identical batches within a vocab-parallel group, a resume state that is the same on every rank.

A failure points at megamlm/data/loader.py (unit split by data-parallel rank, the per-batch MIN
all-reduce, draining and counting, state gathering) or at megamlm/distributed/topology.py (groups).
"""

from __future__ import annotations

import hashlib

from megamlm.data.shards import iter_shard, load_manifest
from tests import data_fixtures as F
from tests._spawn import spawn


def _digest(b) -> str:
    return hashlib.sha1(b.input_ids.numpy().tobytes() + b.mlm_labels.numpy().tobytes()).hexdigest()


def _rank_epoch(rank, world, shards_dir, tok_path, workers, vp):
    from megamlm.config import ObjectiveConfig
    from megamlm.data.loader import build_loader
    from megamlm.distributed.topology import build_topology
    from megamlm.tokenizer import Tokenizer

    topo = build_topology(vp)
    tok = Tokenizer(tok_path)
    cfg = F.loader_config(shards_dir, num_workers=workers)
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
