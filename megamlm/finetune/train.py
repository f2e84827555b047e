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
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace


import torch

from megamlm import checkpoint as ckpt
from megamlm.config import ConfigError
from megamlm.labels import IGNORE_INDEX
from megamlm.finetune import data as D
from megamlm.finetune.config import FinetuneConfig, dump_finetune_config
from megamlm.finetune.heads import FinetuneModel, param_groups
from megamlm.finetune.metrics import classification_metrics, entity_prf

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


def build_ft_engine(model: FinetuneModel, cfg: FinetuneConfig, world_size: int, total: int):
    """deepspeed.initialize with pretraining's DeepSpeed config builder and two learning rates."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from megamlm.engine import GuardedAdamW, WarmupDecay, build_ds_config, own_clipping

    if cfg.train.batch_size % world_size:
        raise ConfigError([f"train.batch_size={cfg.train.batch_size} is not a multiple of the world size {world_size}"])
    o = cfg.optim
    shim = SimpleNamespace(parallel=SimpleNamespace(vocab_parallel_size=1),
                           data=SimpleNamespace(micro_batch_size=cfg.train.batch_size // world_size),
                           engine=cfg.engine, optim=SimpleNamespace(name="adamw", lr=o.head_lr, betas=o.betas,
                                                                     eps=o.eps, weight_decay=o.weight_decay))
    ds = build_ds_config(shim, world_size)
    groups = param_groups(model, o.encoder_lr, o.head_lr, o.weight_decay)
    kwargs = dict(lr=o.head_lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
    if cfg.engine.zero_stage == 0:  # it checks finiteness, keeps the norm and (fp32) clips: build_ds_config
        opt = GuardedAdamW(groups, max_norm=cfg.engine.grad_clip if own_clipping(shim) else 0.0, **kwargs)
    else:
        opt = torch.optim.AdamW(groups, **kwargs)
    sched = LambdaLR(opt, WarmupDecay(1.0, 0.0, int(o.warmup_ratio * total), total, o.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine


class Evaluator:
    """Predictions over a split on every rank's share, gathered, turned into metrics."""

    def __init__(self, cfg: FinetuneConfig, encoded, examples, labels, device, world_size, rank):
        self.cfg, self.enc, self.ex, self.labels = cfg, encoded, examples, labels
        self.device, self.world, self.rank = device, world_size, rank

    @torch.no_grad()
    def __call__(self, module) -> dict[str, float]:
        was = module.training
        module.eval()
        idx = list(range(self.rank, len(self.enc), self.world))
        preds: dict[int, object] = {}
        loss_sum, n = 0.0, 0
        bs = self.cfg.train.eval_batch_size
        for s in range(0, len(idx), bs):
            chunk = idx[s: s + bs]
            out = module(D.collate([self.enc[i] for i in chunk]).to(self.device))
            loss_sum += float(out.loss_sum)
            n += int(out.n_targets)
            am = out.logits.argmax(-1).cpu().numpy()
            for j, i in enumerate(chunk):
                if self.cfg.task.type == "token":
                    preds[i] = am[j][self.enc[i].first_piece].tolist()
                else:
                    preds[i] = int(am[j])
        module.train(was)
        if self.world > 1:
            import torch.distributed as dist

            parts = [None] * self.world
            dist.all_gather_object(parts, (preds, loss_sum, n))
            preds, loss_sum, n = {}, 0.0, 0
            for p, ls, c in parts:
                preds.update(p)
                loss_sum += ls
                n += c
        m = self.metrics(preds)
        m["loss"] = loss_sum / max(n, 1)
        return m

    def metrics(self, preds: dict[int, object]) -> dict[str, float]:
        L = self.labels
        if self.cfg.task.type == "token":
            gold = [list(self.ex[i].label) for i in range(len(self.ex))]
            pred = [[L[k] for k in preds[i]] + ["O"] * (self.enc[i].n_words - len(preds[i]))
                    for i in range(len(self.ex))]
            return entity_prf(gold, pred)
        gold = [self.ex[i].label for i in range(len(self.ex))]
        return classification_metrics(gold, [L[preds[i]] for i in range(len(self.ex))])


def _better(metric: str, new: dict, best: float | None, best_loss: float | None) -> bool:
    """A higher metric (lower for loss); on a tie, a lower validation loss."""
    if best is None:
        return True
    if metric == "loss":
        return new["loss"] < best
    return new[metric] > best or (new[metric] == best and new["loss"] < (best_loss or float("inf")))


def prepare_data(cfg: FinetuneConfig, pre, tok):
    heldout = cfg.task.heldout_fraction or (pre.val_fraction or 0.0)
    if cfg.task.reader.startswith("wiki-"):
        if heldout <= 0:
            raise ConfigError(["task.heldout_fraction=0 and the init checkpoint names no data.val_fraction: set it"])
        if pre.val_fraction is not None and heldout > pre.val_fraction + 1e-12:
            raise ConfigError([f"task.heldout_fraction={heldout} exceeds the pretraining data.val_fraction="
                               f"{pre.val_fraction} of {pre.source}: the encoder saw some of these articles; "
                               f"pretrain with data.val_fraction >= {heldout}"])
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


def finetune(cfg: FinetuneConfig, resume: str | None = None, shutdown: bool = True, fresh_folder: bool = False) -> dict:
    """Run one fine-tuning on this rank; returns the summary (also written to output_dir/summary.json).
    ``shutdown=False`` keeps the process group for a next run in this process (``--seeds``).
    ``fresh_folder``: the caller moved an earlier run aside (``--move-old-run``); start fresh."""
    from megamlm.distributed.env import from_environ
    from megamlm import ops
    from megamlm.engine import disable_ds_shm_op, init_distributed, resolve_backend, select_ops, shutdown
    from megamlm.finetune.weights import load_pretrained
    from megamlm.tokenizer import Tokenizer

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    de = _single_process_port(from_environ())
    pre = load_pretrained(cfg.init.checkpoint)
    tok_path = cfg.init.tokenizer or pre.tokenizer
    if not tok_path:
        raise ConfigError([f"{pre.source} holds no SentencePiece tokenizer: set init.tokenizer"])
    tok = Tokenizer(tok_path)
    splits, enc, labels = prepare_data(cfg, pre, tok)
    out_dir = Path(cfg.train.output_dir)
    ckpt_dir = Path(cfg.checkpoint_dir)
    tag = None if fresh_folder else ckpt.resolve_resume(resume, ckpt_dir)

    try:  # engine.kernels on this machine, before any process group
        kernels, kernels_said = select_ops(cfg)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    disable_ds_shm_op()
    init_distributed(de, resolve_backend(cfg.engine))
    model = ops.use(build_model(cfg, pre, len(labels)), kernels)
    if de.rank == 0:
        log.info("kernels: %s", kernels_said)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()} if cfg.train.freeze_encoder else None
    n_train, world = len(enc["train"]), de.world_size
    steps_per_epoch = math.ceil(n_train / cfg.train.batch_size)
    total = steps_per_epoch * cfg.train.epochs
    engine = build_ft_engine(model, cfg, world, total)
    torch.manual_seed(cfg.train.seed + 1 + de.rank)  # dropout stream per rank
    model_meta = {"model": asdict(pre.model), "labels": labels}
    state = ckpt.TrainState(loader={"epoch": 0, "index": 0}, counters={"bad_evals": 0})
    best_path = out_dir / "best" / "model.pt"
    if tag:
        state = ckpt.load(engine, ckpt_dir, tag, rank=de.rank, model_cfg=asdict(pre.model))
        log.info("resumed from %s at step %d", ckpt_dir / tag, state.step)
    history = json.loads((out_dir / "history.json").read_text()) if tag and (out_dir / "history.json").is_file() else []
    history = [h for h in history if h["step"] <= state.step]

    writer = None
    if de.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.telemetry.tensorboard:
            from megamlm.telemetry import TensorBoardWriter

            writer = TensorBoardWriter(str(out_dir / "tb"), dump_finetune_config(cfg))
    dev = engine.device
    metric = cfg.metric
    val_eval = Evaluator(cfg, enc["validation"], splits["validation"], labels, dev, world, de.rank)

    def barrier():
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    def evaluate_and_track() -> bool:
        """Validation, best weights, history; True when early stopping says stop."""
        m = val_eval(engine.module)
        st = state.counters
        if _better(metric, m, st.get("best"), st.get("best_loss")):
            st.update(best=m[metric], best_loss=m["loss"], best_step=state.step, bad_evals=0)
            if de.rank == 0:
                _save_atomic({"state_dict": {k: v.detach().cpu().float() for k, v in engine.module.state_dict().items()},
                              **model_meta, "task": asdict(cfg.task), "head": asdict(cfg.head), "step": state.step,
                              "tokenizer": str(tok.path)}, best_path)
        else:
            st["bad_evals"] = st.get("bad_evals", 0) + 1
        history.append({"step": state.step, "epoch": state.loader["epoch"], **m})
        if writer is not None:
            for k, v in m.items():
                writer.add_scalar(f"eval/{k}", v, state.step)
            writer.flush()
        if de.rank == 0:
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            log.info("step %d epoch %d | validation %s", state.step, state.loader["epoch"],
                     " ".join(f"{k} {v:.4f}" for k, v in m.items() if not k.startswith("entities")))
        st["evals"] = st.get("evals", 0) + 1
        every = cfg.checkpoint.every_evals
        if every and st["evals"] % every == 0:
            save()
        return bool(cfg.train.patience) and st["bad_evals"] >= cfg.train.patience

    saved = {"step": state.step}  # the step of the newest checkpoint (the resumed one, or 0)

    def save():
        if state.step != saved["step"]:
            ckpt.save(engine, ckpt_dir, state, rank=de.rank, config_yaml=dump_finetune_config(cfg, model_meta),
                      tokenizer_path=tok.path, keep_last=cfg.checkpoint.keep_last, barrier=barrier)
            saved["step"] = state.step

    micro = cfg.train.batch_size // world
    t0 = time.perf_counter()
    # a resumed run that had stopped early stays stopped (it would train on and replace the best weights)
    stopped = bool(cfg.train.patience) and state.counters.get("bad_evals", 0) >= cfg.train.patience
    win_loss, win_n = 0.0, 0
    while state.loader["epoch"] < cfg.train.epochs and not stopped:
        ep = state.loader["epoch"]
        order = D.epoch_order(n_train, cfg.train.seed, ep)
        while state.loader["index"] < steps_per_epoch:
            s = state.loader["index"] * cfg.train.batch_size
            step_idx = [int(order[(s + k) % n_train]) for k in range(cfg.train.batch_size)]  # last step wraps
            mine = step_idx[de.rank * micro: (de.rank + 1) * micro]
            items = [enc["train"][i] for i in mine]
            b = D.collate(items)
            n_global = sum(int((enc["train"][i].labels != IGNORE_INDEX).sum()) if enc["train"][i].labels.ndim
                           else 1 for i in step_idx)
            out = engine(b.to(dev))
            engine.backward(out.loss_sum / n_global * world)  # DeepSpeed averages over ranks: undo it
            engine.step()
            state.step += 1
            state.consumed_samples += cfg.train.batch_size
            state.loader["index"] += 1
            win_loss += float(out.loss_sum.detach()) * world
            win_n += n_global
            if state.step % cfg.train.log_every == 0 and writer is not None:
                writer.add_scalar("train/loss", win_loss / max(win_n, 1), state.step)
                writer.add_scalar("train/lr_head", float(engine.get_lr()[-1]), state.step)
                win_loss, win_n = 0.0, 0
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                if evaluate_and_track():
                    stopped = True
                    break
        if not stopped:
            state.loader = {"epoch": ep + 1, "index": 0}
            if not cfg.train.eval_every:
                stopped = evaluate_and_track()
    state.elapsed_seconds += time.perf_counter() - t0
    save()  # the end of the run is always checkpointed (checkpoint.every_evals=0: only here)
    if stopped and de.rank == 0:
        log.info("early stop at step %d: %d evaluations without a better %s", state.step,
                 state.counters["bad_evals"], metric)
    barrier()
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    engine.module.load_state_dict(best["state_dict"])
    test = Evaluator(cfg, enc["test"], splits["test"], labels, dev, world, de.rank)(engine.module)
    summary = {"task": cfg.task.type, "reader": cfg.task.reader, "pair_mode": cfg.task.pair_mode,
               "init": "random" if cfg.init.random else pre.source, "freeze_encoder": cfg.train.freeze_encoder,
               "seed": cfg.train.seed, "labels": labels, "metric": metric, "best_step": best["step"],
               "steps": state.step, "early_stopped": stopped, "sizes": {s: len(enc[s]) for s in D.SPLITS},
               "validation_best": state.counters.get("best"), "test": test, "history": history,
               "seconds": state.elapsed_seconds}
    if enc_before is not None:
        after = engine.module.encoder.state_dict()
        summary["encoder_unchanged"] = all(torch.equal(enc_before[k], after[k].cpu()) for k in enc_before)
    if de.rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if writer is not None:
            for k, v in test.items():
                writer.add_scalar(f"test/{k}", v, state.step)
            writer.close()
    if shutdown:
        shutdown(engine, world)
    else:
        barrier()
        engine.destroy()
    return summary


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


