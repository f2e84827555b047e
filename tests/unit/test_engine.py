"""The engine (megamlm/engine.py) without a process group: the DeepSpeed config's batch arithmetic and
precision, the learning-rate schedule, GuardedAdamW (the ZeRO-0 optimizer: skip on non-finite gradients,
clip, report the norm), LAMB (against the paper's algorithm; refused under ZeRO) and the ops backend a
config selects.

A failure here points at megamlm/engine.py (build_ds_config, batch_plan, WarmupDecay, GuardedAdamW,
build_optimizer, total_steps, select_ops, device_problems). The engine with DeepSpeed and ranks is tests/distributed/test_engine_parity.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from megamlm.config import load_config
from megamlm.engine import (AdamSettings, BatchPlan, EngineError, GuardedAdamW, GuardedLamb, WarmupDecay, batch_plan,
                            build_ds_config, build_optimizer, device_problems, optimizer_problems, select_ops,
                            total_steps)
from megamlm.optim import Lamb
from tests.references import ReferenceLamb


def test_ds_config_batch_arithmetic_and_precision():
    cfg = load_config("configs/tiny-cpu.yaml", ["data.micro_batch_size=4", "engine.global_batch_size=32",
                                                "engine.zero_stage=2", "engine.precision=bf16"], world_size=4)
    plan = batch_plan(cfg, 4)
    assert (plan.micro, plan.dp, plan.accumulation, plan.global_batch) == (4, 4, 2, 32)
    ds = build_ds_config(cfg.engine, plan)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    cfg16 = load_config("configs/tiny-cpu.yaml", ["engine.precision=fp16", "engine.initial_loss_scale_power=12"])
    import torch

    from megamlm.engine import EngineError

    if torch.cuda.is_available():
        assert build_ds_config(cfg16.engine, batch_plan(cfg16, 1))["fp16"]["initial_scale_power"] == 12
    else:
        with pytest.raises(EngineError, match="fp16' needs a CUDA device"):
            build_ds_config(cfg16.engine, batch_plan(cfg16, 1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lamb_is_refused_under_zero_with_the_reason(stage):
    """ZeRO 1-3 hand the optimizer flat partitions cut across tensors: no per-tensor trust ratio there."""
    cfg = load_config("configs/tiny-cpu.yaml", ["optim.name=lamb", f"engine.zero_stage={stage}"])
    said = f"optim.name='lamb' needs engine.zero_stage=0 (it is {stage}): LAMB's trust ratio is per tensor"
    assert any(said in p for p in device_problems(cfg.engine, "lamb"))
    assert not optimizer_problems(cfg.engine, "adamw")
    with pytest.raises(EngineError, match="flat partitions that cut across tensors"):
        build_ds_config(cfg.engine, batch_plan(cfg, 1), "lamb")
    with pytest.raises(EngineError, match=r"needs engine.zero_stage=0"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], cfg.engine, AdamSettings.of(cfg.optim),
                        name="lamb")


def test_lamb_at_zero_0_is_the_guarded_client_optimizer():
    cfg = load_config("configs/tiny-cpu.yaml", ["optim.name=lamb", "engine.zero_stage=0", "engine.grad_clip=2.0"])
    assert not device_problems(cfg.engine, "lamb")
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))], "weight_decay": 0.01}], cfg.engine,
                          AdamSettings.of(cfg.optim), name="lamb")
    assert type(opt) is GuardedLamb and opt.max_norm == 2.0 and opt.defaults["eps"] == cfg.optim.eps
    assert "optimizer" not in build_ds_config(cfg.engine, batch_plan(cfg, 1), "lamb")  # a client optimizer


def test_lamb_matches_the_papers_algorithm_per_tensor():
    """Five steps on tensors of different scales, two groups (decay and none): each tensor's update is
    scaled by its own trust ratio ‖w‖/‖u‖; within 1e-6 of the float64 reference."""
    g = torch.Generator().manual_seed(0)
    shapes, scales = [(8, 4), (4,), (16, 8), (8,)], [1.0, 0.1, 3.0, 0.5]
    params = [torch.nn.Parameter(s * torch.randn(*sh, generator=g)) for sh, s in zip(shapes, scales)]
    decays = [0.01, 0.0, 0.01, 0.0]
    opt = Lamb([{"params": params[0::2], "weight_decay": 0.01}, {"params": params[1::2], "weight_decay": 0.0}],
               lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    steps = [[torch.randn(*sh, generator=g) * (k + 1) for sh in shapes] for k in range(5)]
    ref = ReferenceLamb(params, decays, betas=(0.9, 0.99), eps=1e-6)
    for grads in steps:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        ref.step(grads, 0.05)
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, atol=1e-6, rtol=1e-6)
    assert opt.state[params[0]]["step"] == 5  # a checkpointable int


_BF16_LAMB = """
import torch
from megamlm.config import load_config
from megamlm.distributed.env import DistEnv
from megamlm.engine import build_engine, disable_ds_shm_op, init_distributed
from megamlm.model.pretraining import build_model
disable_ds_shm_op()
init_distributed(DistEnv(master_port=0, launcher="single"), "gloo")
cfg = load_config("configs/tiny-cpu.yaml", ["optim.name=lamb", "engine.zero_stage=0", "engine.precision=bf16",
                                            "model.num_layers=1"])
model = build_model(cfg.model, cfg.objective, 8064, 8000)
shapes = sorted(tuple(p.shape) for p in model.parameters())
engine, _ = build_engine(model, cfg, 1)
inner = engine.optimizer.optimizer
got = sorted(tuple(p.shape) for g in inner.param_groups for p in g["params"])
dtypes = {p.dtype for g in inner.param_groups for p in g["params"]}
print(type(engine.optimizer).__name__, type(inner).__name__, got == shapes, dtypes == {torch.float32})
"""


@pytest.mark.slow
def test_lamb_under_bf16_at_zero_0_sees_whole_fp32_tensors():
    """bf16 at ZeRO 0: DeepSpeed keeps one fp32 master copy per tensor (FP16_UnfusedOptimizer around a client
    optimizer that is not its FusedAdam), so LAMB's trust ratios are per tensor there too."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, "-c", _BF16_LAMB], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[2]), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-4:] == ["FP16_UnfusedOptimizer", "GuardedLamb", "True", "True"], res.stdout


def test_guarded_lamb_skips_a_non_finite_step():
    ps = _params_with_grads(torch.tensor([1.0, float("nan")]))
    opt = GuardedLamb([{"params": ps, "weight_decay": 0.01}], lr=0.1)
    assert opt.step() is None and opt.overflow and ps[0].grad is None
    assert torch.equal(ps[0].detach(), torch.ones(2))


def test_a_plan_of_one_micro_batch_per_rank_is_fine_tunings_step():
    """Fine-tuning's plan (train.batch_size over the ranks, no accumulation) through the same builder."""
    engine = load_config("configs/tiny-cpu.yaml", ["engine.zero_stage=1", "engine.grad_clip=0.5"]).engine
    ds = build_ds_config(engine, BatchPlan(micro=8, dp=4, accumulation=1))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (32, 8, 1)
    assert ds["gradient_clipping"] == 0.5 and "optimizer" not in ds


def test_total_steps_from_the_step_or_the_token_budget():
    train = load_config("configs/tiny-cpu.yaml", ["train.max_steps=0", "train.max_tokens=100000"]).train
    assert total_steps(train, BatchPlan(4, 2, 3), seq_len=64) == math.ceil(100000 / (24 * 64))
    # packed: at the micro-batch's token budget (here 300 tokens), x data-parallel 2 x accumulation 3
    assert total_steps(train, BatchPlan(4, 2, 3), seq_len=64, packed_tokens=300) == math.ceil(100000 / (6 * 300))
    assert total_steps(load_config("configs/tiny-cpu.yaml", ["train.max_steps=7"]).train, BatchPlan(4, 2, 3), 64) == 7


def test_build_optimizer_guards_at_zero_0_and_clips_only_in_fp32():
    ps = [torch.nn.Parameter(torch.ones(3))]
    groups = [{"params": ps, "lr": 0.5, "weight_decay": 0.0}]
    adam = AdamSettings(lr=1e-3, betas=(0.8, 0.9), eps=1e-7)
    fp32 = load_config("configs/tiny-cpu.yaml", ["engine.zero_stage=0", "engine.precision=fp32",
                                                 "engine.grad_clip=2.0"]).engine
    opt = build_optimizer(groups, fp32, adam, fused=False)
    assert type(opt) is GuardedAdamW and opt.max_norm == 2.0
    assert opt.param_groups[0]["lr"] == 0.5 and opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["foreach"] is True
    bf16 = load_config("configs/tiny-cpu.yaml", ["engine.zero_stage=0", "engine.precision=bf16"]).engine
    assert build_optimizer([{"params": ps}], bf16, adam).max_norm == 0.0  # DeepSpeed clips there
    z1 = load_config("configs/tiny-cpu.yaml", ["engine.zero_stage=1"]).engine
    assert type(build_optimizer([{"params": ps}], z1, adam)) is torch.optim.AdamW


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "polynomial"])
def test_warmup_then_decay(schedule):
    f = WarmupDecay(lr=1e-3, min_lr=1e-4, warmup=10, total=110, schedule=schedule, power=2.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    end = f(110)
    if schedule == "constant":
        assert end == 1.0
    else:
        assert end == pytest.approx(0.1)  # min_lr / lr
        mid = f(60)
        expect = {"linear": 0.5, "cosine": 0.5, "polynomial": 0.25}[schedule]
        assert mid == pytest.approx(0.1 + 0.9 * expect)
    assert all(math.isfinite(f(s)) for s in range(0, 300, 7))
    assert f(500) == pytest.approx(end)  # flat after the horizon


def _params_with_grads(*grads):
    ps = [torch.nn.Parameter(torch.ones_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def test_guarded_adamw_clips_to_max_norm_and_reports_the_norm_before_clipping():
    """The step it takes equals plain AdamW's on the gradients scaled to max_norm; the norm it reports is
    the global L2 norm before clipping."""
    grads = (torch.tensor([3.0, 0.0]), torch.tensor([[0.0], [4.0]]))  # global norm 5
    guarded = _params_with_grads(*grads)
    opt = GuardedAdamW(guarded, max_norm=1.0, lr=0.1, weight_decay=0.0)
    opt.step()
    assert opt._global_grad_norm == pytest.approx(5.0) and not opt.overflow
    plain = _params_with_grads(*(g * (1.0 / (5.0 + 1e-6)) for g in grads))
    torch.optim.AdamW(plain, lr=0.1, weight_decay=0.0).step()
    for a, b in zip(guarded, plain):
        torch.testing.assert_close(a.detach(), b.detach())
    unclipped = _params_with_grads(*grads)  # below max_norm: the gradients are left alone
    opt = GuardedAdamW(unclipped, max_norm=10.0, lr=0.1, weight_decay=0.0)
    opt.step()
    assert torch.equal(unclipped[0].grad, grads[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guarded_adamw_skips_a_non_finite_step_and_drops_its_gradients(bad):
    ps = _params_with_grads(torch.tensor([1.0, bad]), torch.tensor([2.0]))
    before = [p.detach().clone() for p in ps]
    opt = GuardedAdamW(ps, lr=0.1)
    assert opt.step() is None and opt.overflow and not math.isfinite(opt._global_grad_norm)
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)) and all(p.grad is None for p in ps)
    assert not opt.state  # no moment was updated by the skipped step
    ps[0].grad, ps[1].grad = torch.tensor([1.0, 1.0]), torch.tensor([1.0])
    opt.step()
    assert not opt.overflow and not torch.equal(ps[0].detach(), before[0])


def test_the_config_selects_the_ops_backend_and_a_bad_choice_is_a_device_problem():
    from megamlm import ops
    from megamlm.ops import cpu_kernels

    cfg = load_config("configs/tiny-cpu.yaml", ["engine.kernels=torch"])
    backend, said = select_ops(cfg.engine)
    assert type(backend) is ops.TorchOps and said == "torch (engine.kernels=torch)"
    previous = cpu_kernels.set_enabled(False)
    try:
        problems = device_problems(load_config("configs/tiny-cpu.yaml", ["engine.kernels=cpu"]).engine)
    finally:
        cpu_kernels.set_enabled(previous)
    if not torch.cuda.is_available():
        assert any(p.startswith("engine.kernels=cpu: the CPU kernels cannot be built here") for p in problems)
    assert not device_problems(load_config("configs/tiny-cpu.yaml", ["engine.kernels=auto"]).engine)


def test_compile_is_refused_where_it_cannot_apply():
    z3 = load_config("configs/tiny-cpu.yaml", ["engine.compile=true", "engine.zero_stage=3"]).engine
    assert any("engine.compile=true with engine.zero_stage=3" in p for p in device_problems(z3))
    cpu = load_config("configs/tiny-cpu.yaml", ["engine.compile=true", "engine.kernels=cpu"]).engine
    assert any("engine.kernels='cpu' cannot apply there" in p for p in device_problems(cpu))
    ok = load_config("configs/tiny-cpu.yaml", ["engine.compile=true", "engine.zero_stage=2"]).engine
    assert not [p for p in device_problems(ok) if "compile" in p]


def test_zero_buckets_below_the_model_size_and_fp32_gradient_accumulation():
    """DeepSpeed's 5e8-element default bucket holds all of BERT-large: one reduce after the backward, no
    overlap. engine.bucket_size (25M elements) cuts BERT-base into ~5 buckets; grad_accum_dtype=fp32 is
    DeepSpeed's data_types under bf16 / fp16, refused at ZeRO 0 (no such mode) and 1 (a wrong gradient)."""
    def ds(*over):
        cfg = load_config("configs/tiny-cpu.yaml", list(over))
        return build_ds_config(cfg.engine, batch_plan(cfg, 1))

    z2 = ds("engine.zero_stage=2")["zero_optimization"]
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == 25_000_000
    assert ds("engine.zero_stage=3", "engine.bucket_size=4000000")["zero_optimization"]["stage3_prefetch_bucket_size"] \
        == 4_000_000
    assert "reduce_bucket_size" not in ds("engine.zero_stage=0")["zero_optimization"]
    assert ds("engine.zero_stage=2", "engine.precision=bf16", "engine.grad_accum_dtype=fp32")["data_types"] == \
        {"grad_accum_dtype": "fp32"}
    assert "data_types" not in ds("engine.zero_stage=1", "engine.precision=bf16")
    assert "data_types" not in ds("engine.zero_stage=1", "engine.grad_accum_dtype=fp32")  # fp32 already
    for stage, why in ((0, "no fp32 gradient accumulation at stage 0"), (1, "BF16_Optimizer")):
        e = load_config("configs/tiny-cpu.yaml", [f"engine.zero_stage={stage}", "engine.precision=bf16",
                                                  "engine.grad_accum_dtype=fp32"]).engine
        assert any("needs engine.zero_stage 2 or 3" in p and why in p for p in device_problems(e)), stage
    z2 = load_config("configs/tiny-cpu.yaml", ["engine.zero_stage=2", "engine.precision=bf16",
                                               "engine.grad_accum_dtype=fp32"]).engine
    assert not device_problems(z2)
