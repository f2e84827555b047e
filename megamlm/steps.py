"""The training loop's records: what one step reports (:class:`StepResult`), the step's global counts
(:class:`StepCounts`, one all-reduce on the device), the steps since the last log line (:class:`LogWindow`),
the run's clock across resumes (:class:`RunClock`), the profiler of ``train.profile_steps``
(:class:`StepProfiler`) and the progress line's pieces. Used by megamlm/trainer.py alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamlm.objectives import LossTerms

log = logging.getLogger(__name__)

__all__ = ["StepResult", "StepCounts", "LogWindow", "RunClock", "StepProfiler", "sum_terms", "peak_memory_gb",
           "fmt_disc", "fmt_mfu", "fmt_eta"]


def sum_terms(summed: LossTerms | None, terms: LossTerms) -> LossTerms:
    terms = terms.detach()
    return terms if summed is None else summed + terms


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
    collectives: float = 0.0  # issued by the loop and the loader in this step (DeepSpeed's aside)
    host_syncs: float = 0.0  # of them and of the host reads, those the host waits in
    data_wait_s: float = 0.0  # this rank's wall time taking the step's micro-batches from the loader
    step_s: float = 0.0  # and running the step (host time: on GPU it includes the counts' read)


class StepProfiler:
    """``train.profile_steps``: rank 0 runs the torch profiler (CPU, and CUDA on a GPU) from the first listed
    step to the last and writes a Chrome trace, ``<output_dir>/profile/rank0_steps<a>-<b>.json``, and beside
    it ``.txt``: the ops' table (calls, self and total times), by self device time on a GPU, else by self
    CPU time, for a look without a trace viewer."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device):
        self.first, self.last = (min(steps), max(steps)) if steps and rank == 0 else (0, -1)
        self.out_dir, self.device, self.prof = out_dir, device, None

    def before(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank0_steps{self.first}-{self.last}.json"
        prof.export_chrome_trace(str(path))
        avg = prof.key_averages()
        sort = "self_device_time_total" if self.device.type != "cpu" else "self_cpu_time_total"
        path.with_suffix(".txt").write_text(avg.table(sort_by=sort, row_limit=50, max_name_column_width=60) + "\n")
        log.info("profile of steps %d-%d: %s (chrome://tracing or ui.perfetto.dev)", self.first, self.last, path)


def fmt_disc(m: dict) -> str:
    """ELECTRA's discriminator in the progress line (empty for the other objectives)."""
    if "disc_loss" not in m:
        return ""
    return (f" disc {m['disc_loss']:.4f} acc {m['disc_accuracy']:.3f} p/r {m['disc_precision']:.2f}/"
            f"{m['disc_recall']:.2f} replaced {m['replaced_share']:.1%}")


def fmt_mfu(m: dict) -> str:
    if "mfu" not in m:
        return ""
    return f" | mfu {m['mfu']:.1%}" + (f" ({m['mfu_datasheet']:.1%} of datasheet)" if "mfu_datasheet" in m else "")


class StepCounts:
    """A step's global counts and stop flag: one all-reduce on ``device`` over every rank, issued before
    the forward (on NCCL the host goes on at once), and a copy of the result to the host queued right
    behind it; :meth:`host` reads that copy, waiting for it alone (on CUDA, an event)."""

    def __init__(self, values: list[float], device: torch.device, world_size: int):
        cuda = device.type == "cuda"
        t = torch.tensor(values, dtype=torch.float64, pin_memory=cuda)
        t = t.to(device, non_blocking=True)
        self.collectives = 0
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)  # the default group: NCCL on GPU, gloo on CPU
            self.collectives = 1
        self.device_values = t
        # On a CPU device the all-reduce itself blocks; on CUDA the read below does (for the copy only).
        self.host_syncs = 1 if cuda or world_size > 1 else 0
        self._event = None
        if cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t

    def host(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


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
    collectives: float = 0.0
    host_syncs: float = 0.0
    data_wait_s: float = 0.0
    step_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        """Start a new window (after a log line)."""
        self.__init__()

    def add(self, step: StepResult) -> None:
        self.terms = sum_terms(self.terms, step.terms)
        self.tokens += step.tokens
        self.sequences += step.sequences
        self.flops += step.flops
        self.steps += 1
        self.rank_tokens += step.rank_tokens
        self.slots += step.slots
        self.collectives += step.collectives
        self.host_syncs += step.host_syncs
        self.data_wait_s += step.data_wait_s
        self.step_s += step.step_s

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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # peak resident memory of this process (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
