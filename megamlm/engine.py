"""The DeepSpeed engine: its config dict is built here from megamlm's config (no hand-kept JSON),
with the optimizer, the learning-rate schedule and the process group. DeepSpeed specifics live here
alone (megamlm/ARCHITECTURE.md, seam 7).

The builders take the ``engine`` section, a :class:`BatchPlan` and the optim settings they use
(:func:`build_ds_config`, :func:`build_optimizer`, :func:`setup_engine`, :func:`device_problems`,
:func:`select_ops`), so pretraining and fine-tuning share them; :func:`build_engine` and
:func:`batch_plan` are pretraining's, from its whole config.

Batch arithmetic: ``global = micro × data-parallel × accumulation`` (checked when the config is
loaded with the world size). The loss handed to :func:`backward` is the micro-batch's share of the
step's mean loss (sums divided by the step's global target counts); DeepSpeed averages gradients over
data-parallel ranks and divides by the accumulation steps, so the share is multiplied back by
``dp × accumulation`` first: the gradient is then exactly that of the step's mean loss.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from megamlm.errors import MegamlmError
from megamlm.optim import Lamb

log = logging.getLogger(__name__)


class EngineError(MegamlmError, RuntimeError):
    """An engine setting that cannot work on this machine (e.g. LAMB without CUDA)."""


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def tune_cpu_malloc() -> bool:
    """glibc only, process-wide: blocks up to 32 MiB always come from the heap, and the heap is never trimmed,
    so a CPU step's freed and re-allocated tensors stay faulted in (as jemalloc / tcmalloc keep them); larger
    blocks are still mapped and returned when freed. Returns False where mallopt is unavailable."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def apply_cpu_malloc(engine_cfg) -> None:
    """``engine.cpu_malloc``: tune glibc's allocator (:func:`tune_cpu_malloc`) when training on CPU."""
    if engine_cfg.cpu_malloc != "tuned" or device_type() == "cuda":
        return
    if not tune_cpu_malloc():
        log.warning("engine.cpu_malloc=tuned: mallopt is unavailable (not glibc?); the allocator is left as is")


def resolve_backend(engine_cfg) -> str:
    if engine_cfg.backend != "auto":
        return engine_cfg.backend
    return "nccl" if device_type() == "cuda" else "gloo"


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step: ``micro`` sequences per rank per micro-batch, ``dp`` data-parallel ranks,
    ``accumulation`` micro-batches per rank."""

    micro: int
    dp: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.dp * self.accumulation


def batch_plan(cfg, world_size: int) -> BatchPlan:
    """Pretraining's plan: ``data.micro_batch_size`` on world size / ``parallel.vocab_parallel_size``
    data-parallel ranks, accumulated up to ``engine.global_batch_size``."""
    dp = world_size // cfg.parallel.vocab_parallel_size
    micro = cfg.data.micro_batch_size
    accumulation = cfg.engine.global_batch_size // (micro * dp) if cfg.engine.global_batch_size else 1
    return BatchPlan(micro, dp, max(accumulation, 1))


@dataclass(frozen=True)
class AdamSettings:
    """What AdamW takes besides its parameter groups (a group's own ``lr`` wins over ``lr``)."""

    lr: float
    betas: tuple[float, float]
    eps: float

    @classmethod
    def of(cls, optim_cfg) -> AdamSettings:
        """Pretraining's ``optim`` section's."""
        return cls(optim_cfg.lr, tuple(optim_cfg.betas), optim_cfg.eps)


def optimizer_problems(engine_cfg, optimizer: str = "adamw") -> list[str]:
    """An optimizer the engine settings cannot run as it is meant: LAMB's trust ratio is per tensor, and
    ZeRO stages 1-3 hand the optimizer flat partitions cut across tensors (megamlm/optim.py)."""
    if optimizer == "lamb" and engine_cfg.zero_stage > 0:
        return [f"optim.name='lamb' needs engine.zero_stage=0 (it is {engine_cfg.zero_stage}): LAMB's trust ratio "
                "is per tensor, and ZeRO stages 1-3 hand the optimizer flat partitions that cut across tensors "
                "(DeepSpeed's own Lamb then takes one ratio per partition, which is not LAMB); use "
                "engine.zero_stage=0, or optim.name=adamw with ZeRO"]
    return []


def device_problems(engine_cfg, optimizer: str = "adamw") -> list[str]:
    """Engine settings this machine cannot run, found before any process group exists. ``engine_cfg``: the
    ``engine`` section; ``optimizer``: the optimizer's name (``optim.name``)."""
    p = optimizer_problems(engine_cfg, optimizer)
    if engine_cfg.grad_accum_dtype == "fp32" and engine_cfg.precision != "fp32" and engine_cfg.zero_stage < 2:
        why = ("DeepSpeed has no fp32 gradient accumulation at stage 0" if engine_cfg.zero_stage == 0 else
               "at stage 1 DeepSpeed runs it through its BF16_Optimizer, whose gradient over accumulated "
               "micro-batches is not the step's (measured: 1.63x the true norm with 2 micro-batches per rank)")
        p.append(f"engine.grad_accum_dtype='fp32' with engine.precision={engine_cfg.precision!r} needs "
                 f"engine.zero_stage 2 or 3: {why}")
    if engine_cfg.compile:
        if engine_cfg.zero_stage == 3:
            p.append("engine.compile=true with engine.zero_stage=3: ZeRO-3 gathers and releases each block's "
                     "parameters in hooks around its forward, which torch.compile does not trace; use stage 0-2")
        if engine_cfg.kernels == "cpu":
            p.append("engine.compile=true runs the torch code of the ops inside the compiled blocks, so "
                     "engine.kernels='cpu' cannot apply there; use engine.kernels=auto or torch")
    if device_type() != "cuda":
        if engine_cfg.precision == "fp16":
            p.append("engine.precision='fp16' needs a CUDA device (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
        if engine_cfg.backend == "nccl":
            p.append("engine.backend='nccl' needs CUDA; use auto or gloo")
    try:
        select_ops(engine_cfg)
    except ValueError as e:
        p.append(str(e))
    return p


def select_ops(engine_cfg):
    """(ops backend, description) for this run: ``engine.kernels`` on this machine's device, in the training
    precision, at the ZeRO stage (:func:`megamlm.ops.select`); ValueError for a setting it cannot serve."""
    from megamlm import ops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine_cfg.precision, torch.float32)
    return ops.select(engine_cfg.kernels, device_type(), dtype, engine_cfg.zero_stage)


def build_ds_config(engine_cfg, plan: BatchPlan, optimizer: str = "adamw") -> dict:
    """The DeepSpeed config for the ``engine`` section and a step of ``plan``, with a client optimizer
    (``optimizer``: its name). EngineError for what this machine cannot run (:func:`device_problems`)."""
    e = engine_cfg
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        # fp32 at ZeRO 0: GuardedAdamW clips and reports the norm (DeepSpeed's clipping there discards it)
        "gradient_clipping": 0.0 if own_clipping(e) else e.grad_clip,
        "zero_optimization": {"stage": e.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if e.zero_stage >= 1:
        ds["zero_optimization"].update({"reduce_bucket_size": e.bucket_size, "allgather_bucket_size": e.bucket_size})
    if e.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": device_type() == "cuda", "contiguous_gradients": True,
                                        "reduce_scatter": True})
    if e.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                        "stage3_prefetch_bucket_size": e.bucket_size})
    if e.grad_accum_dtype == "fp32" and e.precision != "fp32":
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if e.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif e.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": e.initial_loss_scale_power,
                      "loss_scale_window": e.loss_scale_window, "hysteresis": 2, "min_loss_scale": 1}
    problems = device_problems(e, optimizer)
    if problems:
        raise EngineError("; ".join(problems))
    return ds


class WarmupDecay:
    """Learning-rate multiplier: linear warm-up, then constant / linear / cosine / polynomial decay to
    ``min_lr``. A picklable callable so LambdaLR's state_dict (and so the checkpoint) carries it."""

    def __init__(self, lr: float, min_lr: float, warmup: int, total: int, schedule: str, power: float = 1.0):
        self.lr, self.min_lr, self.warmup, self.total, self.schedule, self.power = (
            lr, min_lr, warmup, max(total, 1), schedule, power)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        span = max(self.total - self.warmup, 1)
        frac = min(max(step - self.warmup, 0) / span, 1.0)
        floor = self.min_lr / self.lr
        if self.schedule == "linear":
            shape = 1.0 - frac
        elif self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * frac))
        elif self.schedule == "polynomial":
            shape = (1.0 - frac) ** self.power
        else:  # pragma: no cover - validated by the config
            raise ValueError(f"unknown schedule {self.schedule!r}")
        return floor + (1.0 - floor) * shape


def total_steps(train_cfg, plan: BatchPlan, seq_len: int, packed_tokens: int = 0) -> int:
    """Pretraining's step budget (``train`` section); with a token budget only, an estimate (stated in the
    log): at ``packed_tokens`` per micro-batch when packed (each holds nearly that many real tokens), else at
    full sequences of ``seq_len`` tokens, which padded rows do not hold: the schedule then ends early."""
    if train_cfg.max_steps:
        return train_cfg.max_steps
    if packed_tokens:
        est = math.ceil(train_cfg.max_tokens / (packed_tokens * plan.dp * plan.accumulation))
        log.info("schedule horizon estimated from train.max_tokens at %d tokens per packed micro-batch: %d steps",
                 packed_tokens, est)
        return est
    est = math.ceil(train_cfg.max_tokens / (plan.global_batch * seq_len))
    log.warning("schedule horizon estimated from train.max_tokens at full sequences: %d steps; padded rows hold "
                "fewer real tokens, so the learning rate reaches its end before the budget does (on the default "
                "corpus at seq 128, ~27%% early): set data.packing=true (the estimate is then close) or "
                "train.max_steps", est)
    return est


def own_clipping(engine_cfg) -> bool:
    """fp32 at ZeRO 0: the client optimizer runs bare, so :class:`GuardedAdamW` clips and keeps the norm."""
    return engine_cfg.zero_stage == 0 and engine_cfg.precision == "fp32"


def global_grad_norm(params: list, mpu=None) -> torch.Tensor:
    """The L2 norm of the full model's gradient, as DeepSpeed computes it for clipping: tensors sharded
    over the vocab-parallel group (DeepSpeed's model-parallel group; its ``tensor_model_parallel`` flag)
    summed over it, replicated ones counted once (on vocab-parallel rank 0). At ZeRO 0 the gradients are
    already averaged over data-parallel ranks."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    mp = mpu.get_model_parallel_world_size() if mpu is not None else 1
    if mp > 1 and mpu.get_model_parallel_rank() != 0:
        params = [p for p in params if is_model_parallel_parameter(p)]
    grads = [p.grad for p in params if p.grad is not None]
    sq = (torch.stack([n.double() ** 2 for n in torch._foreach_norm(grads)]).sum() if grads
          else torch.zeros((), dtype=torch.float64))
    if mp > 1:
        import torch.distributed as dist

        dist.all_reduce(sq, group=mpu.get_model_parallel_group())
    return sq.sqrt()


class _Guarded:
    """The guard of a client optimizer at ZeRO 0: skip a step whose gradients are not all finite and say so
    in ``overflow``; ``_global_grad_norm`` (the norm before clipping) for ``engine.get_global_grad_norm()``.

    DeepSpeed's ZeRO 1–3 optimizers already skip such steps (they check the global norm); at ZeRO 0 the
    client optimizer runs bare, so this one does the check (one device read per step, the same DeepSpeed
    makes for its norm). The engine reads ``overflow`` and counts a skipped step. With ``max_norm`` > 0 it
    clips to it (fp32 at ZeRO 0, where DeepSpeed's own clipping is turned off: :func:`build_ds_config`);
    ``mpu`` makes the norm that of the full vocab-parallel model.
    """

    overflow = False
    _global_grad_norm = None
    max_norm, mpu = 0.0, None

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            norm = global_grad_norm(params, self.mpu)
            self._global_grad_norm = float(norm)
            self.overflow = not math.isfinite(self._global_grad_norm)
            if not self.overflow and self.max_norm > 0 and self._global_grad_norm > self.max_norm:
                torch._foreach_mul_([p.grad for p in params], self.max_norm / (self._global_grad_norm + 1e-6))
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


class GuardedAdamW(_Guarded, torch.optim.AdamW):
    """torch's AdamW with the ZeRO-0 guard (:class:`_Guarded`)."""

    def __init__(self, params, *, max_norm: float = 0.0, mpu=None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.mpu = float(max_norm), mpu


class GuardedLamb(_Guarded, Lamb):
    """:class:`megamlm.optim.Lamb` with the ZeRO-0 guard (:class:`_Guarded`)."""

    def __init__(self, params, *, max_norm: float = 0.0, mpu=None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.mpu = float(max_norm), mpu


def build_optimizer(groups: list[dict], engine_cfg, adam: AdamSettings, mpu=None, fused: bool | None = None,
                    name: str = "adamw"):
    """The client optimizer over the parameter groups (each carries its weight decay). ``name`` adamw:
    :class:`GuardedAdamW` at ZeRO 0 (it clips in fp32: :func:`own_clipping`; ``mpu`` makes its norm the
    full vocab-parallel model's), torch's AdamW above; ``fused``: None = the fused kernel on CUDA, foreach
    elsewhere; False = foreach everywhere. ``name`` lamb: :class:`GuardedLamb` (ZeRO 0 only:
    :func:`optimizer_problems`)."""
    problems = optimizer_problems(engine_cfg, name)
    if problems:
        raise EngineError("; ".join(problems))
    max_norm = engine_cfg.grad_clip if own_clipping(engine_cfg) else 0.0
    if name == "lamb":
        return GuardedLamb(groups, max_norm=max_norm, mpu=mpu, lr=adam.lr, betas=tuple(adam.betas), eps=adam.eps)
    kwargs = dict(lr=adam.lr, betas=tuple(adam.betas), eps=adam.eps)
    if fused is None and device_type() == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    if engine_cfg.zero_stage == 0:
        return GuardedAdamW(groups, max_norm=max_norm, mpu=mpu, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def init_distributed(dist_env, backend: str) -> None:
    """Create the default process group from a DistEnv (exported first, so DeepSpeed sees the same)."""
    import torch.distributed as dist

    from megamlm.distributed.env import export

    if dist_env.launcher == "single" and "MASTER_PORT" not in os.environ:
        # One process without a launcher: its rendezvous needs a port, and a fixed one collides with
        # any other run on the machine. Take a free one.
        import dataclasses
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            dist_env = dataclasses.replace(dist_env, master_port=sock.getsockname()[1])
    export(dist_env)
    if dist.is_initialized():
        return
    import deepspeed

    if device_type() == "cuda":
        bind_cuda_device(dist_env.local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=dist_env.rank, world_size=dist_env.world_size)


def bind_cuda_device(local_rank: int) -> int:
    """Make this rank's GPU the current device; when the launcher bound one GPU per task, it is device 0 and
    ``LOCAL_RANK`` is set to 0 too, since DeepSpeed takes ``LOCAL_RANK`` for the device index (its engine,
    zero.Init and its process group's ``device_id``)."""
    from megamlm.distributed.env import cuda_device_index

    index = cuda_device_index(local_rank, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.cuda.set_device(index)
    if index != local_rank:
        log.info("local rank %d sees one GPU (CUDA_VISIBLE_DEVICES=%s): cuda:0, LOCAL_RANK=0 for DeepSpeed",
                 local_rank, os.environ.get("CUDA_VISIBLE_DEVICES"))
        os.environ["LOCAL_RANK"] = "0"
    return index


def setup_engine(model: torch.nn.Module, params, schedule, engine_cfg, plan: BatchPlan, mpu=None,
                 load_universal: bool = False):
    """deepspeed.initialize, for pretraining and fine-tuning alike. ``params``: the client optimizer
    (:func:`build_optimizer`). ``schedule``: the learning-rate multiplier of a step (LambdaLR over the
    optimizer, so the checkpoint carries it). ``mpu``: the vocab-parallel topology's. ``load_universal``: the
    engine will load a universal checkpoint (another data-parallel size). Returns the engine."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(params, torch.optim.Optimizer):
        raise TypeError(f"setup_engine: params is the optimizer, not {type(params).__name__}")
    ds_config = build_ds_config(engine_cfg, plan, "lamb" if isinstance(params, Lamb) else "adamw")
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=params, lr_scheduler=LambdaLR(params, schedule),
                                           config=ds_config, mpu=mpu)
    return engine


def build_engine(model: torch.nn.Module, cfg, world_size: int, mpu=None, load_universal: bool = False):
    """Pretraining's engine from its whole config (sections engine, optim, train, data, parallel): the
    optimizer, the schedule and :func:`setup_engine`; returns (engine, BatchPlan)."""
    from megamlm.data.stream import packed_token_budget
    from megamlm.model.pretraining import weight_decay_groups

    plan = batch_plan(cfg, world_size)
    o = cfg.optim
    groups = weight_decay_groups(model, o.weight_decay)
    params = build_optimizer(groups, cfg.engine, AdamSettings.of(o), mpu, name=o.name)
    packed = packed_token_budget(cfg.data) if cfg.data.packing else 0
    horizon = total_steps(cfg.train, plan, cfg.data.seq_len, packed)
    schedule = WarmupDecay(o.lr, o.min_lr, o.warmup_steps, horizon, o.schedule, o.power)
    return setup_engine(model, params, schedule, cfg.engine, plan, mpu=mpu, load_universal=load_universal), plan


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def loss_scale(engine) -> float:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, torch.Tensor):
            return float(v)
    return 1.0


def disable_ds_shm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU at init (35–70 s) that only serves
    inference; training on CPU goes through gloo. Skip it unless MEGAMLM_DS_SHM=1."""
    if os.environ.get("MEGAMLM_DS_SHM") == "1" or torch.cuda.is_available():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown(engine, world_size: int) -> None:
    """The end of a run on every rank: barrier → engine.destroy → destroy_process_group (ZeRO-3 aborted at
    exit without it: megamlm/ARCHITECTURE.md, "Environment facts")."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone; still tear down what we can
            pass
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
