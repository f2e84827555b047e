"""The GPU check's stages and report (tools/gpu_check.sh runs this after setting up the Python).

Each stage is a command with its own time limit; a stage that fails or runs out of time is recorded with
its exit status and the tail of its output, and the next one runs. ``OUT/report.json`` holds every
stage's command, status, time and parsed results; ``OUT/report.md`` the same for a person (the README's
GPU section is written from it).

Stages (``--smoke`` runs each at a toy size on the CPU, to check the script itself anywhere):

1. ``env``: the GPU, torch and CUDA versions, the libraries megamlm needs.
2. ``tests``: ``tests/gpu`` (the CUDA path against its references: HF parity, packed attention, the
   cross-entropy, the sampler), skipped by CI, which has no GPU.
3. ``bench-128``: ``megamlm bench model --device cuda``, 256 rows of 128, BERT-base shape (H=768, 12
   layers, 12 heads, FFN 3072, V=30522), bf16, rows padded to lengths in [T/2, T]: megamlm packed,
   megamlm padded and HF ``BertForPreTraining`` (sdpa) in the same run, interleaved; MFU against the
   measured GEMM and against the GPU's datasheet peak.
4. ``pretrain``: ``megamlm pretrain`` (NCCL, ZeRO 1, bf16, packed) of a BERT-base-shaped model on the
   default corpus's shards (made by ``megamlm prepare configs/tiny-cpu.yaml``: runs/wiki-vital) for 200
   steps at 256 x 128 tokens per step: its tokens/s, MFU and losses read back from TensorBoard, and two
   steps traced by the profiler (``pretrain-profile.txt``: the profiler's table).
5. ``bench-128-compile``: stage 3 with ``--compile`` (megamlm's blocks under torch.compile).
6. ``bench-128-nodropout``: stage 3 with no dropout, where packed attention is ``varlen_attn``'s flash.
7. ``bench-512``: stage 3 at seq 512, 64 rows.

The stages run in this order (what a short lease must see first comes first), each under its own time
limit; ``--report DIR`` rewrites report.json / report.md there after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BERT_BASE = ["--hidden-size", "768", "--num-layers", "12", "--num-heads", "12", "--ffn-size", "3072",
             "--vocab-size", "30522"]
TOY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "2", "--ffn-size", "128", "--vocab-size", "1000"]


def stages(out: Path, smoke: bool, tests: bool, data: list[str]) -> list[dict]:
    """The stages in the order they run: what a short device lease must see first comes first (the CUDA
    tests, the seq-128 benchmark, the NCCL pretraining run), the compiled benchmark last."""
    py = sys.executable
    dev = "cpu" if smoke else "cuda"
    shape, prec = (TOY, "fp32") if smoke else (BERT_BASE, "bf16")
    timing = ["--rounds", "2", "--steps", "1", "--warmup", "1"] if smoke else ["--rounds", "5", "--steps", "5"]

    def bench(name: str, seq: int, batch: int, timeout: int, *extra: str) -> dict:
        cmd = [py, "-m", "megamlm", "bench", "model", *shape, "--seq-len", str(seq), "--batch-size", str(batch),
               "--precision", prec, "--device", dev, "--padding", "--models", "megamlm+packed,megamlm,hf",
               "--no-memory", *timing, "--json", str(out / f"{name}.json"), *extra]
        return {"name": name, "cmd": cmd, "timeout": timeout, "json": out / f"{name}.json"}

    s = [{"name": "env", "cmd": [py, str(Path(__file__)), "--env"], "timeout": 60}]
    if tests:  # the CUDA path against its references (tests/gpu: skipped where there is no GPU)
        s.append({"name": "tests", "cmd": [py, "-m", "pytest", "-q", "-rs", "tests/gpu", "-p", "no:cacheprovider"],
                  "timeout": 120})
    # 256 x 128 and 64 x 512 tokens per step: the per-GPU micro-batches of BERT-base recipes (NVIDIA's, MosaicBERT)
    s.append(bench("bench-128", 128 if not smoke else 32, 256 if not smoke else 4, 150))
    s.append(_pretrain_stage(out, smoke, data))
    if not smoke:
        s.append(bench("bench-128-compile", 128, 256, 240, "--compile"))
        # no dropout: the packed rows take flash attention over the stream (varlen_attn), as MosaicBERT's
        s.append(bench("bench-128-nodropout", 128, 256, 120, "--dropout", "0"))
    s.append(bench("bench-512", 512 if not smoke else 64, 64 if not smoke else 2, 150))
    return s


def _pretrain_stage(out: Path, smoke: bool, data: list[str]) -> dict:
    run = out / "pretrain"
    over = [f"train.output_dir={run}", "train.eval_every=0", "checkpoint.every_steps=0", "train.log_every=10",
            "objective.pair=nsp", "data.packing=true", *data]
    if smoke:
        over += ["model.num_layers=1", "train.max_steps=20", "engine.zero_stage=1", "train.profile_steps=[15,16]"]
    else:
        over += ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.ffn_size=3072",
                 "data.seq_len=128", "data.micro_batch_size=256", "engine.global_batch_size=256",
                 "engine.precision=bf16", "engine.zero_stage=1", "train.max_steps=200", "data.num_workers=4",
                 "train.profile_steps=[150,151]"]
    cmd = [sys.executable, "-m", "megamlm", "pretrain", str(ROOT / "configs/tiny-cpu.yaml"), *over]
    return {"name": "pretrain", "cmd": cmd, "timeout": 180, "tb": run / "tb", "profile": run / "profile"}


def run_stage(st: dict) -> dict:
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        r = subprocess.run(st["cmd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=st["timeout"])
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}"
        text = text.decode() if isinstance(text, bytes) else text
    res = {"name": st["name"], "cmd": " ".join(str(c) for c in st["cmd"]), "rc": rc,
           "seconds": round(time.time() - t0, 1), "tail": text[-4000:]}
    if rc == 0 and "json" in st:
        res["result"] = _bench_summary(json.loads(Path(st["json"]).read_text()))
    if "tb" in st and Path(st["tb"]).exists():
        res["result"] = _tb_summary(Path(st["tb"]))
    tables = sorted(Path(st["profile"]).glob("*.txt")) if "profile" in st else []
    if tables:
        res["profile"] = tables[0].read_text()
    return res


def _bench_summary(r: dict) -> dict:
    models = {n: {k: m.get(k) for k in ("tokens_per_s_median", "step_s_median", "mfu", "mfu_datasheet")}
              for n, m in r["models"].items()}
    return {"models": models, "ratios": {k: v["median"] for k, v in r.get("ratios", {}).items()},
            "padding_share": r.get("padding_share"), "matmul_peak_flops": r.get("matmul_peak_flops")}


def _tb_summary(tb: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from megamlm.telemetry import read_scalars

    want = ("train/loss", "train/tokens_per_second", "train/mfu", "train/mfu_datasheet", "train/memory_gb",
            "train/host_syncs_per_step", "train/data_wait_ms_max", "train/step_ms_max")
    out = {}
    for tag in want:
        vals = read_scalars(tb, tag)
        if vals:
            steps = sorted(vals)
            out[tag] = {"first": vals[steps[0]], "last": vals[steps[-1]], "steps": steps[-1]}
    return out


def env_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count()}
    for mod in ("deepspeed", "webdataset", "sentencepiece", "transformers", "tensorboard"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, the stages that need it fail on their own
            info[mod] = f"missing ({e.__class__.__name__})"
    return info


def markdown(report: dict) -> str:
    e = report["env"]
    lines = [f"# megamlm GPU check, {report['date']}", "",
             f"{e.get('gpu') or 'no GPU'} x{e.get('gpus')}, torch {e.get('torch')} (CUDA {e.get('cuda')}), "
             f"DeepSpeed {e.get('deepspeed')}, Python {e.get('python')}", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {'ok' if s['rc'] == 0 else 'rc ' + str(s['rc'])} | {s['seconds']} |"
              for s in report["stages"]]
    for s in report["stages"]:
        r = s.get("result")
        if not r or "models" not in r:
            continue
        lines += ["", f"## {s['name']} ({100 * (r.get('padding_share') or 0):.0f}% padding)", "",
                  "| model | tokens/s | step ms | MFU (measured GEMM) | MFU (datasheet) |", "|---|---|---|---|---|"]
        for n, m in r["models"].items():
            ds = m.get("mfu_datasheet")
            lines.append(f"| {n} | {m['tokens_per_s_median']:.0f} | {1e3 * m['step_s_median']:.1f} | "
                         f"{100 * m['mfu']:.1f}% | {'' if ds is None else f'{100 * ds:.1f}%'} |")
        first = next(iter(r["models"]))
        lines += [""] + [f"- {first} / {k}: {v:.2f}x (median of the per-round ratios)" for k, v in r["ratios"].items()]
    pre = next((s for s in report["stages"] if s["name"] == "pretrain" and s.get("result")), None)
    if pre:
        lines += ["", "## pretrain", ""] + [f"- {k}: {v['first']:.4g} → {v['last']:.4g} (step {v['steps']})"
                                             for k, v in pre["result"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run the GPU check's stages and write OUT/report.{json,md}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    p.add_argument("--smoke", action="store_true", help="every stage at a toy size on the CPU (checks the script)")
    p.add_argument("--no-tests", action="store_true", help="skip the test stage")
    p.add_argument("--only", default="", help="comma list of stage names to run")
    p.add_argument("--shards", help="the pretrain stage's shard folder (default: configs/tiny-cpu.yaml's, "
                   "runs/wiki-vital/shards)")
    p.add_argument("--tokenizer", help="the pretrain stage's tokenizer (default: configs/tiny-cpu.yaml's)")
    p.add_argument("--report", type=Path, help="where report.json / report.md go (default: --out), rewritten "
                   "after every stage, so a run cut short still leaves what it measured")
    p.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.env:
        print(json.dumps(env_info()))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    rep = a.report or a.out
    rep.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": a.smoke, "stages": []}
    only = {x for x in a.only.split(",") if x}
    data = ([f"data.shards_dir={a.shards}"] if a.shards else []) + ([f"tokenizer.model={a.tokenizer}"] if a.tokenizer else [])
    for st in stages(a.out, a.smoke, not a.no_tests, data):
        if only and st["name"] not in only:
            continue
        res = run_stage(st)
        if st["name"] == "env" and res["rc"] == 0:
            report["env"] = json.loads(res["tail"].strip().splitlines()[-1])
        report["stages"].append(res)
        print(f"[gpu_check] {res['name']}: rc {res['rc']} in {res['seconds']} s", flush=True)
        (rep / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if res.get("profile"):  # the profiler's table of two pretraining steps, for a person
            (rep / f"{res['name']}-profile.txt").write_text(res["profile"])
        (rep / "report.md").write_text(markdown({"env": {}, **report}))
    print((rep / "report.md").read_text())
    return 0 if all(s["rc"] == 0 for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
