"""``megamlm pretrain``: environment → process group → tokenizer, model, engine, loaders → Trainer.

Everything that can be checked before a process group exists is checked first (config with the world
size, paths, shards and their tokenizer), so a bad run fails in seconds with a clear message.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megamlm import checkpoint as ckpt
from megamlm.config import Config, ConfigError, config_to_dict, dump_config

log = logging.getLogger(__name__)


def preflight(cfg: Config, world_size: int, with_files: bool = True) -> list[str]:
    """Problems found without any process group: config arithmetic, the engine on this machine, the
    tokenizer and shards (megamlm.preflight, the checks `check-config` runs too); ``with_files=False``
    leaves out the files (a run fed recorded batches instead of shards)."""
    from megamlm.config import cross_check
    from megamlm.preflight import engine_problems, pretrain_problems

    return pretrain_problems(cfg, world_size) if with_files else cross_check(cfg, world_size) + engine_problems(cfg)


def resume_problems(ckpt_path: Path, cfg: Config, world_size: int) -> list[str]:
    """What a resume from ``ckpt_path`` cannot change, checked before the engine starts: the model shape and
    the vocab-parallel size (check_shape raises, naming them). The data-parallel size and the loader's
    worker count may change: the ZeRO state goes through DeepSpeed's universal checkpoint
    (:func:`megamlm.checkpoint.to_universal`), the loader's position through data/elastic.py."""
    ckpt.check_shape(ckpt_path, config_to_dict(cfg.model), cfg.parallel.vocab_parallel_size)
    problems = _other_shards(ckpt_path, cfg)
    if problems:
        return problems
    saved = ckpt.saved_topology(ckpt_path).get("data_parallel_size")
    dp = world_size // cfg.parallel.vocab_parallel_size
    if saved is not None and int(saved) != dp and cfg.parallel.vocab_parallel_size > 1:
        return [f"checkpoint {ckpt_path} was saved by {saved} data-parallel rank(s) and this run has {dp}: with "
                f"parallel.vocab_parallel_size={cfg.parallel.vocab_parallel_size} the data-parallel size cannot "
                f"change yet (resume on {saved * cfg.parallel.vocab_parallel_size} ranks, or start a new run "
                f"from its weights with --init-from {ckpt_path})"]
    return []


def _other_shards(ckpt_path: Path, cfg: Config) -> list[str]:
    """The checkpoint's loader position over another shard folder's data: refused before any work."""
    import json

    from megamlm.data.loader_state import other_shards
    from megamlm.data.shard_format import load_manifest
    from megamlm.data.stream import shards_fingerprint

    loader = json.loads((ckpt_path / "train_state.json").read_text()).get("loader") or {}
    if not loader.get("shards") or not Path(cfg.data.shards_dir).is_dir():
        return []
    man = load_manifest(cfg.data.shards_dir)
    why = other_shards(loader, shards_fingerprint(man.shards(loader["shards"].get("split", "train"))), man.dir)
    return [f"checkpoint {ckpt_path}: {why}"] if why else []


def layout_changed(ckpt_path: Path, dp_size: int, zero_stage: int) -> bool:
    """Whether resuming ``ckpt_path`` on ``dp_size`` data-parallel ranks needs its universal form: ZeRO 1-3
    partitions were cut for the saved data-parallel size (at ZeRO 0 every rank holds the whole state)."""
    saved = ckpt.saved_topology(ckpt_path).get("data_parallel_size")
    return zero_stage >= 1 and saved is not None and int(saved) != dp_size


def pretrain(cfg: Config, resume: str | None = None, batch_source=None, init_from: str | None = None,
             move_old_run: bool = False) -> dict:
    """Run pretraining on this rank; returns the trainer's summary (losses, final state, evals).

    ``batch_source``: optional callable(topology, state_dict) → loader, replacing the shard loader
    (tests feed recorded batches through it to compare with a single-process reference).
    ``init_from``: weights only (a megamlm checkpoint folder / tag folder, a megamlm export, or an HF BERT
    directory converted on the fly), loaded into the full model before DeepSpeed partitions it; the
    optimizer, schedule and data position start fresh. Ignored when ``resume`` finds a checkpoint.
    ``move_old_run``: a fresh run (``resume`` none) first renames an earlier run in ``train.output_dir``
    aside (:func:`megamlm.checkpoint.move_old_run`, rank 0); without it such a run is refused.
    """
    from megamlm.distributed.env import from_environ
    from megamlm.engine import init_distributed, resolve_backend, shutdown

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    de = from_environ()
    # recorded batches replace the shards: every check but the shard files' still runs
    problems = preflight(cfg, de.world_size, with_files=batch_source is None)
    if problems:
        raise ConfigError(problems, f"pretrain with world size {de.world_size}")
    tag, init_weights = _start_or_resume(cfg, resume, init_from, move_old_run, de)
    _before_process_group(cfg)
    init_distributed(de, resolve_backend(cfg.engine))
    run = build_run(cfg, de, tag, init_weights, batch_source)
    try:
        result = run.trainer.run()
        if de.rank == 0:
            write_run_status(Path(cfg.train.output_dir), result)
        if run.writer is not None:
            final = result.get("eval_end") or {}
            run.writer.add_hparams(config_to_dict(cfg),
                                   {k: v for k, v in final.items() if k.endswith(("loss", "accuracy"))})
    finally:
        if run.writer is not None:
            run.writer.close()
        shutdown(run.trainer.engine, de.world_size)
    return result


def _start_or_resume(cfg: Config, resume: str | None, init_from: str | None, move_old_run: bool, de):
    """(checkpoint tag to resume or None, ``--init-from`` weights or None), decided before any process group:
    the old run moved aside when asked, the resume layout checked, the init source read (fails in seconds)."""
    ckpt_dir = Path(cfg.checkpoint_dir)
    fresh = not resume or resume == "none"
    if move_old_run and not fresh:
        raise ConfigError([f"--move-old-run starts a fresh run; it cannot go with --resume {resume}"])
    if move_old_run and de.rank == 0:
        ckpt.move_old_run(cfg.train.output_dir, ckpt_dir,
                          inputs=[cfg.tokenizer.model, cfg.data.shards_dir, init_from, *cfg.data.inputs])
    tag = None if move_old_run else ckpt.resolve_resume(resume, ckpt_dir)
    if tag:
        problems = resume_problems(ckpt_dir / tag, cfg, de.world_size)
        if problems:
            raise ckpt.CheckpointError(problems[0])
    if init_from and tag:
        log.warning("--init-from %s ignored: resuming from %s", init_from, ckpt_dir / tag)
    elif init_from:
        from megamlm.convert.core import load_any

        return tag, load_any(init_from)
    return tag, None


def _before_process_group(cfg: Config) -> None:
    from megamlm.engine import apply_cpu_malloc, disable_ds_shm_op

    disable_ds_shm_op()
    apply_cpu_malloc(cfg.engine)


@dataclass
class _Run:
    trainer: object
    writer: object


def build_run(cfg: Config, de, tag: str | None, init_weights, batch_source) -> _Run:
    """Topology, tokenizer, model (with its ops backend, init weights, vocab parallelism), engine, state
    (resumed), loaders, TensorBoard writer, MFU peak → a Trainer."""
    from megamlm.distributed.topology import build_topology
    from megamlm.engine import build_engine
    from megamlm.parallel.layers import vocab_parallel_layout
    from megamlm.tokenizer import Tokenizer
    from megamlm.trainer import Trainer

    topo = build_topology(cfg.parallel.vocab_parallel_size)
    tok = Tokenizer(cfg.tokenizer.model)
    model, kernels_said = _build_model(cfg, tok, topo, init_weights, de.rank)
    vp_layout = vocab_parallel_layout(model, topo.vp_size)
    universal = bool(tag) and layout_changed(Path(cfg.checkpoint_dir) / tag, topo.dp_size, cfg.engine.zero_stage)
    if universal:
        _convert_on_rank_0(Path(cfg.checkpoint_dir), tag, de, topo)
    engine, plan = build_engine(model, cfg, de.world_size, mpu=topo.mpu(), load_universal=universal)
    # Dropout streams differ per data-parallel rank, fixed per run; the ranks of one vocab-parallel group
    # share theirs (they run the same replicated layers on the same batch).
    torch.manual_seed(cfg.train.seed + 1 + topo.dp_rank)
    state = _load_state(cfg, engine, tag, de, topo, universal)
    train_loader, make_eval = _build_loaders(cfg, tok, topo, state, batch_source)
    writer = None
    if de.rank == 0 and cfg.telemetry.tensorboard:
        from megamlm.telemetry import TensorBoardWriter

        writer = TensorBoardWriter(str(Path(cfg.train.output_dir) / "tb"), dump_config(cfg))
        writer.add_text("kernels", kernels_said)
    measured_peak, datasheet_peak = _mfu_peaks(cfg, engine)
    trainer = Trainer(cfg, engine, plan, topo, de, tok, train_loader, make_eval, state, writer,
                      measured_peak, vocab_parallel=vp_layout, datasheet_flops=datasheet_peak)
    return _Run(trainer, writer)


def _build_model(cfg: Config, tok, topo, init_weights, rank: int):
    """The full model, identically seeded on every rank, with its ops backend and ``--init-from`` weights,
    then cut to this rank's vocabulary rows; returns (model, the kernels' description)."""
    from megamlm import ops
    from megamlm.engine import select_ops
    from megamlm.model.pretraining import build_model
    from megamlm.parallel.layers import parallelize_vocab

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, cfg.objective, tok.padded_vocab_size, tok.vocab_size)
    kernels, kernels_said = select_ops(cfg.engine)  # checked in preflight: it cannot fail here
    ops.use(model, kernels)
    if cfg.engine.compile:
        model.encoder.compile_blocks()
        if hasattr(model, "generator"):
            model.generator.encoder.compile_blocks()
        kernels_said += "; encoder blocks under torch.compile (their ops run as torch code)"
    if rank == 0:
        log.info("kernels: %s", kernels_said)
    if init_weights is not None:
        _load_init_weights(model, init_weights, tok.vocab_size, rank)
    # Vocabulary parallelism: each rank keeps its rows of the full, identically seeded embedding and decoder.
    return parallelize_vocab(model, topo), kernels_said


def _convert_on_rank_0(ckpt_dir: Path, tag: str, de, topo) -> None:
    """Rank 0 makes the universal form of ``tag``; every rank raises its error, if any, together."""
    error = [None]
    if de.rank == 0:
        saved = ckpt.saved_topology(ckpt_dir / tag).get("data_parallel_size")
        log.info("checkpoint %s was saved by %s data-parallel rank(s), this run has %d: converting its ZeRO state "
                 "to DeepSpeed's universal layout", ckpt_dir / tag, saved, topo.dp_size)
        try:
            ckpt.to_universal(ckpt_dir, tag)
        except ckpt.CheckpointError as e:
            error[0] = str(e)
    if de.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(error, src=0, group=topo.host_group)
    if error[0]:
        raise ckpt.CheckpointError(error[0])


def _load_state(cfg: Config, engine, tag: str | None, de, topo, universal: bool = False) -> ckpt.TrainState:
    ckpt_dir = Path(cfg.checkpoint_dir)
    state = ckpt.TrainState()
    if tag:
        saved_dp = ckpt.saved_topology(ckpt_dir / tag).get("data_parallel_size")
        state = ckpt.load(engine, ckpt_dir, tag, rank=de.rank, model_cfg=config_to_dict(cfg.model),
                          vocab_parallel_size=topo.vp_size, universal=universal)
        log.info("resumed from %s at step %d (%d samples, %d tokens consumed)", ckpt_dir / tag, state.step,
                 state.consumed_samples, state.consumed_tokens)
        if saved_dp is not None and int(saved_dp) != topo.dp_size and state.step:
            before = state.consumed_samples // state.step
            now = engine.train_batch_size()
            log.log(logging.WARNING if before != now else logging.INFO,
                    "data-parallel size %s -> %d: %d sequences per optimizer step before, %d now%s", saved_dp,
                    topo.dp_size, before, now, "" if before == now else
                    " (engine.global_batch_size fixes it across layouts); the schedule goes on in steps")
    state.topology = {"world_size": de.world_size, "data_parallel_size": topo.dp_size,
                      "vocab_parallel_size": topo.vp_size, "num_workers": cfg.data.num_workers}
    return state


def _build_loaders(cfg: Config, tok, topo, state: ckpt.TrainState, batch_source):
    """(the training loader at the state's position, a function building the held-out loader)."""
    if batch_source is not None:
        return batch_source(topo, state.loader), (lambda: None)
    from megamlm.data.loader import build_loader

    pin = torch.cuda.is_available()  # the engine trains on CUDA: pinned batches copy asynchronously
    train = build_loader(cfg.data, tok, topo, cfg.train.seed, cfg.objective, split="train",
                         state=state.loader or None, pin_memory=pin)

    def make_eval():  # reads at most train.eval_batches: no further ahead
        return build_loader(cfg.data, tok, topo, cfg.train.seed, cfg.objective, split="val",
                            agree_every=max(1, cfg.train.eval_batches), pin_memory=pin)

    return train, make_eval


def _mfu_peaks(cfg: Config, engine) -> tuple[float, float]:
    """The MFU denominators: this device's best matmul rate in the training precision, measured now, and
    the datasheet's for the detected GPU (0.0 on a CPU or an unlisted GPU)."""
    from megamlm.flops import device_datasheet_peak, matmul_peak

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision, torch.float32)
    with torch.random.fork_rng(devices=[]):  # the measurement must not move the dropout stream
        measured = matmul_peak(dtype, n=1024 if engine.device.type == "cpu" else 4096, repeats=3,
                               device=engine.device.type)
    return measured, device_datasheet_peak(engine.device, cfg.engine.precision)


def _load_init_weights(model, weights, real_vocab_size: int, rank: int) -> None:
    """``--init-from``: the full state dict into the full model, on every rank, before ZeRO partitions it
    and before vocabulary parallelism keeps each rank's rows."""
    from megamlm.convert.core import init_state_for

    state, fresh = init_state_for(model, weights, real_vocab_size)
    model.load_state_dict(state, strict=True)
    if rank == 0:
        log.info("initialised weights from %s (%d tensors)%s", weights.source, len(state) - len(fresh),
                 f"; kept fresh (absent from the source): {', '.join(fresh)}" if fresh else "")


RUN_STATUS = "run_status"


def write_run_status(output_dir: Path, result: dict) -> None:
    """``<output_dir>/run_status``, one line for schedulers (slurm/pretrain.sbatch reads it to requeue):
    ``preempted STEP TAG`` when a signal stopped the run before its budget (checkpoint TAG saved), or
    ``complete STEP TAG`` when the budget was reached."""
    step = result["state"]["step"]
    line = f"{'preempted' if result.get('preempted') else 'complete'} {step} {ckpt.tag_for(step)}\n"
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{RUN_STATUS}.tmp-{os.getpid()}"
    tmp.write_text(line)
    os.replace(tmp, output_dir / RUN_STATUS)


def main_from_cli(config_path: str, overrides: list[str], resume: str | None,
                  init_from: str | None = None, move_old_run: bool = False) -> int:
    from megamlm.config import load_config
    from megamlm.distributed.env import from_environ
    from megamlm.telemetry import setup_logging

    de = from_environ()
    cfg = load_config(config_path, overrides)  # the world-size checks run in preflight, with the paths
    setup_logging(cfg.telemetry.log_level if de.rank == 0 else "WARNING")
    result = pretrain(cfg, resume, init_from=init_from, move_old_run=move_old_run)
    if de.rank == 0:
        s, e = result.get("eval_start") or {}, result.get("eval_end") or {}
        if s and e:
            print(f"held-out MLM accuracy: {s['mlm_accuracy']:.4f} at start -> {e['mlm_accuracy']:.4f} at end "
                  f"(loss {s['mlm_loss']:.3f} -> {e['mlm_loss']:.3f})")
        print(f"done: step {result['state']['step']}, {result['state']['consumed_tokens']} tokens; "
              f"checkpoints in {cfg.checkpoint_dir}", file=sys.stdout)
    return 0
