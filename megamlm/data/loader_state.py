"""The loader's state (:class:`~megamlm.data.loader.Loader` inherits it): its position as plain ints,
identical on every rank, and the resume from it, on the same layout (bit-exact) or another one (the
epoch's rest redistributed: elastic.py). The format is described in loader.py's docstring ("Resume")."""

from __future__ import annotations

import logging

import torch

from megamlm.data.elastic import carry_over
from megamlm.data.shard_format import ShardError
from megamlm.data.stream import WORKER_COUNTERS, Cursor
from megamlm.data.units import epoch_units

log = logging.getLogger("megamlm.data.loader")

__all__ = ["LoaderState", "STATE_FORMAT", "STATS", "other_shards"]

STATE_FORMAT = "megamlm-loader/2"  # 2: cursors hold their window's end, and the epoch's elastic plan
_FORMATS = ("megamlm-loader/1", STATE_FORMAT)
STATS = WORKER_COUNTERS + ("batches", "tokens", "targets", "dropped_batches", "dropped_examples", "epochs")


def other_shards(state: dict, shards_id: str, shards_dir) -> str:
    """Why a loader ``state`` cannot resume over the shards ``shards_id`` of ``shards_dir`` ('' when it can, or
    when the state is from before it recorded its shards)."""
    saved = state.get("shards") or {}
    if not saved or saved.get("id") == shards_id:
        return ""
    return (f"the loader state was saved over the {saved.get('split')!r} shards of {saved.get('dir')} and this "
            f"run reads other shards ({shards_dir}: data.shards_dir): its position points into other data. "
            f"Resume with the same shards, or start a new run from the checkpoint's weights with --init-from")


class LoaderState:
    """state_dict / load_state_dict / mark of :class:`~megamlm.data.loader.Loader` (its attributes: ds,
    topology, group, num_workers, stats, _epoch_start, batches_in_epoch, _next_worker, _mark, reset())."""

    def _position(self) -> tuple[int, list[int]]:
        """This rank's position: the epoch and the ints of its share of the state (local, cheap)."""
        cur = [x for c in self.ds.cursors for x in c.as_list()]
        return self.epoch, ([self.batches_in_epoch, self._next_worker] + cur + [int(self.stats[k]) for k in STATS]
                            + [int(self._epoch_start[k]) for k in STATS])

    def mark(self) -> None:
        """Remember this position (no collective): ``state_dict(at_mark=True)`` returns it later. The trainer
        marks before taking a step's micro-batches, so a stop in the middle of them can save the state
        from before them (they were not trained on; the resumed run reads them again)."""
        self._mark = self._position()

    def state_dict(self, at_mark: bool = False) -> dict:
        """Plain ints and lists, identical on every rank. Collective over the data-parallel ranks: call it
        on all of them together (the trainer does, at each checkpoint). ``at_mark``: the position of the
        last :meth:`mark` instead of the current one."""
        if at_mark and self._mark is None:
            raise RuntimeError("Loader.state_dict(at_mark=True) without a mark() before it")
        epoch, mine = self._mark if at_mark else self._position()
        n = 2 + 5 * len(self.ds.cursors)  # batches, next_worker, the cursors; then stats, epoch_start
        ranks = [mine]
        if self.topology.world_size > 1:  # over every rank; a vocab-parallel group's ranks hold one position
            import torch.distributed as dist

            t = torch.tensor(mine, dtype=torch.int64)
            out = [torch.zeros_like(t) for _ in range(self.topology.world_size)]
            dist.all_gather(out, t, group=self.group)
            ranks = [o.tolist() for o in out[::self.topology.vp_size]]  # rank = dp_rank * vp_size + vp_rank
        plan = [[list(p) for p in w] for w in self.ds.plan] if self.ds.plan and self.ds.plan_epoch == epoch else None
        return {"format": STATE_FORMAT, "epoch": epoch, "seed": self.ds.seed, "dp_size": self.topology.dp_size,
                "num_workers": self.num_workers, "packing": self.ds.token_budget if self.ds.packing else 0,
                "plan": plan, "shards": {"dir": str(self.ds.dir), "split": self.ds.split, "id": self.ds.shards_id},
                "ranks": [
                    {"batches": r[0], "next_worker": r[1],
                     "workers": [r[2 + 5 * w: 7 + 5 * w] for w in range(len(self.ds.cursors))],
                     "stats": dict(zip(STATS, r[n:n + len(STATS)])),
                     "epoch_start": dict(zip(STATS, r[n + len(STATS):]))} for r in ranks]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state``. Saved with another data-parallel size or worker count (format 2): the
        epoch's rest is redistributed (elastic.py) and every rank computes the same new plan; format 1
        (without the windows' ends) or an epoch whose units depend on the rank count: the next epoch."""
        if not isinstance(state, dict) or state.get("format") not in _FORMATS:
            raise ValueError(f"not a loader state ({STATE_FORMAT}): {str(state)[:200]}")
        epoch = int(state["epoch"])
        why = other_shards(state, self.ds.shards_id, self.ds.dir)
        if why:
            raise ShardError(why)
        if int(state["seed"]) != self.ds.seed:
            log.warning("loader state saved with seed %s, resumed with seed %s: the data order changes",
                        state["seed"], self.ds.seed)
        saved, now = int(state.get("packing", 0)), self.ds.token_budget if self.ds.packing else 0
        if saved != now:  # the cursors count examples, whatever the layout: the stream goes on exactly
            log.info("loader state saved %s, resumed %s: the examples go on from where they stopped, only "
                     "where micro-batches end changes", _layout(saved), _layout(now))
        if state["dp_size"] != self.topology.dp_size or state["num_workers"] != self.num_workers:
            self._resume_elsewhere(state, epoch)
            return
        mine = state["ranks"][self.topology.dp_rank]
        self.ds.epoch = epoch
        self.ds.set_plan(epoch, state.get("plan"))
        self.ds.cursors = [Cursor.from_list(c) for c in mine["workers"]]
        self.batches_in_epoch, self._next_worker = int(mine["batches"]), int(mine["next_worker"])
        if "stats" in mine:  # the counters continue (telemetry's data_*); a state from before they were saved
            self.stats.update({k: int(v) for k, v in mine["stats"].items() if k in self.stats})
            self._epoch_start.update({k: int(v) for k, v in mine["epoch_start"].items() if k in self._epoch_start})
        else:  # has none: they count from here
            log.info("loader state without counters (an older checkpoint): the data_* counters restart at 0")

    def _resume_elsewhere(self, state: dict, epoch: int) -> None:
        """A state of ``dp_size`` × ``num_workers`` other than ours: the rest of its epoch over our ranks and
        workers (elastic.py); the saved ranks' counters are summed into data-parallel rank 0."""
        old_p, old_w, P, W = int(state["dp_size"]), int(state["num_workers"]), self.topology.dp_size, self.num_workers
        old_units = epoch_units(self.ds.samples, self.ds.seed, epoch, old_p, self.ds.shuffle)
        plan, why = carry_over(state, STATE_FORMAT, self.ds.units(epoch), old_units, P * max(1, W))
        if plan is None:
            log.warning("loader state saved with %d data-parallel rank(s) x %d worker(s), resumed with %d x %d: "
                        "%s, so the position cannot be carried over; starting epoch %d", old_p, old_w, P, W, why,
                        epoch + 1)
            self.reset(epoch + 1)
            return
        self.reset(epoch)
        self.ds.set_plan(epoch, plan)
        self.batches_in_epoch = int(state["ranks"][0]["batches"])
        for key, into in (("stats", self.stats), ("epoch_start", self._epoch_start)):
            if self.topology.dp_rank == 0 and all(key in r for r in state["ranks"]):
                into.update({k: sum(int(r[key].get(k, 0)) for r in state["ranks"]) for k in into})
        log.info("loader state saved with %d data-parallel rank(s) x %d worker(s), resumed with %d x %d: the %d "
                 "units left of epoch %d are redistributed, each example still read once", old_p, old_w, P, W,
                 sum(hi - lo for w in plan for lo, hi, _, _ in w), epoch)


def _layout(budget: int) -> str:
    return f"packed ({budget} tokens per micro-batch)" if budget else "padded (data.packing=false)"
