"""Vocabulary parallelism end to end: `megamlm pretrain` on real shards of the default corpus under torchrun,
vocab-parallel 2 × data-parallel 2 (4 processes) against vocab-parallel 1 × data-parallel 2, ZeRO 1 and 2.

The tokenizer has 1000 real pieces padded to 1024, so the second vocabulary shard holds 24 padded rows.
Both runs start from the same weights (the full model is built with the same seed, each rank keeps its
rows) and read the same batches with the same dropout streams, so per-step losses and gradient norms
(TensorBoard) must agree within 1e-5, and the final weights — the vocabulary shards concatenated in
vp-rank order — within 2e-5. A checkpoint saved with t=2 resumes with t=2 exactly; resuming it with t=1
fails before any process group with a message naming both sizes.

A failure points at megamlm/pretrain.py (the mpu, the parallelize call, the dropout seed per data-parallel
rank), megamlm/distributed/topology.py (Topology.mpu: DeepSpeed all-reduces and partitions over the wrong
group, or counts replicated parameters twice in the norm), megamlm/parallel/layers.py (the sharded
parameters' ``tensor_model_parallel`` tag) or megamlm/checkpoint.py (vocab_parallel.json, the size check).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e._runs import BIN, ROOT, clean_env, final_weights, free_port, launch, tb_scalars, tiny_prepared_config

REST = """
engine: {grad_clip: 1.0}
train: {max_steps: 20, log_every: 1, eval_every: 10, eval_batches: 2}
checkpoint: {every_steps: 10, keep_last: 5}
"""
STEPS = 20
SHARDED = ("encoder.embeddings.word_embeddings.weight", "mlm_head.decoder.bias")  # the layout contract
TIED = {"mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}  # an alias, not a tensor of its own


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    return tiny_prepared_config(tmp_path_factory.mktemp("vocab-parallel"), REST)


def pretrain(cfg: Path, out: Path, nproc: int, *over: str, resume: str | None = None) -> list[str]:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "megamlm",
           "pretrain", str(cfg), f"train.output_dir={out}", *over]
    return cmd + (["--resume", resume] if resume else [])


@pytest.fixture(scope="module")
def reference(cfg_file, tmp_path_factory):
    """vocab-parallel 1 × data-parallel 2, ZeRO 1."""
    out = tmp_path_factory.mktemp("t1")
    launch(pretrain(cfg_file, out, 2, "engine.zero_stage=1"))
    return out


@pytest.fixture(scope="module")
def vp_runs(cfg_file, tmp_path_factory):
    """vocab-parallel 2 × data-parallel 2 at ZeRO 1 and 2, by stage."""
    runs = {}
    for stage in (1, 2):
        out = tmp_path_factory.mktemp(f"t2-zero{stage}")
        launch(pretrain(cfg_file, out, 4, f"engine.zero_stage={stage}", "parallel.vocab_parallel_size=2"))
        runs[stage] = out
    return runs


def merged_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model from a vocab-parallel checkpoint, by its vocab_parallel.json."""
    layout = json.loads((ckpt / "vocab_parallel.json").read_text())
    t = layout["vocab_parallel_size"]
    shards = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", weights_only=False)["module"]
              for r in range(t)]
    out = {}
    for k, v in shards[0].items():
        if k in TIED:
            continue
        if k in layout["sharded"]:
            out[k] = torch.cat([s[k] for s in shards], dim=layout["sharded"][k])
        else:
            assert all(torch.equal(v, s[k]) for s in shards), f"{k} differs between vocab-parallel ranks"
            out[k] = v
    out.update({alias: out[source] for alias, source in TIED.items() if alias in shards[0]})
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_vocab_parallel_2_equals_vocab_parallel_1(stage, reference, vp_runs):
    out = vp_runs[stage]
    for tag, tol in (("train/loss", 1e-5), ("train/mlm_loss", 1e-5), ("train/grad_norm", 1e-5),
                     ("train/mlm_accuracy", 1e-6), ("eval/mlm_loss", 1e-5)):
        ref, got = tb_scalars(reference / "tb", tag), tb_scalars(out / "tb", tag)
        assert sorted(got) == sorted(ref) and ref, tag
        assert [got[k] for k in sorted(got)] == pytest.approx([ref[k] for k in sorted(ref)], abs=tol), tag
    assert sorted(tb_scalars(out / "tb", "train/loss")) == list(range(1, STEPS + 1))

    ck = out / "checkpoints" / f"step{STEPS:08d}"
    layout = json.loads((ck / "vocab_parallel.json").read_text())
    assert layout == {"vocab_parallel_size": 2, "padded_vocab_size": 1024, "real_vocab_size": 1000,
                      "sharded": {k: 0 for k in SHARDED}}
    assert sorted(p.name for p in ck.glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    shard = torch.load(ck / "mp_rank_01_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert shard["encoder.embeddings.word_embeddings.weight"].shape == (512, 64)
    assert shard["mlm_head.decoder.bias"].shape == (512,)
    assert torch.all(shard["mlm_head.decoder.bias"][1000 - 512:] == 0), "a padded row's bias was trained"

    ref_w = final_weights(reference / "checkpoints")
    w = merged_weights(ck)
    assert set(w) == set(ref_w)
    worst = max(float((w[k].float() - ref_w[k].float()).abs().max()) for k in w)
    assert worst < 2e-5, f"final weights differ by {worst}"
    ref_layout = json.loads((reference / "checkpoints" / f"step{STEPS:08d}" / "vocab_parallel.json").read_text())
    assert ref_layout["vocab_parallel_size"] == 1


def test_resume_with_the_same_vocab_parallel_size_is_exact(cfg_file, vp_runs, tmp_path):
    full = vp_runs[1]
    shutil.copytree(full / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / f"step{STEPS:08d}")
    launch(pretrain(cfg_file, tmp_path, 4, "engine.zero_stage=1", "parallel.vocab_parallel_size=2",
                    resume="step00000010"))
    a, b = tb_scalars(full / "tb", "train/loss"), tb_scalars(tmp_path / "tb", "train/loss")
    assert sorted(b) == list(range(11, STEPS + 1))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(b)], abs=1e-6)
    wa, wb = merged_weights(full / "checkpoints" / f"step{STEPS:08d}"), merged_weights(
        tmp_path / "checkpoints" / f"step{STEPS:08d}")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_another_vocab_parallel_size_fails_clearly(cfg_file, vp_runs, tmp_path):
    shutil.copytree(vp_runs[1] / "checkpoints", tmp_path / "checkpoints")
    r = subprocess.run([sys.executable, "-m", "megamlm", "pretrain", str(cfg_file), f"train.output_dir={tmp_path}",
                        "--resume", "auto"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert ("was saved with parallel.vocab_parallel_size=2 but this run uses parallel.vocab_parallel_size=1"
            in r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
