"""``megamlm finetune ... --report``: a PNG of the validation metrics over steps (matplotlib, Agg) and a
markdown + JSON summary of the run(s) in ``<output_dir>``."""

from __future__ import annotations

import json
from pathlib import Path

from megamlm.finetune.metrics import seed_summary

__all__ = ["write_report"]

_MAIN = ("accuracy", "macro_f1", "f1", "precision", "recall")


def write_report(out_dir: str | Path, summaries: list[dict]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--report draws report.png with matplotlib: pip install 'megamlm[finetune]' "
                          "(or matplotlib)") from e
    keys = [k for k in _MAIN + ("loss",) if any(k in h for s in summaries for h in s["history"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for s in summaries:
            pts = [(h["step"], h[k]) for h in s["history"] if k in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"seed {s['seed']}")
        ax.set_title(f"validation {k}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    written.append(png)
    agg = seed_summary([s["test"] for s in summaries])
    s0 = summaries[0]
    doc = {"task": s0["task"], "reader": s0["reader"], "init": s0["init"], "freeze_encoder": s0["freeze_encoder"],
           "labels": s0["labels"], "sizes": s0["sizes"], "metric": s0["metric"],
           "seeds": [s["seed"] for s in summaries], "test": agg,
           "runs": [{k: s[k] for k in ("seed", "best_step", "steps", "early_stopped", "validation_best", "test",
                                       "seconds")} for s in summaries]}
    (out_dir / "report.json").write_text(json.dumps(doc, indent=1))
    written.append(out_dir / "report.json")
    lines = [f"# Fine-tuning report: {s0['task']} ({s0['reader']})", "",
             f"- init: `{s0['init']}`, encoder {'frozen' if s0['freeze_encoder'] else 'trained'}",
             "- examples: " + ", ".join(f"{k} {v}" for k, v in s0["sizes"].items()) + f"; {len(s0['labels'])} labels",
             f"- seeds: {doc['seeds']}; best weights chosen on validation {s0['metric']}", "",
             "| test metric | median | min | max | std |", "|---|---|---|---|---|"]
    for k, v in agg.items():
        if k in _MAIN + ("loss",):
            lines.append(f"| {k} | {v['median']:.4f} | {v['min']:.4f} | {v['max']:.4f} | {v['std']:.4f} |")
    lines += ["", "![validation metrics](report.png)"]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    written.append(out_dir / "report.md")
    return written
