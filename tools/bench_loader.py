#!/usr/bin/env python
"""Loader throughput per worker process (tar reading + examples + masking + collation).

    python tools/bench_loader.py configs/tiny-cpu.yaml [--pairs nsp sop none] [--maskings token span]
        [--micro-batch 16 32] [--max-tokens N] [--repeats 2] [section.key=value ...]

Needs the config's tokenizer and shards (``megamlm prepare CONFIG``). A thin front end over
``megamlm.data.bench.bench_loader``; prints one line per setting and, with --json, the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from megamlm.config import load_config
    from megamlm.data.bench import bench_loader
    from megamlm.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--pairs", nargs="+", default=["nsp", "sop", "none"])
    p.add_argument("--maskings", nargs="+", default=["token", "whole_word", "span"])
    p.add_argument("--micro-batch", nargs="+", type=int, default=[16, 32])
    p.add_argument("--max-tokens", type=int, default=0, help="stop each run after this many tokens (0 = one epoch)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    rows = bench_loader(cfg.data, cfg.objective, Tokenizer(cfg.tokenizer.model), pairs=a.pairs,
                        maskings=a.maskings, micro_batch_sizes=a.micro_batch, seed=cfg.train.seed,
                        max_tokens=a.max_tokens, repeats=a.repeats)
    for r in rows:
        print(f"{r['pair']:>4} {r['masking']:>10} seq {r['seq_len']} mb {r['micro_batch']:>3}: "
              f"{r['tokens_per_s'] / 1e3:8.0f}k tokens/s  {r['sequences_per_s']:7d} seq/s  "
              f"({r['tokens']} tokens in {r['seconds']}s, {r['target_share']:.1%} targets)")
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
