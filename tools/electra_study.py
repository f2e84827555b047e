#!/usr/bin/env python
"""MLM against ELECTRA at equal training compute: how much does an objective where every token teaches buy?

    python tools/electra_study.py --budget 2e15 --out runs/electra-study

For each objective (``mlm``: BERT's masked LM without a pair task; ``electra``: replaced-token detection, its
generator's FLOPs included) and each share of the budget (``--fractions``, default 1/4, 1/2 and 1), one
pretraining run of the same encoder on the default corpus with its own full schedule, stopped after the
real tokens that spend that many training FLOPs (:func:`megamlm.flops.train_flops` per token: an ELECTRA
token costs its generator and its per-token head too, so it gets fewer tokens). Then every fine-tuning task
of ``configs/finetune/`` on each checkpoint's encoder (the discriminator for ELECTRA), frozen and full, over
``--seeds`` seeds (tools/finetune_study.py's cells and recipes). Written to ``--out``: ``study.json`` (every
number), ``study.md`` (the table: median test metric with min–max per task, mode, objective and budget) and
``study.png`` (the held-out metric against training FLOPs, one line per objective).

Runs that finished are kept: calling it again resumes where it stopped. The encoder, corpus and recipe are
the base config's (``--config``, default configs/tiny-cpu.yaml with 30% of the articles held out, as the
wiki tasks need); ``--set`` overrides it for every pretraining run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

OBJECTIVES = {"mlm": ["objective.name=mlm", "objective.pair=none"],
              "electra": ["objective.name=electra", "objective.pair=none"]}
BASE = ["data.val_fraction=0.3", "data.shards_dir=runs/wiki-vital-ft/shards"]  # README "Fine-tuning"


def load(config: str, overrides: list[str]):
    from megamlm.config import load_config

    return load_config(config, overrides)


def flops_per_token(cfg, real_vocab: int) -> float:
    """Training FLOPs per real token of ``cfg``'s model and objective, on full rows of data.seq_len with its
    masking share (the per-token cost barely depends on the row length at these sizes)."""
    from megamlm.bench_data import random_batch
    from megamlm.flops import generator_flops_shape, train_flops

    m = cfg.model
    b = random_batch(16, cfg.data.seq_len, real_vocab, cfg.objective.mlm_probability, pair=False, seed=0)
    return train_flops(b, m.hidden_size, m.num_layers, m.ffn_size, real_vocab, False,
                       generator_flops_shape(m, cfg.objective)) / b.n_tokens


def real_vocab_of(cfg) -> int:
    from megamlm.tokenizer import Tokenizer

    p = Path(cfg.tokenizer.model)
    return Tokenizer(str(p)).vocab_size if p.is_file() else cfg.tokenizer.vocab_size


def plan(config: str, overrides: list[str], budget: float, fractions: list[float]) -> list[dict]:
    """The pretraining runs: per objective and budget share, the FLOPs, FLOPs per token and real tokens."""
    runs = []
    for name, extra in OBJECTIVES.items():
        cfg = load(config, [*overrides, *extra])
        fpt = flops_per_token(cfg, real_vocab_of(cfg))
        for f in fractions:
            runs.append({"objective": name, "fraction": f, "flops": budget * f, "flops_per_token": fpt,
                         "max_tokens": int(budget * f / fpt), "overrides": [*overrides, *extra]})
    return runs


def _finished(run_dir: Path, max_tokens: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return False
    state = run_dir / "checkpoints" / latest.read_text().strip() / "train_state.json"
    return state.is_file() and json.loads(state.read_text()).get("consumed_tokens", 0) >= max_tokens


def pretrain(config: str, run: dict, out: Path, nproc: int) -> Path:
    d = out / "pretrain" / f"{run['objective']}-{run['fraction']:g}"
    if not _finished(d, run["max_tokens"]):
        launcher = ([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "-m"]
                    if nproc > 1 else [sys.executable, "-m"])
        args = [*launcher, "megamlm", "pretrain", config, *run["overrides"], f"train.max_tokens={run['max_tokens']}",
                "train.max_steps=0", "checkpoint.every_steps=0", "train.eval_every=0", f"train.output_dir={d}",
                "--resume", "auto"]
        print("$", " ".join(args[1:]), flush=True)
        subprocess.run(args, check=True, cwd=ROOT)
    return d / "checkpoints"


def table(results: dict) -> str:
    """The markdown table of ``study.json``'s results."""
    rows = ["| task | mode | metric | objective | training FLOPs | real tokens | median (min–max) |",
            "|---|---|---|---|---|---|---|"]
    for key in sorted(results):
        r = results[key]
        for cell, s in sorted(r["tasks"].items()):
            task, mode = cell.split("/")
            rows.append(f"| {task} | {mode} | {s['metric']} | {r['objective']} | {r['flops']:.3g} | {r['max_tokens']} | "
                        f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Held-out metric against training FLOPs: one panel per task and mode, one line per objective (median,
    min–max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({c for r in results.values() for c in r["tasks"]})
    fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.2), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for name in OBJECTIVES:
            pts = sorted((r["flops"], r["tasks"][cell]) for r in results.values()
                         if r["objective"] == name and cell in r["tasks"])
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1]["median"] for p in pts]
            err = [[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_title(cell)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(next(iter(results.values()))["tasks"].get(cell, {}).get("metric", "metric"))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from finetune_study import TASKS, run_cell

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="base pretraining config")
    p.add_argument("--budget", type=float, required=True, help="training FLOPs of the largest run")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--out", default="runs/electra-study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="pretraining processes (torchrun)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--modes", nargs="+", default=["frozen", "full"], choices=["frozen", "full"])
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for every pretraining run (after the study's own)")
    p.add_argument("--finetune-set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for every fine-tuning run")
    p.add_argument("--plan", action="store_true", help="print the runs (FLOPs, tokens) and stop")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    runs = plan(a.config, [*BASE, *a.set], a.budget, a.fractions)
    for r in runs:
        print(f"{r['objective']:>8} x{r['fraction']:g}: {r['flops']:.3g} FLOPs = {r['max_tokens']} real tokens "
              f"({r['flops_per_token']:.3g} FLOPs per token)")
    if a.plan:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cfg = load(a.config, [*BASE, *a.set])
    if not (Path(cfg.data.shards_dir) / "manifest.json").is_file():  # the held-out split the wiki tasks need
        subprocess.run([sys.executable, "-m", "megamlm", "prepare", a.config, *BASE, *a.set], check=True, cwd=ROOT)
    study = out / "study.json"
    results = json.loads(study.read_text()) if study.exists() else {}
    for r in sorted(runs, key=lambda r: (-r["fraction"], r["objective"])):  # both objectives' largest budget first
        key = f"{r['objective']}-{r['fraction']:g}"
        ckpt = pretrain(a.config, r, out, a.nproc)
        entry = results.setdefault(key, {k: r[k] for k in ("objective", "fraction", "flops", "flops_per_token",
                                                            "max_tokens")})
        entry.setdefault("tasks", {})
        for task in a.tasks:
            for mode in a.modes:
                if f"{task}/{mode}" in entry["tasks"]:
                    continue
                stats = run_cell(task, mode, "pretrained", str(ckpt), out / "finetune" / key, a.seeds, a.finetune_set)
                entry["tasks"][f"{task}/{mode}"] = {"metric": TASKS[task], **stats[TASKS[task]]}
                study.write_text(json.dumps(results, indent=1) + "\n")
        (out / "study.md").write_text(table(results))  # a partial study is readable as it goes
        plot(results, out / "study.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
