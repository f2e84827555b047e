"""Logging (rank-tagged) and, later in the flow, the TensorBoard sink and throughput meters.

TensorBoard is imported only by the code that writes events, so ``import megamlm`` stays light.
"""

from __future__ import annotations

import logging
import os
import sys


def rank_tag() -> str:
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID")
    return f"[rank{rank}]" if rank is not None else ""


def setup_logging(level: str = "INFO") -> None:
    """Root logging to stderr: time, level, rank, logger; idempotent."""
    fmt = f"%(asctime)s %(levelname).1s {rank_tag()}%(name)s: %(message)s".replace("  ", " ")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_megamlm", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    h._megamlm = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


class TensorBoardWriter:
    """Rank 0's TensorBoard sink under ``<output_dir>/tb``; other ranks get no writer at all."""

    def __init__(self, log_dir: str, config_yaml: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._w = SummaryWriter(log_dir=log_dir)
        if config_yaml:
            self._w.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def add_hparams(self, cfg_dict: dict, metrics: dict[str, float]) -> None:
        """The resolved config as hparams, with the run's final metrics (``hparam/<name>``)."""
        self._w.add_hparams(flat_hparams(cfg_dict), {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self._w.add_text(tag, text, step)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._w.add_scalar(tag, value, step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def flat_hparams(cfg_dict: dict) -> dict:
    """``{"section/key": value}`` for TensorBoard's hparams plugin (lists become strings)."""
    out = {}
    for section, values in cfg_dict.items():
        for k, v in values.items():
            out[f"{section}/{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def read_scalars(log_dir, tag: str) -> dict[int, float]:
    """Scalars of ``tag`` by step from every event file under ``log_dir``, oldest file first, so a
    resumed run's values (appended in new files) win for the steps it repeated."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in sorted(Path(log_dir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                out[e.step] = e.value
    return out
