"""``megamlm bench engine``: what DeepSpeed adds per step, and how `pretrain` scales with processes.

Two measurements, each a ratio against a peer timed in the same run:

1. **Engine overhead** (one process): the same fixed micro-batches through (a) the bare model with
   ``torch.optim.AdamW`` and (b) a DeepSpeed engine at ZeRO 0, 1, 2 and 3 built by
   :func:`megamlm.engine.build_engine` with the trainer's loss arithmetic. Rounds interleave the
   variants; we report the median step time, min–max, and the overhead over the bare step.
2. **Scaling** (``--scaling``): ``megamlm pretrain`` on the given config through torchrun with 1 and 2
   processes on the same cores (1 process × N threads vs 2 × N/2), tokens/s read back from TensorBoard
   (median over the logged steps after the first few); reported as the ratio tokens/s(2) / tokens/s(1):
   on a fixed set of cores, 1.0 means data parallelism costs nothing over threading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _batches(cfg, n: int, vocab: int, seed: int = 0):
    from megamlm.bench import random_batch

    torch.manual_seed(seed)
    return [random_batch(cfg.data.micro_batch_size, cfg.data.seq_len, vocab, cfg.objective.mlm_probability)
            for _ in range(n)]


def _time_steps(step, batches, rounds: int) -> list[float]:
    times = []
    for r in range(rounds):
        b = batches[r % len(batches)]
        t = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t)
    return times


def _bare_step(cfg, vocab: int, w: dict):
    """One training step of the model and its client optimizer, no engine (``w``: the loss terms' weights)."""
    from megamlm.engine import AdamSettings, build_optimizer
    from megamlm.model.pretraining import build_model, weight_decay_groups
    from megamlm.objectives import batch_denominators, weighted_sum

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective, vocab)
    opt = build_optimizer(weight_decay_groups(model, cfg.optim.weight_decay), cfg.engine, AdamSettings.of(cfg.optim))

    def step(b):
        loss = weighted_sum(model(b), batch_denominators([b]), w)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _engine_step(cfg, vocab: int, w: dict, stage: int):
    """(one training step through a DeepSpeed engine at ZeRO ``stage``, the engine)."""
    from dataclasses import replace

    from megamlm.engine import build_engine
    from megamlm.model.pretraining import build_model
    from megamlm.objectives import batch_denominators, weighted_sum

    c = replace(cfg, engine=replace(cfg.engine, zero_stage=stage))
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(c.model, c.objective, vocab), c, 1)

    def step(b):
        loss = weighted_sum(engine(b), batch_denominators([b]), w)
        engine.backward(loss)
        engine.step()
    return step, engine


def engine_overhead(cfg, steps: int = 20, warmup: int = 3, stages=(0, 1, 2, 3)) -> dict:
    """Median step time of the bare model vs DeepSpeed engines (one process, this machine)."""
    from megamlm.distributed.env import DistEnv
    from megamlm.engine import disable_ds_shm_op, init_distributed

    vocab = cfg.model.vocab_size or 30592
    batches = _batches(cfg, 4, vocab)
    disable_ds_shm_op()
    init_distributed(DistEnv(master_port=29577), "gloo")
    from megamlm.objectives import objective_weights

    w = objective_weights(cfg.objective)
    variants = {"bare": _bare_step(cfg, vocab, w)}
    engines = []
    for s in stages:
        step, eng = _engine_step(cfg, vocab, w, s)
        variants[f"zero{s}"] = step
        engines.append(eng)
    for step in variants.values():  # warm-up
        _time_steps(step, batches, warmup)
    samples = {k: [] for k in variants}
    for _ in range(steps):  # interleaved rounds
        for k, step in variants.items():
            samples[k] += _time_steps(step, batches, 1)
    out = {}
    bare = statistics.median(samples["bare"])
    for k, v in samples.items():
        med = statistics.median(v)
        out[k] = {"median_ms": med * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3,
                  "overhead_ms": (med - bare) * 1e3, "ratio_to_bare": med / bare}
    tokens = sum(int(b.n_tokens) for b in batches) / len(batches)
    out["tokens_per_step"] = tokens
    for e in engines:
        e.destroy()
    return out


def scaling(config: str, overrides: list[str], steps: int, skip: int, nprocs=(1, 2)) -> dict:
    """tokens/s of `megamlm pretrain` under torchrun with 1 and 2 processes on the same cores."""
    from megamlm.telemetry import read_scalars

    cores = os.cpu_count() or 2
    out = {}
    for n in nprocs:
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // n, 1)), "DS_ACCELERATOR": "cpu"}
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(n), "--master_port",
                   str(29650 + n), "-m", "megamlm", "pretrain", config, *overrides, f"train.output_dir={d}",
                   f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "checkpoint.every_steps=0"]
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            tps = read_scalars(Path(d) / "tb", "train/tokens_per_second")
            vals = [v for s, v in sorted(tps.items()) if s > skip]
            out[f"procs{n}"] = {"tokens_per_second": statistics.median(vals), "min": min(vals), "max": max(vals),
                                "threads_per_process": max(cores // n, 1)}
    if len(nprocs) == 2:
        a, b = (out[f"procs{n}"]["tokens_per_second"] for n in nprocs)
        out["ratio"] = b / a
    return out


def main(argv: list[str] | None = None) -> int:
    from megamlm.config import load_config

    ap = argparse.ArgumentParser(prog="megamlm bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="config whose model/data/optim sections are used")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds per variant")
    ap.add_argument("--scaling", action="store_true", help="also time `pretrain` with 1 and 2 processes")
    ap.add_argument("--scaling-steps", type=int, default=60)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = {"engine": engine_overhead(cfg, args.steps)}
    for k, v in res["engine"].items():
        if isinstance(v, dict):
            print(f"{k:6s} median {v['median_ms']:8.1f} ms  (min {v['min_ms']:.1f}, max {v['max_ms']:.1f})  "
                  f"overhead {v['overhead_ms']:+7.1f} ms  x{v['ratio_to_bare']:.3f}")
    if args.scaling:
        res["scaling"] = scaling(args.config, args.overrides, args.scaling_steps, skip=5)
        for k, v in res["scaling"].items():
            print(k, v)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
