"""A fine-tuning run's position and its evaluation record, typed; the checkpoint keeps them as the plain
dicts :class:`megamlm.checkpoint.TrainState` holds (``loader`` = ``{"epoch", "index"}``, ``counters`` =
``{"best", "best_loss", "best_step", "bad_evals", "evals"}``), converted here at the save / load boundary
only, with the same keys as before (checkpoints of earlier runs resume)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["EpochPosition", "EvalTrack", "LossWindow"]


@dataclass
class EpochPosition:
    """Where training is: ``epoch`` (from 0) and ``index``, the steps already taken in it."""

    epoch: int = 0
    index: int = 0

    @classmethod
    def from_state(cls, loader: dict) -> EpochPosition:
        """From a checkpoint's ``TrainState.loader``."""
        return cls(int(loader.get("epoch", 0)), int(loader.get("index", 0)))

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def next_epoch(self) -> None:
        self.epoch, self.index = self.epoch + 1, 0


@dataclass
class EvalTrack:
    """The best validation so far (``metric``'s value, its loss, its step), evaluations since it
    (``bad_evals``) and in all (``evals``)."""

    best: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    evals: int = 0

    @classmethod
    def from_state(cls, counters: dict) -> EvalTrack:
        """From a checkpoint's ``TrainState.counters`` (a key not written yet keeps its default)."""
        known = {k: counters[k] for k in cls.__dataclass_fields__ if k in counters}
        return cls(**known)

    def to_state(self) -> dict:
        """The counters dict; a best not found yet is left out, as before."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def better(self, metric: str, m: dict) -> bool:
        """``m`` (one validation) beats the best: a higher metric (lower for loss); on a tie, a lower loss."""
        if self.best is None:
            return True
        if metric == "loss":
            return m["loss"] < self.best
        return m[metric] > self.best or (m[metric] == self.best and m["loss"] < (self.best_loss or float("inf")))

    def record(self, metric: str, m: dict, step: int) -> bool:
        """Count one validation at ``step``; True when it is the new best."""
        self.evals += 1
        if self.better(metric, m):
            self.best, self.best_loss, self.best_step, self.bad_evals = m[metric], m["loss"], step, 0
            return True
        self.bad_evals += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Early stopping (``train.patience`` > 0): that many evaluations without a better one."""
        return bool(patience) and self.bad_evals >= patience


@dataclass
class LossWindow:
    """The training loss since the last TensorBoard point: the summed loss and its target count."""

    loss_sum: float = 0.0
    targets: int = 0

    def add(self, loss_sum: float, targets: int) -> None:
        self.loss_sum += loss_sum
        self.targets += targets

    def take(self) -> float:
        """The window's mean loss; the window starts again."""
        mean = self.loss_sum / max(self.targets, 1)
        self.loss_sum, self.targets = 0.0, 0
        return mean
