"""Entry for engine tests: `python run_replay.py OUT_JSON CONFIG [overrides...]` under any launcher.

Trains with :class:`ReplaySource` (or the real shard loader when ``--shards`` is given) and writes
rank 0's summary — per-step losses, final state — to OUT_JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megamlm.config import load_config  # noqa: E402
from megamlm.distributed.env import from_environ  # noqa: E402
from megamlm.engine import batch_plan  # noqa: E402
from megamlm.pretrain import pretrain  # noqa: E402
from megamlm.telemetry import setup_logging  # noqa: E402
from tests.e2e.replay_source import ReplaySource  # noqa: E402


def _inject_nan(steps: set[int]) -> None:
    """Wrap the model's forward so the MLM loss of the given optimizer steps is NaN (test harness only)."""
    import megamlm.model.pretraining as mp

    original = mp.PretrainingModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        terms = original(self, batch)
        if self.training:
            calls["n"] += 1
            acc = int(os.environ.get("MEGAMLM_TEST_ACCUMULATION", "1"))
            step = (calls["n"] - 1) // acc + 1
            if step in steps:
                terms.loss_sum["mlm"] = terms.loss_sum["mlm"] * float("nan")
        return terms

    mp.PretrainingModel.forward = forward


def main() -> None:
    out, config, *over = sys.argv[1:]
    resume = None
    nan_at: set[int] = set()
    while over and over[0].startswith("--"):
        key, _, value = over.pop(0)[2:].partition("=")
        if key == "resume":
            resume = value
        elif key == "nan-at":  # fault injection: the loss of these (1-based) steps becomes NaN
            nan_at = {int(x) for x in value.split(",")}
    if nan_at:
        _inject_nan(nan_at)
    de = from_environ()
    cfg = load_config(config, over, world_size=de.world_size)
    setup_logging("INFO")
    acc = batch_plan(cfg, de.world_size).accumulation
    result = pretrain(cfg, resume, batch_source=lambda topo, state: ReplaySource(topo, state, acc))
    if de.rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": result["losses"], "state": result["state"]}, f)


if __name__ == "__main__":
    main()
