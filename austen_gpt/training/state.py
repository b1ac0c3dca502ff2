"""Where a run stands (step, epoch, best point, early stopping) and how a validation moves it on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # of trainer_state.json; checkpoints without one are version 1 (read the same way)


def judge_validation(
    state, metrics: dict[str, float], threshold: float, max_copied: float | None, measure: str = "val_loss"
) -> str:
    """Record a validation in `state` (a checkpoints.TrainingState) and say what it is.

    'best': the `measure` (lower is better: the validation loss, or with self-play the distinguishability)
    improves on the best so far by more than `threshold`, and (with `max_copied`) the
    samples copy no more than that share of their word 8-grams: the model of this point is the new best.
    'copying': it would have been best, but its samples copy too much. 'worse': no improvement.
    Early stopping counts every validation that is not 'best'.
    """
    state.metrics, state.last_validation_step = metrics, state.global_step
    improved = metrics[measure] < state.best_val_loss - threshold
    copying = max_copied is not None and metrics.get("style_copied_8grams", 0.0) > max_copied
    if improved and not copying:
        state.best_val_loss, state.best_metrics = metrics[measure], dict(metrics)
        state.best_step, state.best_epoch = state.global_step, state.current_epoch
        state.validations_without_improvement = 0
        return "best"
    state.validations_without_improvement += 1
    if improved:
        state.copy_guard_refusals.append(state.global_step)
        return "copying"
    return "worse"


@dataclass
class TrainingState:
    """Where a run is, and what it has learnt about its best point. Saved in every checkpoint's
    trainer_state.json, so that a resumed run takes the same decisions (best model, early stop) as an
    uninterrupted one."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    last_validation_step: int | None = None
    best_val_loss: float = math.inf  # the best validation loss (self-play: distinguishability) a candidate reached
    best_step: int | None = None  # where the model in <check-dir>/best/ comes from
    best_epoch: int | None = None  # the epoch (counted from 1) that step is in
    best_metrics: dict[str, float] = field(default_factory=dict)
    validations_without_improvement: int = 0  # early stopping's patience counter
    copy_guard_refusals: list[int] = field(default_factory=list)  # steps the copying guard kept from best/
    device_choices: dict[str, Any] | None = None  # hot_path.DeviceChoices the run started with, kept on resume
    last_checkpoint: Path | None = None  # the newest checkpoint written or resumed from (not saved)

    @property
    def current_epoch(self) -> int:
        """The epoch (counted from 1) that the last optimizer step belongs to."""
        return self.epoch + (self.batches_in_epoch > 0)

    def last_point(self) -> dict[str, Any]:
        """The run's last step and its numbers, as the final model's note records them."""
        return {"step": self.global_step, "epoch": self.current_epoch, **self.metrics}

    def to_json(self, settings: dict[str, Any], processes: int) -> dict[str, Any]:
        """trainer_state.json: the position, the metrics and the run's settings by their flag names (under
        "args", as checkpoints have always stored them)."""
        state = {key: value for key, value in asdict(self).items() if key != "last_checkpoint"}
        state["best_val_loss"] = self.best_val_loss if math.isfinite(self.best_val_loss) else None  # JSON has no inf
        return {"format_version": FORMAT_VERSION, **state, "processes": processes, "args": settings}

    @classmethod
    def from_json(cls, saved: dict[str, Any], checkpoint: Path) -> TrainingState:
        """Checkpoints of format 1 hold only the position and the metrics (with the best loss among them)."""
        known = {f.name for f in fields(cls)} - {"last_checkpoint"}
        state = cls(**{key: value for key, value in saved.items() if key in known}, last_checkpoint=checkpoint)
        best = saved.get("best_val_loss", saved["metrics"].get("val_best_loss"))
        state.best_val_loss = math.inf if best is None else best
        return state
