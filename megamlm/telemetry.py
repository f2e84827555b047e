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
