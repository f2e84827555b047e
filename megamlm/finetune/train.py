"""``megamlm finetune``: environment → process group → pretrained encoder + head → DeepSpeed engine →
epochs with validation, early stopping, checkpoints (exact resume), TensorBoard; then the best weights
on the test split and ``summary.json``.

Batch arithmetic: ``train.batch_size`` sequences per optimizer step over all data-parallel ranks (one
micro-batch per rank). The loss of a step is its cross-entropy sum divided by the step's global number
of targets (sequences, or labelled first pieces for token tasks).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megamlm import checkpoint as ckpt
from megamlm.config import ConfigError
from megamlm.labels import IGNORE_INDEX
from megamlm.finetune import data as D
from megamlm.finetune.config import FinetuneConfig, dump_finetune_config
from megamlm.finetune.evaluate import Evaluator
from megamlm.finetune.heads import FinetuneModel, param_groups
from megamlm.finetune.state import EpochPosition, EvalTrack, LossWindow

log = logging.getLogger(__name__)


def build_model(cfg: FinetuneConfig, pre, num_labels: int) -> FinetuneModel:
    """Encoder (pretrained weights unless ``init.random``) + head seeded by ``train.seed``."""
    from megamlm.model.encoder import Encoder

    torch.manual_seed(cfg.train.seed)
    enc = Encoder.from_config(pre.model, pre.model.vocab_size)
    if not cfg.init.random:
        missing, unexpected = enc.load_state_dict(pre.encoder_state, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{pre.source}: encoder weights do not fit (missing {missing[:3]}, "
                                       f"unexpected {unexpected[:3]})")
    h = cfg.head
    model = FinetuneModel(enc, cfg.task.type, num_labels, cfg.task.pair_mode, h.pooler, h.dropout, h.init_std)
    head_pooler = getattr(model.head, "pooler", None)
    if head_pooler is not None and pre.pooler_state is not None and not cfg.init.random:
        head_pooler.load_state_dict(pre.pooler_state)
    if cfg.train.freeze_encoder:
        model.freeze_encoder()
    return model


def ft_batch_plan(cfg: FinetuneConfig, world_size: int):
    """Fine-tuning's step as a :class:`megamlm.engine.BatchPlan`: ``train.batch_size`` sequences, one
    micro-batch per rank, no accumulation (the world size divides it: megamlm.preflight)."""
    from megamlm.engine import BatchPlan

    return BatchPlan(micro=cfg.train.batch_size // world_size, dp=world_size, accumulation=1)


def build_ft_engine(model: FinetuneModel, cfg: FinetuneConfig, plan, total: int):
    """The engine set-up pretraining uses (:func:`megamlm.engine.setup_engine`) with two learning rates
    (encoder, head) and a warm-up over ``optim.warmup_ratio`` of the ``total`` steps."""
    from megamlm.engine import AdamSettings, WarmupDecay, build_optimizer, setup_engine

    o = cfg.optim
    groups = param_groups(model, o.encoder_lr, o.head_lr, o.weight_decay)
    opt = build_optimizer(groups, cfg.engine, AdamSettings(o.head_lr, tuple(o.betas), o.eps), fused=False)
    schedule = WarmupDecay(1.0, 0.0, int(o.warmup_ratio * total), total, o.schedule)
    return setup_engine(model, opt, schedule, cfg.engine, plan)


def prepare_data(cfg: FinetuneConfig, pre, tok):
    """The task's splits, encoded, and its label names. task.heldout_fraction against the checkpoint's
    data.val_fraction is checked before (megamlm.preflight)."""
    heldout = cfg.task.heldout_fraction or (pre.val_fraction or 0.0)
    splits = D.exclude(D.read_splits(cfg.task, heldout), cfg.task.exclude_labels)
    if cfg.task.max_examples:
        splits["train"] = splits["train"][: cfg.task.max_examples]
    for s in D.SPLITS:
        if not splits[s]:
            raise D.DataError(f"the {s} split of task.reader={cfg.task.reader} is empty")
    labels = D.label_names(cfg.task, splits)
    l2i = {name: i for i, name in enumerate(labels)}
    enc = {s: D.encode_split(splits[s], tok, cfg.task, l2i, s) for s in D.SPLITS}
    return splits, enc, labels


@dataclass
class TaskData:
    """What a run reads before its process group: the pretrained encoder, the tokenizer, the splits (as
    examples and encoded) and the label names."""

    pre: object  # megamlm.finetune.weights.Pretrained
    tok: object  # megamlm.tokenizer.Tokenizer
    splits: dict
    enc: dict
    labels: list[str]


def load_task(cfg: FinetuneConfig) -> TaskData:
    from megamlm.finetune.weights import load_pretrained
    from megamlm.tokenizer import Tokenizer

    pre = load_pretrained(cfg.init.checkpoint)
    tok = Tokenizer(cfg.init.tokenizer or pre.tokenizer)  # preflight found one
    splits, enc, labels = prepare_data(cfg, pre, tok)
    return TaskData(pre, tok, splits, enc, labels)


def finetune(cfg: FinetuneConfig, resume: str | None = None, shutdown: bool = True, fresh_folder: bool = False) -> dict:
    """Run one fine-tuning on this rank; returns the summary (also written to output_dir/summary.json).
    ``shutdown=False`` keeps the process group for a next run in this process (``--seeds``).
    ``fresh_folder``: the caller moved an earlier run aside (``--move-old-run``); start fresh."""
    from megamlm.distributed.env import from_environ
    from megamlm.engine import disable_ds_shm_op, init_distributed, resolve_backend, select_ops
    from megamlm.preflight import finetune_problems

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    de = _single_process_port(from_environ())
    problems = finetune_problems(cfg, de.world_size)  # the config and its files, before any process group
    if problems:
        raise ConfigError(problems, f"finetune with world size {de.world_size}")
    data = load_task(cfg)
    tag = None if fresh_folder else ckpt.resolve_resume(resume, cfg.checkpoint_dir)
    kernels = select_ops(cfg.engine)  # checked in preflight: it cannot fail here
    disable_ds_shm_op()
    init_distributed(de, resolve_backend(cfg.engine))
    run = FinetuneRun.start(cfg, data, de, kernels, tag)
    stopped = run.train()
    summary = run.test_and_summarise(stopped)
    run.close(shutdown)
    return summary


class FinetuneRun:
    """One fine-tuning on this rank once the process group is up: the engine, the run's position
    (:class:`EpochPosition`) and evaluation record (:class:`EvalTrack`), kept typed and written into the
    checkpoint's TrainState at :meth:`save` only; the TensorBoard writer (rank 0) and the evaluator."""

    def __init__(self, cfg: FinetuneConfig, data: TaskData, de, engine, state: ckpt.TrainState, history: list,
                 writer, encoder_before: dict | None):
        self.cfg, self.data, self.engine, self.state, self.history, self.writer = (
            cfg, data, engine, state, history, writer)
        self.rank, self.world = de.rank, de.world_size
        self.pos = EpochPosition.from_state(state.loader)
        self.track = EvalTrack.from_state(state.counters)
        self.window = LossWindow()
        self.saved_step = state.step  # the step of the newest checkpoint (the resumed one, or 0)
        self.encoder_before = encoder_before  # train.freeze_encoder: to show it unchanged
        self.out_dir, self.ckpt_dir = Path(cfg.train.output_dir), Path(cfg.checkpoint_dir)
        self.best_path = self.out_dir / "best" / "model.pt"
        self.model_meta = {"model": asdict(data.pre.model), "labels": data.labels}
        self.steps_per_epoch = math.ceil(len(data.enc["train"]) / cfg.train.batch_size)
        self.val_eval = self._evaluator("validation")

    @classmethod
    def start(cls, cfg: FinetuneConfig, data: TaskData, de, kernels, tag: str | None) -> FinetuneRun:
        """The model on the ops backend ``kernels`` (backend, description), its engine, and the state of
        checkpoint ``tag`` (None: fresh)."""
        from megamlm import ops

        backend, said = kernels
        model = ops.use(build_model(cfg, data.pre, len(data.labels)), backend)
        if cfg.engine.compile:
            model.encoder.compile_blocks()
            said += "; encoder blocks under torch.compile"
        if de.rank == 0:
            log.info("kernels: %s", said)
        before = {k: v.clone() for k, v in model.encoder.state_dict().items()} if cfg.train.freeze_encoder else None
        total = math.ceil(len(data.enc["train"]) / cfg.train.batch_size) * cfg.train.epochs
        engine = build_ft_engine(model, cfg, ft_batch_plan(cfg, de.world_size), total)
        torch.manual_seed(cfg.train.seed + 1 + de.rank)  # dropout stream per rank
        state = ckpt.TrainState(loader=EpochPosition().to_state(), counters=EvalTrack().to_state())
        history = []
        if tag:
            state = ckpt.load(engine, cfg.checkpoint_dir, tag, rank=de.rank, model_cfg=asdict(data.pre.model))
            log.info("resumed from %s at step %d", Path(cfg.checkpoint_dir) / tag, state.step)
            saved = Path(cfg.train.output_dir) / "history.json"
            history = [h for h in (json.loads(saved.read_text()) if saved.is_file() else []) if h["step"] <= state.step]
        return cls(cfg, data, de, engine, state, history, _writer(cfg, de.rank), before)

    def _evaluator(self, split: str) -> Evaluator:
        d = self.data
        return Evaluator(self.cfg, d.enc[split], d.splits[split], d.labels, self.engine.device, self.world, self.rank)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def train(self) -> bool:
        """Epochs until ``train.epochs`` or early stopping, then a checkpoint of the end (always, also with
        checkpoint.every_evals=0); True when early stopping ended it."""
        t0 = time.perf_counter()
        # a resumed run that had stopped early stays stopped (it would train on and replace the best weights)
        stopped = self.track.exhausted(self.cfg.train.patience)
        while self.pos.epoch < self.cfg.train.epochs and not stopped:
            stopped = self.train_epoch()
        self.state.elapsed_seconds += time.perf_counter() - t0
        self.save()
        if stopped and self.rank == 0:
            log.info("early stop at step %d: %d evaluations without a better %s", self.state.step,
                     self.track.bad_evals, self.cfg.metric)
        return stopped

    def train_epoch(self) -> bool:
        """The rest of this epoch from its position, validating every ``train.eval_every`` steps (0: at the
        epoch's end, once the position is the next epoch's start); True when early stopping says stop."""
        t = self.cfg.train
        order = D.epoch_order(len(self.data.enc["train"]), t.seed, self.pos.epoch)
        while self.pos.index < self.steps_per_epoch:
            self.train_step(order)
            if t.eval_every and self.state.step % t.eval_every == 0 and self.evaluate_and_track():
                return True
        self.pos.next_epoch()
        return not t.eval_every and self.evaluate_and_track()

    def train_step(self, order) -> None:
        """One optimizer step: this rank's share of the step's ``train.batch_size`` examples (the epoch's last
        step wraps around to its start), the loss divided by the step's global target count."""
        t, enc, engine = self.cfg.train, self.data.enc["train"], self.engine
        micro, start = t.batch_size // self.world, self.pos.index * t.batch_size
        step_idx = [int(order[(start + k) % len(enc)]) for k in range(t.batch_size)]
        mine = step_idx[self.rank * micro: (self.rank + 1) * micro]
        n_global = sum(int((enc[i].labels != IGNORE_INDEX).sum()) if enc[i].labels.ndim else 1 for i in step_idx)
        out = engine(D.collate([enc[i] for i in mine], packed=t.packing).to(engine.device))
        engine.backward(out.loss_sum / n_global * self.world)  # DeepSpeed averages over ranks: undo it
        engine.step()
        self.state.step += 1
        self.state.consumed_samples += t.batch_size
        self.pos.index += 1
        self.window.add(float(out.loss_sum.detach()) * self.world, n_global)
        if self.state.step % t.log_every == 0 and self.writer is not None:
            self.writer.add_scalar("train/loss", self.window.take(), self.state.step)
            self.writer.add_scalar("train/lr_head", float(engine.get_lr()[-1]), self.state.step)

    def evaluate_and_track(self) -> bool:
        """Validation; the best weights when it is the best; history, log and TensorBoard; a checkpoint every
        ``checkpoint.every_evals`` evaluations. True when early stopping says stop."""
        m, step = self.val_eval(self.engine.module), self.state.step
        if self.track.record(self.cfg.metric, m, step) and self.rank == 0:
            self.save_best()
        self.history.append({"step": step, "epoch": self.pos.epoch, **m})
        if self.writer is not None:
            for k, v in m.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
            self.writer.flush()
        if self.rank == 0:
            (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1))
            log.info("step %d epoch %d | validation %s", step, self.pos.epoch,
                     " ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("entities")))
        every = self.cfg.checkpoint.every_evals
        if every and self.track.evals % every == 0:
            self.save()
        return self.track.exhausted(self.cfg.train.patience)

    def save_best(self) -> None:
        """The best weights (rank 0), in fp32 on the host, with what export and the test need."""
        weights = {k: v.detach().cpu().float() for k, v in self.engine.module.state_dict().items()}
        _save_atomic({"state_dict": weights, **self.model_meta, "task": asdict(self.cfg.task),
                      "head": asdict(self.cfg.head), "step": self.state.step, "tokenizer": str(self.data.tok.path)},
                     self.best_path)

    def save(self) -> None:
        """A checkpoint of this step, unless the newest one is of it; the position and the evaluation record
        go into the TrainState's ``loader`` and ``counters`` dicts here."""
        if self.state.step == self.saved_step:
            return
        self.state.loader, self.state.counters = self.pos.to_state(), self.track.to_state()
        ckpt.save(self.engine, self.ckpt_dir, self.state, rank=self.rank,
                  config_yaml=dump_finetune_config(self.cfg, self.model_meta), tokenizer_path=self.data.tok.path,
                  keep_last=self.cfg.checkpoint.keep_last, barrier=self.barrier)
        self.saved_step = self.state.step

    def test_and_summarise(self, stopped: bool) -> dict:
        """The best weights on the test split; the summary (rank 0 writes summary.json and the test scalars)."""
        self.barrier()
        best = torch.load(self.best_path, map_location="cpu", weights_only=True)
        self.engine.module.load_state_dict(best["state_dict"])
        test = self._evaluator("test")(self.engine.module)
        cfg, d = self.cfg, self.data
        summary = {"task": cfg.task.type, "reader": cfg.task.reader, "pair_mode": cfg.task.pair_mode,
                   "init": "random" if cfg.init.random else d.pre.source, "freeze_encoder": cfg.train.freeze_encoder,
                   "seed": cfg.train.seed, "labels": d.labels, "metric": cfg.metric, "best_step": best["step"],
                   "steps": self.state.step, "early_stopped": stopped, "sizes": {s: len(d.enc[s]) for s in D.SPLITS},
                   "validation_best": self.track.best, "test": test, "history": self.history,
                   "seconds": self.state.elapsed_seconds}
        if self.encoder_before is not None:
            after = self.engine.module.encoder.state_dict()
            summary["encoder_unchanged"] = all(torch.equal(v, after[k].cpu()) for k, v in self.encoder_before.items())
        if self.rank == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            if self.writer is not None:
                for k, v in test.items():
                    self.writer.add_scalar(f"test/{k}", v, self.state.step)
                self.writer.close()
        return summary

    def close(self, shutdown: bool) -> None:
        """The end on every rank: :func:`megamlm.engine.shutdown`, or (``shutdown=False``) the engine only,
        keeping the process group for a next run in this process."""
        from megamlm.engine import shutdown as shutdown_engine

        if shutdown:
            shutdown_engine(self.engine, self.world)
        else:
            self.barrier()
            self.engine.destroy()


def _writer(cfg: FinetuneConfig, rank: int):
    """Rank 0 makes the run folder and, with telemetry.tensorboard, the TensorBoard writer."""
    if rank != 0:
        return None
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.telemetry.tensorboard:
        return None
    from megamlm.telemetry import TensorBoardWriter

    return TensorBoardWriter(str(out_dir / "tb"), dump_finetune_config(cfg))


def _save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then one rename: a crash at any point leaves
    the previous best weights whole (or none), never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _single_process_port(de):
    """Without a launcher, DistEnv's port is the fixed 29500: two concurrent single-process runs (seeds in
    parallel, tests beside a run) would collide. Take MASTER_PORT if set, else a free port."""
    import dataclasses
    import socket

    if de.launcher != "single":
        return de
    port = os.environ.get("MASTER_PORT")
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return dataclasses.replace(de, master_port=int(port))


def main_from_cli(config_path: str, overrides: list[str], resume: str | None, seeds: int = 1,
                  report: bool = False, export: str | None = None, move_old_run: bool = False) -> int:
    from megamlm.distributed.env import from_environ
    from megamlm.finetune.config import load_finetune_config
    from megamlm.finetune.metrics import seed_summary
    from megamlm.telemetry import setup_logging

    de = from_environ()
    cfg = load_finetune_config(config_path, overrides)
    setup_logging(cfg.telemetry.log_level if de.rank == 0 else "WARNING")
    if seeds > 1 and resume not in (None, "none", "auto"):
        raise ConfigError([f"--seeds {seeds} with --resume {resume!r}: use --resume auto"])
    base = Path(cfg.train.output_dir)
    if export:  # before any training: an output that cannot be written fails in seconds, not at the end
        from megamlm.convert import check_output

        check_output(Path(export))
    if move_old_run:
        if resume not in (None, "none"):
            raise ConfigError([f"--move-old-run starts a fresh run; it cannot go with --resume {resume}"])
        if de.rank == 0:
            ckpt.move_old_run(base, cfg.checkpoint_dir, inputs=[cfg.init.checkpoint, cfg.init.tokenizer, cfg.task.path])
    summaries = []
    for k in range(seeds):
        c = cfg
        if seeds > 1:
            c = load_finetune_config(config_path, list(overrides) + [f"train.seed={cfg.train.seed + k}",
                                                                     f"train.output_dir={base / f'seed{k}'}"])
        summaries.append(finetune(c, resume, shutdown=k == seeds - 1, fresh_folder=move_old_run))
    if de.rank != 0:
        return 0
    for s in summaries:
        print(f"seed {s['seed']}: test " + " ".join(f"{k} {v:.4f}" for k, v in s["test"].items()
                                                     if not k.startswith("entities")))
    if seeds > 1:
        agg = seed_summary([s["test"] for s in summaries])
        (base / "seeds.json").write_text(json.dumps({"seeds": [s["seed"] for s in summaries], "test": agg}, indent=1))
        print("over %d seeds: " % seeds + ", ".join(f"{k} median {v['median']:.4f} (min {v['min']:.4f}, max "
                                                   f"{v['max']:.4f}, std {v['std']:.4f})" for k, v in agg.items()
                                                   if k in ("accuracy", "macro_f1", "f1", "precision", "recall")))
    if report:
        from megamlm.finetune.report import write_report

        paths = write_report(base, summaries)
        print("report: " + ", ".join(str(p) for p in paths))
    if export:
        from megamlm.finetune.export import export_hf

        run = base / "seed0" if seeds > 1 else base
        export_hf(run / "best" / "model.pt", export)
        print(f"exported to {export}")
    return 0


