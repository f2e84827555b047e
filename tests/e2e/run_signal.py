"""Entry for signal tests: `python run_signal.py EPOCH -- megamlm-cli-args...` under any launcher.

Runs the real CLI; data-parallel rank 0 sends itself SIGTERM (a real signal, as Slurm sends before a
preemption) the moment its train loader finishes epoch ``EPOCH``, inside the loader, while the trainer
is taking a step's micro-batches: the one moment a stop can reach the loader rather than the step.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import megamlm.data.loader as loader_module  # noqa: E402
from megamlm.cli import main  # noqa: E402


def _signal_at_epoch_end(epoch: int) -> None:
    original = loader_module.Loader._end_epoch

    def _end_epoch(self, dropped, dropped_ex):
        if self.ds.split == "train" and self.epoch == epoch and self.topology.dp_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, dropped, dropped_ex)

    loader_module.Loader._end_epoch = _end_epoch


if __name__ == "__main__":
    epoch, sep, *args = sys.argv[1:]
    assert sep == "--", sys.argv
    _signal_at_epoch_end(int(epoch))
    sys.exit(main(args))
