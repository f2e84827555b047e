"""The pretraining loop: batches → objectives → engine → telemetry → checkpoint cadence.

One optimizer step:

1. take ``accumulation`` micro-batches from the loader (host tensors);
2. one small all-reduce on a CPU (gloo) group of the host counts — MLM targets, pairs, real tokens,
   sequences, and the stop flag (a preemption signal on any rank) — so every rank divides by the
   step's *global* number of targets (megamlm/ARCHITECTURE.md, seam 6) and all ranks stop at the same step;
3. forward/backward of each micro-batch with loss = its share of the step's mean loss;
4. ``engine.step()`` after each micro-batch (DeepSpeed updates at the accumulation boundary); it skips a step whose gradients are not finite (ZeRO 1–3 check the
   global norm; at ZeRO 0 :class:`GuardedAdamW` does) and the trainer counts it.

No host sync on the device inside a step: the metrics are summed on the device and read every
``train.log_every`` steps.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megamlm.errors import MegamlmError
from megamlm import checkpoint as ckpt
from megamlm.config import Config, dump_config
from megamlm.objectives import LossTerms, combine

log = logging.getLogger(__name__)


class TrainingStopped(MegamlmError, RuntimeError):
    """The run stopped on purpose (non-finite steps in a row); a checkpoint of the last good state exists."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (preemption); read at step boundaries and agreed on by all ranks."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        self._pid = 0

    def install(self) -> None:
        """Idempotent. Install before the loader forks its workers: Slurm signals every process of a step,
        and a worker with the default action would die of SIGUSR1; with this handler inherited it ignores it."""
        if self._old:
            return
        self._pid = os.getpid()
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: only the rank itself stops
        self.signum = signum
        log.warning("received signal %d: checkpoint and stop at the end of this step", signum)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _sum_terms(summed: LossTerms | None, terms: LossTerms) -> LossTerms:
    terms = terms.detach()
    return terms if summed is None else summed + terms


class Trainer:
    """Holds the engine, the loaders and the state; :meth:`run` trains until the budget or a stop."""

    def __init__(self, cfg: Config, engine, plan, topology, dist_env, tokenizer, train_loader, make_eval_loader,
                 state: ckpt.TrainState, writer=None, peak_flops: float = 0.0, meta_group=None,
                 vocab_parallel: dict | None = None):
        self.cfg, self.engine, self.plan, self.topo, self.env = cfg, engine, plan, topology, dist_env
        self.tok = tokenizer
        self.loader = train_loader
        self.make_eval_loader = make_eval_loader
        self.state = state
        self.writer = writer
        self.peak_flops = peak_flops
        self.device = engine.device
        self.stop = StopFlag()
        if cfg.checkpoint.save_on_signal:
            self.stop.install()  # before iter(train_loader) forks the workers
        self.losses: list[float] = []  # per-step total loss when log_every == 1 (tests, resume checks)
        self.meta_group = meta_group  # gloo group over all ranks (None: the default group, when it is gloo)
        self.dp_group = topology.dp_group
        if cfg.checkpoint.save_on_signal and hasattr(train_loader, "should_stop"):
            # A loader that waits (skipping bad shards, between epochs) is told of a signal, and stops
            # on every rank together (LoaderStopped): the step then ends in a checkpoint (see run()).
            train_loader.should_stop = lambda: self.stop.signum != 0
        self._batches = iter(train_loader)
        self._nonfinite_in_a_row = 0
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        self.vocab_parallel = vocab_parallel  # the vocabulary split, written beside each checkpoint
        self._saved_step = state.step  # the step of the checkpoint this run started from (0: fresh)

    # ------------------------------------------------------------------ collectives
    def _all_reduce_host(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.meta_group)
        return t.tolist()

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.meta_group)

    # ------------------------------------------------------------------ one step
    def _next_micro_batches(self):
        """The step's micro-batches, or None when the loader was stopped by a signal while it waited
        (then on every rank of this data-parallel group; train_step tells the others)."""
        from megamlm.data.loader import LoaderStopped

        if hasattr(self.loader, "mark"):
            self.loader.mark()  # the position a stop among these micro-batches saves
        try:
            return [next(self._batches) for _ in range(self.plan.accumulation)]
        except LoaderStopped as e:
            log.warning("%s: no step; the checkpoint keeps the data position before this step", e)
            return None

    def train_step(self, micro) -> StepResult:
        """One optimizer step; ``micro`` None (this rank's loader stopped): no step on any rank, and
        ``loader_stopped`` says to save the state from before the step (the loader's mark)."""
        micro_ = micro or []
        n_mlm = sum(b.n_targets for b in micro_)
        n_pair = sum(int(b.pair_labels.numel()) for b in micro_ if b.pair_labels is not None)
        n_tok = sum(b.n_tokens for b in micro_)
        n_seq = sum(b.n_examples for b in micro_)
        # Global counts of this step + the stop flags, agreed by every rank in one tiny CPU all-reduce.
        # Ranks of one vocab-parallel group hold the same batch: divide their share out.
        vp = self.topo.vp_size
        g_mlm, g_pair, g_tok, g_seq, stop, stopped = self._all_reduce_host(
            [n_mlm / vp, n_pair / vp, n_tok / vp, n_seq / vp, float(self.stop.signum != 0), float(micro is None)])
        if stopped:  # some rank has no micro-batches: nobody steps (their batches are read again on resume)
            return StepResult(stop=True, loader_stopped=True)
        scale = self.plan.dp * self.plan.accumulation  # DeepSpeed averages over both: undo it
        summed = None
        w = self.cfg.objective.pair_loss_weight
        for b in micro:
            b = b.to(self.device)
            terms = self.engine(b)
            loss = combine(terms, g_mlm, g_pair if g_pair else None, w) * scale
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed's protocol: every micro-batch; it updates at the boundary only
            summed = _sum_terms(summed, terms)
        return StepResult(summed, g_tok, g_seq, self._flops(micro), self.engine.was_step_applied(), stop > 0,
                          rank_tokens=float(n_tok), slots=float(sum(b.input_ids.numel() for b in micro_)))

    def _flops(self, micro) -> float:
        if not self.peak_flops:
            return 0.0
        from megamlm.flops import train_flops

        m = self.cfg.model
        return sum(train_flops(b, m.hidden_size, m.num_layers, m.ffn_size, self.tok.vocab_size,
                               self.cfg.objective.pair != "none") for b in micro)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        # Evaluation must leave the training RNG streams (dropout) as they were: the cadence of
        # evaluations, or a resume between them, then cannot change the training run.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.device.type == "cuda" else []):
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        """Held-out MLM loss / accuracy (and pair accuracy) over ``train.eval_batches`` batches per rank, at
        most one pass over the validation split, with the same masks at every evaluation (epoch 0)."""
        loader = self.make_eval_loader()
        if loader is None:
            return {}
        self.engine.eval()
        summed = None
        batches = loader.iter_with_info() if hasattr(loader, "iter_with_info") else ((b, {}) for b in loader)
        for i, (b, info) in enumerate(batches):
            if i >= self.cfg.train.eval_batches or info.get("epoch", 0) > 0:
                break  # at most one pass over the validation split; every rank stops at the same batch
            summed = _sum_terms(summed, self.engine(b.to(self.device)))
        batches.close()
        self.engine.train()
        if summed is None:
            return {}
        return self._reduce_metrics(summed)

    def _reduce_metrics(self, terms: LossTerms) -> dict[str, float]:
        """Sum terms over data-parallel ranks (on the device), then one host read."""
        flat = []
        keys = sorted(terms.loss_sum)
        for k in keys:
            flat += [terms.loss_sum[k].float(), terms.n_targets[k].float(), terms.n_correct[k].float()]
        t = torch.stack([x.to(self.device) for x in flat])
        if self.topo.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.dp_group)
        vals = t.tolist()
        out = {}
        for i, k in enumerate(keys):
            s, n, c = vals[3 * i: 3 * i + 3]
            out[f"{k}_loss"] = s / max(n, 1.0)
            out[f"{k}_accuracy"] = c / max(n, 1.0)
            out[f"{k}_targets"] = n
        out["loss"] = out.get("mlm_loss", 0.0) + self.cfg.objective.pair_loss_weight * out.get("pair_loss", 0.0)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, at_mark: bool = False) -> str:
        """Checkpoint the current step; a run resumed at its budget (no step since) has nothing new to save.
        ``at_mark``: with the loader's position before the micro-batches taken since the step (a stop)."""
        tag = ckpt.tag_for(self.state.step)
        if self.state.step == self._saved_step:  # the same decision on every rank: no file system read
            return tag
        self.state.loader = self.loader.state_dict(at_mark=True) if at_mark else self.loader.state_dict()
        self._saved_step = self.state.step
        return ckpt.save(self.engine, self.ckpt_dir, self.state, rank=self.env.rank, config_yaml=dump_config(self.cfg),
                         tokenizer_path=self.tok.path, keep_last=self.cfg.checkpoint.keep_last,
                         barrier=self._barrier, vocab_parallel=self.vocab_parallel,
                         agree=lambda x: self._all_reduce_host([x])[0])

    # ------------------------------------------------------------------ the loop
    def _budget_left(self) -> bool:
        t = self.cfg.train
        if t.max_steps and self.state.step >= t.max_steps:
            return False
        if t.max_tokens and self.state.consumed_tokens >= t.max_tokens:
            return False
        return True

    def _log(self, metrics: dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, self.state.step)

    def _evaluate_and_log(self) -> dict:
        ev = self.evaluate()
        self._log(ev, "eval")
        if self.env.rank == 0 and ev:
            log.info("held-out at step %d: mlm loss %.4f, mlm accuracy %.4f%s", self.state.step, ev["mlm_loss"],
                     ev["mlm_accuracy"], f", pair accuracy {ev['pair_accuracy']:.4f}" if "pair_accuracy" in ev else "")
        return ev

    def run(self) -> dict:
        cfg, st = self.cfg, self.state
        if cfg.checkpoint.save_on_signal:
            self.stop.install()
        result: dict = {"preempted": False}
        if cfg.train.eval_every:
            result["eval_start"] = self._evaluate_and_log()
        window = LogWindow()
        clock = RunClock(st.elapsed_seconds, st.step)
        while self._budget_left():
            step = self.train_step(self._next_micro_batches())
            if step.loader_stopped:
                st.elapsed_seconds = clock.elapsed()
                result["preempted"] = True
                self._save_after_loader_stop()
                break
            self._count_step(step)
            window.add(step)
            if st.step % cfg.train.log_every == 0 or not self._budget_left():
                self._log_window(window, clock)
                window = LogWindow()
            st.elapsed_seconds = clock.elapsed()
            if step.stop:
                tag = self.save()
                result["preempted"] = True
                log.warning("preempted: checkpoint %s saved at step %d; resume with --resume auto", tag, st.step)
                break
            self._scheduled_eval_and_save()
        if not result["preempted"]:
            self.save()
            if cfg.train.eval_every:
                result["eval_end"] = self._evaluate_and_log()
        self.stop.uninstall()
        result["state"] = asdict(st)
        result["losses"] = list(self.losses)
        if self.writer is not None:
            self.writer.flush()
        return result

    def _save_after_loader_stop(self) -> None:
        """A stop inside the loader: save the data position from before the step (the loader's mark)."""
        if self.state.step == 0:
            log.warning("preempted while reading data, before the first step: nothing to save")
            return
        tag = self.save(at_mark=True)
        log.warning("preempted while reading data: checkpoint %s of step %d; resume with --resume auto",
                    tag, self.state.step)

    def _count_step(self, step: "StepResult") -> None:
        """The state after a step: its counts, and the guard against non-finite steps in a row."""
        st, t_cfg = self.state, self.cfg.train
        st.step += 1
        st.consumed_tokens += int(step.tokens)
        st.consumed_samples += int(step.sequences)
        if step.applied:
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        st.counters["skipped_steps"] = st.counters.get("skipped_steps", 0) + 1
        log.warning("step %d: non-finite gradients, update skipped (%d in a row)", st.step, self._nonfinite_in_a_row)
        if self._nonfinite_in_a_row >= t_cfg.max_nonfinite_steps:
            self.save()
            raise TrainingStopped(
                f"{self._nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                f"{t_cfg.max_nonfinite_steps}) at step {st.step}; the last good state is saved in "
                f"{self.ckpt_dir}. Lower optim.lr, check the data, or use engine.precision=bf16/fp32")

    def _log_window(self, window: "LogWindow", clock: "RunClock") -> None:
        """The metrics of the steps since the last log line: TensorBoard, and the progress line on rank 0."""
        from megamlm.engine import loss_scale

        st, t_cfg = self.state, self.cfg.train
        m = self._reduce_metrics(window.terms)
        dt = time.perf_counter() - window.start
        m["tokens_per_second"] = window.tokens / dt
        m["samples_per_second"] = window.sequences / dt
        m["padding_share"] = window.padding_share()  # of this rank's slots; 0 with data.packing
        m["tokens_per_step"] = window.tokens / max(window.steps, 1)  # real tokens, all ranks
        if window.steps:  # global average: examples per micro-batch (data.micro_batch_size unless packed)
            m["examples_per_micro_batch"] = window.sequences / (window.steps * self.plan.dp * self.plan.accumulation)
        if self.peak_flops:  # flops were counted on this rank's batches: scale by data-parallel size
            m["mfu"] = window.flops * self.plan.dp / dt / (self.peak_flops * self.env.world_size)
        m["lr"] = float(self.engine.get_lr()[0])
        gn = self.engine.get_global_grad_norm()
        m["grad_norm"] = float(gn) if gn is not None else float("nan")
        m["loss_scale"] = loss_scale(self.engine)
        m["skipped_steps"] = float(st.counters.get("skipped_steps", 0))
        for k, v in getattr(self.loader, "stats", {}).items():
            m[f"data_{k}"] = float(v)
        m["memory_gb"] = _peak_memory_gb(self.device)
        if t_cfg.log_every == 1:
            self.losses.append(m["loss"])
        self._log(m, "train")
        if self.env.rank == 0:
            rate = (st.step - clock.steps_at_start) / max(clock.this_process(), 1e-9)  # steps/s of this process
            eta = (t_cfg.max_steps - st.step) / rate if t_cfg.max_steps and rate > 0 else float("nan")
            log.info("step %d | loss %.4f mlm %.4f acc %.3f%s | lr %.2e | gnorm %.2f | %.0f tok/s, %.0f tok/step, "
                     "%.1f ex/micro, %.0f%% pad%s | eta %s",
                     st.step, m["loss"], m["mlm_loss"], m["mlm_accuracy"],
                     f" pair {m['pair_accuracy']:.3f}" if "pair_accuracy" in m else "", m["lr"],
                     m["grad_norm"], m["tokens_per_second"], window.tokens / max(window.steps, 1),
                     m.get("examples_per_micro_batch", 0.0), 100 * m["padding_share"],
                     f" | mfu {m['mfu']:.1%}" if "mfu" in m else "", _fmt_eta(eta))

    def _scheduled_eval_and_save(self) -> None:
        cfg, step = self.cfg, self.state.step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self._budget_left():
            self._evaluate_and_log()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and self._budget_left():
            self.save()


@dataclass
class StepResult:
    """What one optimizer step reports: this rank's summed loss terms (None when no step ran), the step's
    global real tokens and sequences, this rank's FLOPs, whether the update was applied (finite
    gradients), whether any rank was signalled to stop, and whether a loader stopped (no step ran);
    ``rank_tokens`` / ``slots``: this rank's real tokens and the token slots its batches computed on
    (padding included; equal when packed)."""

    terms: LossTerms | None = None
    tokens: float = 0.0
    sequences: float = 0.0
    flops: float = 0.0
    applied: bool = True
    stop: bool = False
    loader_stopped: bool = False
    rank_tokens: float = 0.0
    slots: float = 0.0


@dataclass
class LogWindow:
    """The steps since the last log line: their loss terms (detached sums) and counts, and when it began."""

    terms: LossTerms | None = None
    tokens: float = 0.0
    sequences: float = 0.0
    flops: float = 0.0
    steps: int = 0
    rank_tokens: float = 0.0
    slots: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, step: StepResult) -> None:
        self.terms = _sum_terms(self.terms, step.terms)
        self.tokens += step.tokens
        self.sequences += step.sequences
        self.flops += step.flops
        self.steps += 1
        self.rank_tokens += step.rank_tokens
        self.slots += step.slots

    def padding_share(self) -> float:
        """The share of this rank's token slots that held padding (0 when packed)."""
        return 1.0 - self.rank_tokens / self.slots if self.slots else 0.0


class RunClock:
    """Wall time of the whole run across resumes (``elapsed_seconds`` of the checkpoint) and of this process."""

    def __init__(self, elapsed_before: float, steps_at_start: int):
        self.process_start = time.perf_counter()
        self.run_start = self.process_start - elapsed_before
        self.steps_at_start = steps_at_start

    def elapsed(self) -> float:
        return time.perf_counter() - self.run_start

    def this_process(self) -> float:
        return time.perf_counter() - self.process_start


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # peak resident memory of this process (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
