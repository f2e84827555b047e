"""The pretraining loop: batches → objectives → engine → telemetry → checkpoint cadence.

One optimizer step:

1. take ``accumulation`` micro-batches from the loader (host tensors; the loader agrees with the other
   ranks once per ``data.agree_every`` micro-batches, and a loader stop happens on every rank together);
2. one small all-reduce of the host counts — MLM targets, pairs, real tokens, sequences, and the stop
   flag (a preemption signal on any rank) — on the engine's device over every rank (NCCL on GPU: queued,
   the host does not wait), so every rank divides by the step's *global* number of targets, a device
   tensor (megamlm/ARCHITECTURE.md, seam 6), and all ranks stop at the same step;
3. forward/backward of each micro-batch with loss = its share of the step's mean loss;
4. ``engine.step()`` after each micro-batch (DeepSpeed updates at the accumulation boundary); it skips a step whose gradients are not finite (ZeRO 1–3 check the
   global norm; at ZeRO 0 :class:`GuardedAdamW` does) and the trainer counts it;
5. the counts' copy to the host, queued right after the all-reduce, is read (one host sync on GPU,
   which waits for that copy only, not for the step's kernels).

The metrics are summed on the device and read every ``train.log_every`` steps. ``train/collectives_per_step``
and ``train/host_syncs_per_step`` count what the loop and the loader issue (DeepSpeed's own aside).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megamlm.errors import MegamlmError
from megamlm import checkpoint as ckpt
from megamlm.config import Config, dump_config
from megamlm.model.terms import metrics_from_sums
from megamlm.objectives import LossTerms, objective_weights, step_denominators, weighted_sum
from megamlm.steps import (LogWindow, RunClock, StepCounts, StepProfiler, StepResult, fmt_disc, fmt_eta, fmt_mfu,
                           peak_memory_gb, sum_terms)

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


class Trainer:
    """Holds the engine, the loaders and the state; :meth:`run` trains until the budget or a stop."""

    def __init__(self, cfg: Config, engine, plan, topology, dist_env, tokenizer, train_loader, make_eval_loader,
                 state: ckpt.TrainState, writer=None, peak_flops: float = 0.0,
                 vocab_parallel: dict | None = None, datasheet_flops: float = 0.0):
        self.cfg, self.engine, self.plan, self.topo, self.env = cfg, engine, plan, topology, dist_env
        self.tok = tokenizer
        self.loader = train_loader
        self.make_eval_loader = make_eval_loader
        self.state = state
        self.writer = writer
        self.peak_flops = peak_flops  # measured matmul peak per device (train/mfu)
        self.datasheet_flops = datasheet_flops  # the GPU's datasheet peak (train/mfu_datasheet), 0: unknown
        self.device = engine.device
        self.stop = StopFlag()
        if cfg.checkpoint.save_on_signal:
            self.stop.install()  # before iter(train_loader) forks the workers
        self.losses: list[float] = []  # per-step total loss when log_every == 1 (tests, resume checks)
        self.host_group = topology.host_group  # gloo over every rank: the checkpoint's barrier and agreement
        self._agreements_seen = 0  # the loader's agreements already counted in a step
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

            dist.all_reduce(t, group=self.host_group)
        return t.tolist()

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.host_group)

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
        """One optimizer step; ``micro`` None (the loader stopped, on every rank together): no step, and
        ``loader_stopped`` says to save the state from before the step (the loader's mark)."""
        if micro is None:
            return StepResult(stop=True, loader_stopped=True)
        # Ranks of one vocab-parallel group hold the same batch: divide their share out.
        vp = self.topo.vp_size
        counts = StepCounts([sum(b.n_targets for b in micro) / vp,
                             sum(int(b.pair_labels.numel()) for b in micro if b.pair_labels is not None) / vp,
                             sum(b.n_tokens for b in micro) / vp, sum(b.n_examples for b in micro) / vp,
                             float(self.stop.signum != 0)], self.device, self.env.world_size)
        g = counts.device_values
        denominators = step_denominators(g[0], g[1], g[2])  # targets, pairs, real tokens (ELECTRA's discriminator)
        weights = objective_weights(self.cfg.objective)
        scale = self.plan.dp * self.plan.accumulation  # DeepSpeed averages over both: undo it
        summed = None
        for b in [self._to_device(b) for b in micro]:  # every copy queued before the first forward
            terms = self.engine(b)
            loss = weighted_sum(terms, denominators, weights) * scale
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed's protocol: every micro-batch; it updates at the boundary only
            summed = sum_terms(summed, terms)
        _, _, g_tok, g_seq, stop = counts.host()
        agreements = getattr(self.loader, "agreements", 0) - self._agreements_seen
        self._agreements_seen += agreements
        return StepResult(summed, g_tok, g_seq, self._flops(micro), self.engine.was_step_applied(), stop > 0,
                          rank_tokens=float(sum(b.n_tokens for b in micro)),
                          slots=float(sum(b.input_ids.numel() for b in micro)),
                          collectives=agreements + counts.collectives, host_syncs=agreements + counts.host_syncs)

    def _to_device(self, b):
        """A host batch's copy to the device, asynchronous on CUDA from pinned memory (pinned here when the
        loader's thread did not: no workers, or another batch source)."""
        if self.device.type == "cuda" and not b.input_ids.is_pinned():
            b = b.pin_memory()
        return b.to(self.device, non_blocking=True)

    def _flops(self, micro) -> float:
        if not self.peak_flops:
            return 0.0
        from megamlm.flops import generator_flops_shape, train_flops

        m = self.cfg.model
        gen = generator_flops_shape(m, self.cfg.objective)
        return sum(train_flops(b, m.hidden_size, m.num_layers, m.ffn_size, self.tok.vocab_size,
                               self.cfg.objective.pair != "none", gen) for b in micro)

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
            summed = sum_terms(summed, self.engine(b.to(self.device)))
        batches.close()
        self.engine.train()
        if summed is None:
            return {}
        return self._reduce_metrics(summed)

    def _reduce_metrics(self, terms: LossTerms) -> dict[str, float]:
        """Sum terms over data-parallel ranks (on the device), then one host read."""
        names, flat = terms.flat()
        t = torch.stack([x.to(self.device) for x in flat])
        if self.topo.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.dp_group)
        out = metrics_from_sums(dict(zip(names, t.tolist())))
        weights = objective_weights(self.cfg.objective)
        out["loss"] = sum(w * out[f"{k}_loss"] for k, w in weights.items() if f"{k}_loss" in out)
        return out

    def _rank_spread(self, window: "LogWindow", memory_gb: float) -> dict[str, float]:
        """The slowest and fastest rank's step time and data wait (ms per step) and the largest peak memory,
        gathered once per log line over the host group: a straggler or a starving loader shows here."""
        n = max(window.steps, 1)
        mine = torch.tensor([1e3 * window.step_s / n, 1e3 * window.data_wait_s / n, memory_gb], dtype=torch.float64)
        ranks = mine[None]
        if self.env.world_size > 1:
            import torch.distributed as dist

            out = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
            dist.all_gather(out, mine, group=self.host_group)
            ranks = torch.stack(out)
        step_ms, wait_ms, mem = ranks.unbind(1)
        return {"step_ms_max": float(step_ms.max()), "step_ms_min": float(step_ms.min()),
                "data_wait_ms_max": float(wait_ms.max()), "data_wait_ms_min": float(wait_ms.min()),
                "slowest_rank": float(int((step_ms + wait_ms).argmax())), "memory_gb_max": float(mem.max())}

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
                     ev["mlm_accuracy"], f", pair accuracy {ev['pair_accuracy']:.4f}" if "pair_accuracy" in ev
                     else fmt_disc(ev))
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
        profiler = StepProfiler(cfg.train.profile_steps, Path(cfg.train.output_dir) / "profile", self.env.rank,
                                self.device)
        while self._budget_left():
            step = self._one_step(window, clock, profiler)
            if step.loader_stopped:
                st.elapsed_seconds = clock.elapsed()
                result["preempted"] = True
                self._save_after_loader_stop()
                break
            st.elapsed_seconds = clock.elapsed()
            if step.stop:
                tag = self.save()
                result["preempted"] = True
                log.warning("preempted: checkpoint %s saved at step %d; resume with --resume auto", tag, st.step)
                break
            self._scheduled_eval_and_save()
        profiler.close()
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

    def _one_step(self, window: LogWindow, clock: RunClock, profiler: StepProfiler, record: list | None = None):
        """One step of the loop: its micro-batches (timed: the data wait), the step, the state's counts, and
        the log line when one is due (``window`` then starts over). ``record``: gets the micro-batches."""
        st = self.state
        profiler.before(st.step + 1)
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        t1 = time.perf_counter()
        step = self.train_step(micro)
        step.data_wait_s, step.step_s = t1 - t0, time.perf_counter() - t1
        profiler.after(st.step + 1)
        if step.loader_stopped:
            return step
        if record is not None:
            record.append(micro)
        self._count_step(step)
        window.add(step)
        if st.step % self.cfg.train.log_every == 0 or not self._budget_left():
            self._log_window(window, clock)
            window.reset()
        return step

    def run_steps(self, n: int, record: list | None = None) -> list[StepResult]:
        """``n`` steps of the loop exactly as :meth:`run` takes them (loader, step, counts, logging), without
        evaluations or checkpoints: what ``megamlm bench loop`` times. ``record`` gets each step's micro-batches."""
        window, clock = LogWindow(), RunClock(self.state.elapsed_seconds, self.state.step)
        profiler = StepProfiler([], Path("."), self.env.rank, self.device)
        return [self._one_step(window, clock, profiler, record) for _ in range(n)]

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
            m["collectives_per_step"] = window.collectives / window.steps  # the loop's and the loader's
            m["host_syncs_per_step"] = window.host_syncs / window.steps
        if self.peak_flops:  # flops were counted on this rank's batches: scale by data-parallel size
            m["mfu"] = window.flops * self.plan.dp / dt / (self.peak_flops * self.env.world_size)
            if self.datasheet_flops:
                m["mfu_datasheet"] = m["mfu"] * self.peak_flops / self.datasheet_flops
        m["lr"] = float(self.engine.get_lr()[0])
        gn = self.engine.get_global_grad_norm()
        m["grad_norm"] = float(gn) if gn is not None else float("nan")
        m["loss_scale"] = loss_scale(self.engine)
        m["skipped_steps"] = float(st.counters.get("skipped_steps", 0))
        for k, v in getattr(self.loader, "stats", {}).items():
            m[f"data_{k}"] = float(v)
        m["memory_gb"] = peak_memory_gb(self.device)
        m.update(self._rank_spread(window, m["memory_gb"]))
        if t_cfg.log_every == 1:
            self.losses.append(m["loss"])
        self._log(m, "train")
        if self.env.rank == 0:
            rate = (st.step - clock.steps_at_start) / max(clock.this_process(), 1e-9)  # steps/s of this process
            eta = (t_cfg.max_steps - st.step) / rate if t_cfg.max_steps and rate > 0 else float("nan")
            log.info("step %d | loss %.4f mlm %.4f acc %.3f%s | lr %.2e | gnorm %.2f | %.0f tok/s, %.0f tok/step, "
                     "%.1f ex/micro, %.0f%% pad%s | eta %s",
                     st.step, m["loss"], m["mlm_loss"], m["mlm_accuracy"],
                     f" pair {m['pair_accuracy']:.3f}" if "pair_accuracy" in m else fmt_disc(m), m["lr"],
                     m["grad_norm"], m["tokens_per_second"], window.tokens / max(window.steps, 1),
                     m.get("examples_per_micro_batch", 0.0), 100 * m["padding_share"],
                     fmt_mfu(m), fmt_eta(eta))

    def _scheduled_eval_and_save(self) -> None:
        cfg, step = self.cfg, self.state.step
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self._budget_left():
            self._evaluate_and_log()
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and self._budget_left():
            self.save()
