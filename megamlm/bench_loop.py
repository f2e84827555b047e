"""``megamlm bench loop CONFIG [overrides]``: the real pretraining loop against the bare training step of
the same model on the same batches, interleaved, in one process.

Round r runs ``--steps`` steps of the loop exactly as ``megamlm pretrain`` takes them
(:meth:`megamlm.trainer.Trainer.run_steps`: the shard loader, the DeepSpeed engine at the config's ZeRO
stage, the step's counts, the state, the log lines and TensorBoard every ``train.log_every`` steps), then
the same micro-batches again through the bare step: the same model (same init, same ops backend), the
client optimizer alone, the same loss arithmetic, no engine, no loader, no logging. Both count the same
real tokens, so the ratio of their times is the share of the model's speed the loop keeps; the loop's
time is split into the data wait (taking micro-batches from the loader), the step and the rest (counts,
logging). Rounds alternate so that drifts in machine speed hit both; we report medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _bare_step(cfg, trainer):
    """The model's own training step on a micro-batch list, as the trainer divides it (global counts)."""
    from megamlm import ops
    from megamlm.engine import AdamSettings, build_optimizer, select_ops
    from megamlm.model.pretraining import build_model, weight_decay_groups
    from megamlm.objectives import batch_denominators, objective_weights, weighted_sum

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.objective, trainer.tok.padded_vocab_size, trainer.tok.vocab_size)
    ops.use(model, select_ops(cfg.engine)[0])
    opt = build_optimizer(weight_decay_groups(model, cfg.optim.weight_decay), cfg.engine, AdamSettings.of(cfg.optim))
    weights = objective_weights(cfg.objective)

    def step(micro) -> None:
        counts = batch_denominators(micro)
        for b in micro:
            weighted_sum(model(b), counts, weights).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def loop_vs_bare(cfg, steps: int = 10, rounds: int = 5, warmup: int = 2) -> dict:
    from megamlm.distributed.env import DistEnv
    from megamlm.engine import disable_ds_shm_op, init_distributed, shutdown
    from megamlm.pretrain import build_run

    disable_ds_shm_op()
    de = DistEnv(launcher="single")
    init_distributed(de, "gloo")
    trainer = build_run(cfg, de, None, None, None).trainer
    bare = _bare_step(cfg, trainer)
    record: list = []
    trainer.run_steps(warmup, record)
    for micro in record:
        bare(micro)
    rows = []
    for _ in range(rounds):
        record = []
        t0 = time.perf_counter()
        results = trainer.run_steps(steps, record)
        loop_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for micro in record:
            bare(micro)
        bare_s = time.perf_counter() - t0
        wait = sum(r.data_wait_s for r in results)
        step = sum(r.step_s for r in results)
        rows.append({"loop_s": loop_s, "bare_s": bare_s, "data_wait_s": wait, "step_s": step,
                     "rest_s": loop_s - wait - step, "tokens": sum(b.n_tokens for m in record for b in m)})
    shutdown(trainer.engine, 1)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratios = sorted(r["bare_s"] / r["loop_s"] for r in rows)
    return {"rounds": rows, "loop_tokens_per_s": med["tokens"] / med["loop_s"],
            "bare_tokens_per_s": med["tokens"] / med["bare_s"], "loop_share_of_bare": statistics.median(ratios),
            "loop_share_min": ratios[0], "loop_share_max": ratios[-1],
            "split_of_loop": {k: med[k] / med["loop_s"] for k in ("data_wait_s", "step_s", "rest_s")}}


def main(argv: list[str] | None = None) -> int:
    from megamlm.config import load_config
    from megamlm.telemetry import setup_logging

    ap = argparse.ArgumentParser(prog="megamlm bench loop", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10, help="loop steps per round (default 10)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args(argv)
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(a.config, a.overrides)
        cfg = replace(cfg, train=replace(cfg.train, output_dir=d, eval_every=0),
                      checkpoint=replace(cfg.checkpoint, dir=str(Path(d) / "checkpoints")))
        res = loop_vs_bare(cfg, a.steps, a.rounds)
    s = res["split_of_loop"]
    print(f"loop {res['loop_tokens_per_s']:.0f} tok/s, bare step {res['bare_tokens_per_s']:.0f} tok/s: the loop keeps "
          f"{100 * res['loop_share_of_bare']:.1f}% (rounds {100 * res['loop_share_min']:.1f}-"
          f"{100 * res['loop_share_max']:.1f}%); of the loop's time: data wait {100 * s['data_wait_s']:.1f}%, step "
          f"{100 * s['step_s']:.1f}%, counts and logging {100 * s['rest_s']:.1f}%")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0
