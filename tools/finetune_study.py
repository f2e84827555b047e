#!/usr/bin/env python
"""Does pretraining help downstream? Fine-tune one checkpoint and the same architecture from random
initialisation on every task of ``configs/finetune/``, frozen and full, over several seeds; write a table.

    python tools/finetune_study.py runs/tiny-cpu-long/checkpoints --out runs/finetune-study

Each (task, mode, init) cell is one ``megamlm finetune ... --seeds N`` run; the table reports the median
test metric (F1 for BIO tagging, accuracy for classification) with its min–max, and the margin of the
pretrained encoder over the random one. Both inits get the same recipe: the task config's own for full
fine-tuning, and a linear-probe recipe for the frozen encoder (a frozen encoder needs a larger head
learning rate and more epochs before its head moves off the majority class).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"wnut16": "f1", "wiki-topic": "accuracy", "wiki-pair": "accuracy"}
FROZEN_RECIPE = ["optim.head_lr=0.1", "train.epochs=20", "train.patience=5"]


def run_cell(task: str, mode: str, init: str, checkpoint: str, out: Path, seeds: int, extra: list[str]) -> dict:
    cell = out / f"{task}-{mode}-{init}"
    args = [sys.executable, "-m", "megamlm", "finetune", str(ROOT / "configs/finetune" / f"{task}.yaml"),
            f"init.checkpoint={checkpoint}", f"init.random={'true' if init == 'random' else 'false'}",
            f"train.freeze_encoder={'true' if mode == 'frozen' else 'false'}", f"train.output_dir={cell}",
            "--seeds", str(seeds), "--resume", "none"]
    if mode == "frozen":
        args += FROZEN_RECIPE
    args += extra
    print("$", " ".join(args[1:]), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)
    if seeds > 1:
        return json.loads((cell / "seeds.json").read_text())["test"]
    test = json.loads((cell / "summary.json").read_text())["test"]  # one seed: the run is the cell itself
    return {k: {"median": v, "min": v, "max": v, "std": 0.0, "values": [v]} for k, v in test.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pretrained megamlm checkpoint folder (the wiki tasks need one "
                   "pretrained with held-out articles: data.val_fraction=0.3)")
    p.add_argument("--out", default="runs/finetune-study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--modes", nargs="+", default=["frozen", "full"], choices=["frozen", "full"])
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for every run (after the recipe's)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study = out / "study.json"
    results = json.loads(study.read_text()) if study.exists() else {}  # cells of earlier calls are kept
    for task in a.tasks:
        for mode in a.modes:
            r = {init: run_cell(task, mode, init, a.checkpoint, out, a.seeds, a.set)[TASKS[task]]
                 for init in ("pretrained", "random")}
            results[f"{task}/{mode}"] = {"metric": TASKS[task], "checkpoint": a.checkpoint, **r}
            study.write_text(json.dumps(results, indent=1) + "\n")
    rows = ["| task | mode | metric | pretrained median (min–max) | random median (min–max) | margin |",
            "|---|---|---|---|---|---|"]
    for cell, r in results.items():
        task, mode = cell.split("/")
        pre, rnd = r["pretrained"], r["random"]
        rows.append(f"| {task} | {mode} | {r['metric']} | {pre['median']:.3f} ({pre['min']:.3f}–{pre['max']:.3f}) | "
                    f"{rnd['median']:.3f} ({rnd['min']:.3f}–{rnd['max']:.3f}) | {pre['median'] - rnd['median']:+.3f} |")
    (out / "study.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
