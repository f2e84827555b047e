"""DeepSpeed engine arithmetic: 2 data-parallel ranks at ZeRO 0–3 against one process with the same
global batch (2 micro-batches accumulated), fp32.

Both see exactly the same sequences per step (tests/e2e/replay_source.py), so any difference is in the
engine: loss scaling over ranks and micro-batches (megamlm/trainer.py, objectives.combine), ZeRO's
partitioning, or checkpoint consolidation. Tolerances: per-step loss 1e-5 absolute; final weights 2e-5.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e._runs import ROOT, clean_env, final_weights, final_weights_at, launch, read_json, tiny_tokenizer, torchrun

CFG = """
tokenizer: {model: %(tok)s}
model: {hidden_size: 64, num_layers: 2, num_heads: 2, ffn_size: 128, max_position_embeddings: 64,
        dropout: 0.0, attention_dropout: 0.0}
data: {seq_len: 32, micro_batch_size: 8}
optim: {lr: 5.0e-3, warmup_steps: 1}
engine: {grad_clip: 1.0}
train: {max_steps: 6, log_every: 1, eval_every: 0}
checkpoint: {every_steps: 0}
"""
SCRIPT = str(ROOT / "tests/e2e/run_replay.py")


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    tok = tiny_tokenizer(d)
    p = d / "cfg.yaml"
    p.write_text(CFG % {"tok": tok.path})
    return p


@pytest.fixture(scope="module")
def reference(cfg_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    launch([sys.executable, SCRIPT, str(out / "r.json"),
            str(cfg_file), f"train.output_dir={out}", "engine.global_batch_size=16", "engine.zero_stage=0"], threads=2)
    return read_json(out / "r.json"), final_weights(out / "checkpoints")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_equal_one_process_with_accumulation(stage, cfg_file, reference, tmp_path):
    ref, ref_w = reference
    launch(torchrun(2, SCRIPT, str(tmp_path / "r.json"), str(cfg_file), f"train.output_dir={tmp_path}",
                    f"engine.zero_stage={stage}"))
    got = read_json(tmp_path / "r.json")
    assert len(got["losses"]) == len(ref["losses"]) == 6
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert got["state"]["consumed_samples"] == ref["state"]["consumed_samples"] == 6 * 16
    w = final_weights(tmp_path / "checkpoints")
    assert set(w) == set(ref_w)
    worst = max(float((w[k].float() - ref_w[k].float()).abs().max()) for k in w)
    assert worst < 2e-5, f"final weights differ by {worst}"
    # The model learned something (the token distribution), so equal weights mean equal updates.
    assert ref["losses"][-1] < ref["losses"][0] - 0.01


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(stage, cfg_file, tmp_path):
    """Steps 3 and 4 get a NaN loss: both are skipped (weights unchanged) and counted; with
    train.max_nonfinite_steps=2 the run stops with a clear message and a checkpoint of the last good state."""
    r = subprocess.run(
        torchrun(2, SCRIPT, str(tmp_path / "r.json"), str(cfg_file), "--nan-at=3,4", f"train.output_dir={tmp_path}",
                 f"engine.zero_stage={stage}", "train.max_nonfinite_steps=2", "checkpoint.every_steps=2"),
        cwd=ROOT, env=clean_env(), capture_output=True,
        text=True, timeout=300)
    assert r.returncode != 0
    assert "2 non-finite steps in a row (train.max_nonfinite_steps=2) at step 4" in r.stderr
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000004"
    state = read_json(ckpts / "step00000004" / "train_state.json")
    assert state["counters"]["skipped_steps"] == 2 and state["consumed_samples"] == 4 * 16
    good = final_weights_at(ckpts, "step00000002")
    last = final_weights_at(ckpts, "step00000004")
    assert all(bool((good[k] == last[k]).all()) for k in good), "a skipped step changed the weights"
