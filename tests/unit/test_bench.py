"""``megamlm bench model``: the FLOP count, a real (tiny) run of both models through the CLI, and the CPU
allocator tuning that `megamlm pretrain` and the bench apply (checked by counting page faults)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megamlm.bench import random_batch, train_flops


def _counted_forward_flops(model, batch) -> int:
    """The matmul FLOPs torch counts (FlopCounterMode) in one forward of the model; SDPA on its math path,
    whose two products the counter sees (it does not count the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("pair", [True, False])
def test_train_flops_is_three_times_the_matmul_flops_torch_counts_on_real_tokens(pair):
    """The truth, not the formula again: on batches without padding, train_flops = 3 × the forward FLOPs
    torch's FlopCounterMode counts in the model itself (the torch backend: SDPA, linear layers, the MLM
    head on the masked rows, the pair head); on a padded batch it counts each row's real tokens, the sum
    of the same rows run one by one without padding."""
    from megamlm import ops
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.data.batch import Batch
    from megamlm.model import build_model

    H, F, L, V = 16, 32, 2, 50
    model = build_model(ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, num_heads=2, ffn_size=F),
                        ObjectiveConfig(pair="nsp" if pair else "none"), V)
    ops.use(model.eval(), ops.TorchOps())
    full = random_batch(3, 10, V, mlm_probability=0.3, padding=False, pair=pair, seed=1)
    assert train_flops(full, H, L, F, V, pair=pair) == 3 * _counted_forward_flops(model, full)
    padded = random_batch(3, 10, V, mlm_probability=0.3, padding=True, pair=pair, seed=2)
    rows = []
    for i, n in enumerate(padded.attention_mask.sum(1).tolist()):
        pos = padded.mlm_positions[(padded.mlm_positions // 10) == i] % 10
        one = Batch(padded.input_ids[i:i + 1, :n], padded.token_type_ids[i:i + 1, :n],
                    padded.attention_mask[i:i + 1, :n], padded.mlm_labels[i:i + 1, :n], pos,
                    padded.mlm_labels[i, :n][pos], padded.pair_labels[i:i + 1] if pair else None, n_tokens=n)
        rows.append(3 * _counted_forward_flops(model, one))
    assert padded.attention_mask.sum() < padded.attention_mask.numel()  # some padding to leave out
    assert train_flops(padded, H, L, F, V, pair=pair) == pytest.approx(sum(rows))


def test_electra_train_flops_count_the_generator_and_the_discriminator():
    """ELECTRA: train_flops with the generator's shape = 3 × the forward FLOPs torch counts in the whole
    ElectraModel (generator at its width with the projection, its head and tied decoder on the masked rows,
    the discriminator and its per-token head); sampling costs no matmul."""
    from megamlm import ops
    from megamlm.config import ModelConfig, ObjectiveConfig
    from megamlm.flops import generator_flops_shape
    from megamlm.model import build_model

    H, F, L, V = 32, 64, 2, 50
    mc = ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, num_heads=2, ffn_size=F)
    oc = ObjectiveConfig(name="electra", pair="none", generator_hidden_fraction=0.5, generator_layers=1)
    model = build_model(mc, oc, V)
    ops.use(model.eval(), ops.TorchOps())
    batch = random_batch(3, 10, V, mlm_probability=0.3, padding=False, pair=False, seed=1)
    assert generator_flops_shape(mc, oc) == (16, 1, 64)
    assert train_flops(batch, H, L, F, V, False, generator_flops_shape(mc, oc)) == 3 * _counted_forward_flops(model, batch)


def test_bench_cli_times_electra_against_the_hf_composition(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "megamlm", "bench", "model", "--hidden-size", "32", "--num-layers", "1",
           "--num-heads", "2", "--ffn-size", "64", "--vocab-size", "500", "--seq-len", "16", "--batch-size", "4",
           "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--no-memory", "--pair", "none",
           "--generator-fraction", "0.5", "--models", "electra,hf-electra,megamlm", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["ratios"]) == {"hf-electra", "megamlm"} and "ratio: electra / hf-electra" in res.stdout
    mfu = {n: m["mfu_vs_best_peak"] * m["step_s_median"] for n, m in r["models"].items()}  # flops / peak
    assert mfu["electra"] == pytest.approx(mfu["hf-electra"]) and mfu["electra"] > mfu["megamlm"]


def test_bench_cli_times_both_models_and_reports_ratio_mfu_memory(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "megamlm", "bench", "model", "--hidden-size", "32", "--num-layers", "1",
           "--num-heads", "2", "--ffn-size", "64", "--vocab-size", "500", "--seq-len", "16", "--batch-size", "4",
           "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["options"]["malloc_tuned"] is True  # the default, as engine.cpu_malloc
    assert set(r["models"]) == {"megamlm", "hf"} and r["n_tokens"] == 64
    for m in r["models"].values():
        assert len(m["step_s_rounds"]) == 2 and all(t > 0 for t in m["step_s_rounds"])
        assert m["tokens_per_s_min"] <= m["tokens_per_s_median"] <= m["tokens_per_s_max"]
        assert 0 < m["mfu"] < 1
        assert m["peak_rss_delta_mb"] > 0
    q = r["ratios"]["hf"]
    assert q["min"] <= q["median"] <= q["max"]
    assert "ratio: megamlm / hf" in res.stdout and "malloc tuned" in res.stdout


def test_bench_on_a_corpus_batch_packed_against_padded(tmp_path):
    """``--data``: the first micro-batch of a real loader (real lengths, so padding), and
    ``megamlm+packed`` trains on the same examples in one row: the same real tokens, a ratio reported."""
    from tests import data_fixtures as F

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tokenizer:\n  model: {F.tokenizer_path()}\ndata:\n  shards_dir: {F.shards()}\n")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "megamlm", "bench", "model", "--hidden-size", "32", "--num-layers", "1",
           "--num-heads", "2", "--ffn-size", "64", "--seq-len", "128", "--batch-size", "8", "--data", str(cfg),
           "--models", "megamlm+packed,megamlm", "--data-batches", "2", "--rounds", "2", "--steps", "1", "--warmup", "1",
           "--threads", "1", "--no-memory", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["options"]["vocab_size"] == F.tokenizer().padded_vocab_size and r["options"]["data_batches"] == 2
    assert 0 < r["padding_share"] < 1 and r["n_tokens"] < 8 * 128
    assert set(r["models"]) == {"megamlm+packed", "megamlm"} and "megamlm" in r["ratios"]
    assert "ratio: megamlm+packed / megamlm" in res.stdout and "is padding" in res.stdout


_FAULTS = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "tuned":
        from megamlm.engine import tune_cpu_malloc
        assert tune_cpu_malloc()
    from megamlm.bench import BenchOptions, _build_step, random_batch
    o = BenchOptions(hidden_size=128, num_layers=2, num_heads=2, ffn_size=512, vocab_size=8000, batch_size=16)
    batch = random_batch(o.batch_size, o.seq_len, o.vocab_size, seed=0)
    step, _ = _build_step("megamlm", o, [batch])
    for _ in range(3):
        step()
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[len(faults) // 2])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and ru_minflt: Linux")
def test_tuned_malloc_stops_page_faults_in_training_steps():
    """engine.cpu_malloc=tuned (the bench's default too): a training step re-allocates its activations
    and gradients from memory already faulted in. glibc's defaults fault ~9k pages per step of this
    model here (the heap is trimmed and re-grown); tuned, almost none. The median of 9 steps: a step now
    and then still faults a few hundred pages when an allocation first outgrows the heap (measured
    tuned: 0-3 pages in most steps, 65-260 in about one of five; untuned 1,000-12,600 in every step)."""
    per_step = {}
    for mode in ("default", "tuned"):
        res = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        per_step[mode] = float(res.stdout.split()[-1])
    assert per_step["tuned"] < 50 and per_step["default"] > 20 * per_step["tuned"], per_step


def test_bench_engine_times_the_bare_model_against_each_zero_stage(tmp_path):
    """``megamlm bench engine``: real DeepSpeed engines at ZeRO 0-3 beside the bare model, interleaved;
    each variant's median and its ratio to bare. On the ELECTRA config: its loss terms (generator and
    discriminator) through every stage's engine."""
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "-m", "megamlm", "bench", "engine", "configs/electra-tiny-cpu.yaml", "model.num_layers=1",
           "data.micro_batch_size=4", "data.seq_len=32", "--steps", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[2]))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["engine"]
    assert {"bare", "zero0", "zero1", "zero2", "zero3"} <= set(r) and r["bare"]["ratio_to_bare"] == 1.0
    assert all(r[k]["median_ms"] > 0 for k in ("bare", "zero0", "zero3")) and r["tokens_per_step"] > 0
    assert "zero3  median" in res.stdout


@pytest.mark.parametrize("name,precision,tf32,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),  # SXM5
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),  # not the SXM figure
    ("NVIDIA H100 NVL", "fp16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),  # TF32 matmuls
    ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5),
    ("NVIDIA A10G", "bf16", False, 125.0),  # an A10, not an A100
    ("NVIDIA L40S", "bf16", False, 362.1),  # not the L40 nor the L4
    ("NVIDIA L4", "bf16", False, 121.0),
    ("Tesla V100-SXM2-32GB", "bf16", False, 0.0),  # no bf16 on a V100
    ("NVIDIA GeForce RTX 4090", "bf16", False, 0.0),  # not in the table: no datasheet MFU
])
def test_datasheet_peak_of_the_detected_gpu(name, precision, tf32, tflops):
    """train/mfu_datasheet divides by the vendor's dense figure of the GPU torch names, the denominator
    Megatron-LM and MosaicBERT use; an unknown GPU or precision gives 0 (the metric is left out)."""
    from megamlm.flops import datasheet_peak

    assert datasheet_peak(name, precision, tf32=tf32) == pytest.approx(tflops * 1e12)


@pytest.mark.slow
def test_bench_loop_times_the_real_loop_beside_the_bare_step(tmp_path):
    """``megamlm bench loop``: the pretraining loop (shard loader, engine, logging) and the bare step of the
    same model on the micro-batches the loop took, interleaved; the loop's share of the bare speed and the
    split of its time."""
    from tests import data_fixtures as F

    out = tmp_path / "loop.json"
    cmd = [sys.executable, "-m", "megamlm", "bench", "loop", "configs/tiny-cpu.yaml", f"data.shards_dir={F.shards()}",
           f"tokenizer.model={F.tokenizer_path()}", "model.num_layers=1", "data.micro_batch_size=4",
           "data.seq_len=64", "train.log_every=2", "engine.global_batch_size=8", "--steps", "3", "--rounds", "2",
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).resolve().parents[2]))
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert len(r["rounds"]) == 2 and all(x["tokens"] > 0 and x["loop_s"] > x["data_wait_s"] for x in r["rounds"])
    assert 0 < r["loop_share_of_bare"] and r["loop_tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0
    assert sum(r["split_of_loop"].values()) == pytest.approx(1.0)
    assert "the loop keeps" in res.stdout
