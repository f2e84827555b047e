"""tools/: the offline wheel folder (tools/wheels.py behind tools/setup.sh --build-wheels / --wheels) and the
GPU check (tools/gpu_check.sh / gpu_check.py), whose stages run at toy size on this CPU.

A failure points at tools/wheels.py (the dependency closure) or tools/gpu_check.py (a stage or the report).
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import wheels  # noqa: E402


def test_the_wheel_folder_holds_what_megamlm_needs_but_torch():
    """Everything megamlm needs at run time, at the installed versions, and nothing only torch needs (the
    cluster's CUDA build brings those)."""
    got = wheels.closure(["megamlm"], set())
    assert {"deepspeed", "webdataset", "sentencepiece", "tensorboard", "pyyaml", "safetensors", "braceexpand",
            "hjson", "pydantic"} <= set(got)
    assert not {"torch", "triton", "sympy", "networkx", "jinja2"} & set(got)
    assert got["deepspeed"] == metadata.version("deepspeed")
    assert "pytest" not in got and "transformers" not in got  # the test extra is not asked for
    assert "transformers" in wheels.closure(["megamlm"], {"test"})


def test_setup_refuses_a_folder_that_is_not_a_wheel_folder(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "tools/setup.sh"), "--wheels", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "has no requirements.txt: not a folder from --build-wheels" in r.stderr


@pytest.mark.slow
def test_the_gpu_check_runs_every_stage_at_toy_size_on_cpu(tmp_path):
    """--smoke: the same stages, commands and report as on a GPU, at a toy size on the CPU."""
    from tests import data_fixtures as F

    out = tmp_path / "check"
    r = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--smoke", "--no-tests", "--out", str(out),
                        "--shards", str(F.shards()), "--tokenizer", str(F.tokenizer_path())],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())
    assert r.returncode == 0, [(s["name"], s["rc"], s["tail"][-800:]) for s in report["stages"]]
    names = [s["name"] for s in report["stages"]]
    assert names == ["env", "bench-128", "pretrain", "bench-512"]
    assert "aten::" in (out / "pretrain-profile.txt").read_text()
    b = next(s for s in report["stages"] if s["name"] == "bench-128")["result"]
    assert set(b["models"]) == {"megamlm+packed", "megamlm", "hf"} and b["models"]["hf"]["tokens_per_s_median"] > 0
    assert b["ratios"]["megamlm"] > 0 and b["padding_share"] > 0
    pre = next(s for s in report["stages"] if s["name"] == "pretrain")["result"]
    assert pre["train/loss"]["steps"] == 20 and pre["train/tokens_per_second"]["last"] > 0
    md = (out / "report.md").read_text()
    assert "| bench-512 | ok |" in md and "| megamlm+packed |" in md and "## pretrain" in md


def test_the_electra_study_gives_both_objectives_the_same_flops_and_draws_its_table_and_plot(tmp_path):
    """tools/electra_study.py: each objective's token budget spends the same training FLOPs (an ELECTRA token
    costs more: its generator and per-token head, so it gets fewer tokens), the FLOPs per token are those of
    megamlm.flops; the table and the plot come from study.json's numbers."""
    import electra_study

    runs = electra_study.plan("configs/tiny-cpu.yaml", ["tokenizer.model=/nonexistent.model"], 1e15, [0.5, 1.0])
    by = {(r["objective"], r["fraction"]): r for r in runs}
    assert set(by) == {("mlm", 0.5), ("mlm", 1.0), ("electra", 0.5), ("electra", 1.0)}
    for r in runs:
        assert r["max_tokens"] * r["flops_per_token"] == pytest.approx(r["flops"], rel=1e-6)
    assert by[("electra", 1.0)]["flops_per_token"] > by[("mlm", 1.0)]["flops_per_token"]
    assert by[("electra", 1.0)]["max_tokens"] < by[("mlm", 1.0)]["max_tokens"]
    stats = {"median": 0.5, "min": 0.4, "max": 0.6}
    results = {f"{o}-{f:g}": {"objective": o, "fraction": f, "flops": 1e15 * f, "max_tokens": by[(o, f)]["max_tokens"],
                              "tasks": {"wnut16/full": {"metric": "f1", **stats}}} for o, f in by}
    text = electra_study.table(results)
    assert text.count("| wnut16 | full | f1 |") == 4 and "0.500 (0.400–0.600)" in text
    png = electra_study.plot(results, tmp_path / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
