"""The trainer's parts that run without an engine: the preemption flag (real signals, a real forked child)
and the helpers of the logging window. The loop itself runs for real in tests/e2e/test_pretrain.py
(resume exactness, SIGTERM at a step boundary, a signal inside the loader) and tests/distributed.

A failure here points at megamlm/trainer.py (StopFlag) or megamlm/steps.py (LogWindow, RunClock, StepCounts,
StepProfiler, fmt_eta).
"""

import json
import os
import signal
import time

import torch

from megamlm.model.terms import LossTerms
from megamlm.steps import LogWindow, RunClock, StepCounts, StepProfiler, StepResult, fmt_eta
from megamlm.trainer import StopFlag


def test_stop_flag_records_sigterm_and_sigusr1_and_restores_the_old_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    flag = StopFlag()
    flag.install()
    flag.install()  # idempotent: the old handlers stay the ones from before
    try:
        assert flag.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signum == signal.SIGUSR1  # Python runs the handler before the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_forked_worker_ignores_the_signal_and_only_the_rank_stops():
    """Slurm signals every process of a step: a DataLoader worker forked after install() inherits the
    handler, survives SIGUSR1 (the default action would kill it) and does not set the flag."""
    flag = StopFlag()
    flag.install()
    try:
        pid = os.fork()
        if pid == 0:  # the child: a stand-in for a forked DataLoader worker
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            os._exit(3 if flag.signum == 0 else 4)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status  # alive, flag untouched
        assert flag.signum == 0
    finally:
        flag.uninstall()


def _terms(loss: float, n: int, correct: int) -> LossTerms:
    t = LossTerms()
    t.add("mlm", torch.tensor(loss, requires_grad=True) * 1.0, torch.tensor(n), torch.tensor(correct))
    return t


def test_the_logging_window_sums_detached_terms():
    w = LogWindow()
    w.add(StepResult(_terms(2.0, 4, 1), tokens=100, sequences=4, flops=1e6))
    w.add(StepResult(_terms(3.0, 6, 2), tokens=50, sequences=2, flops=2e6))
    assert (w.tokens, w.sequences, w.flops) == (150, 6, 3e6)
    window = w.terms
    assert not window.loss_sum["mlm"].requires_grad  # the window holds no graph between steps
    assert float(window.loss_sum["mlm"]) == 5.0 and int(window.n_targets["mlm"]) == 10
    assert window.to_floats()["mlm_loss"] == 0.5 and abs(window.to_floats()["mlm_accuracy"] - 0.3) < 1e-6


def test_the_run_clock_counts_the_time_before_a_resume():
    clock = RunClock(elapsed_before=100.0, steps_at_start=7)
    assert 100.0 <= clock.elapsed() < 101.0 and 0.0 <= clock.this_process() < 1.0
    assert clock.steps_at_start == 7


def test_eta_format():
    assert fmt_eta(3725.9) == "1h02m05s" and fmt_eta(0) == "0h00m00s"
    assert fmt_eta(float("nan")) == "?" and fmt_eta(float("inf")) == "?"


def test_step_counts_in_one_process_need_no_collective_and_no_sync():
    """One process on the CPU: the counts are the device tensor itself; nothing crosses a process, nothing
    is waited for (the counters of train/collectives_per_step and train/host_syncs_per_step are 0)."""
    c = StepCounts([12.0, 4.0, 500.0, 4.0, 0.0], torch.device("cpu"), world_size=1)
    assert c.device_values.dtype == torch.float64 and c.device_values[0].item() == 12.0
    assert c.host() == [12.0, 4.0, 500.0, 4.0, 0.0] and (c.collectives, c.host_syncs) == (0, 0)


def test_the_profiler_traces_the_listed_steps_on_rank_0_only(tmp_path):
    x = torch.randn(64, 64)
    for rank in (0, 1):
        prof = StepProfiler([3, 2], tmp_path / f"r{rank}", rank, torch.device("cpu"))
        for step in range(1, 6):
            prof.before(step)
            (x @ x).sum()
            prof.after(step)
        prof.close()
    trace = json.loads((tmp_path / "r0" / "rank0_steps2-3.json").read_text())
    assert any("mm" in e.get("name", "") for e in trace["traceEvents"])
    table = (tmp_path / "r0" / "rank0_steps2-3.txt").read_text()
    assert "aten::mm" in table and "Self CPU" in table
    assert not (tmp_path / "r1").exists()
