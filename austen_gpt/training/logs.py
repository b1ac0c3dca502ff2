"""The run's logs in <check-dir>/logs: run.yaml (its settings), metrics.jsonl and samples.jsonl (the project's
own record), curves.png, and the trackers of --report-to (TensorBoard by default, wandb, MLflow) through
Accelerate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from austen_gpt.cli import RUN_FILE_RECORD
from austen_gpt.training.curves import plot_curves

TRACKERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "austen-gpt"  # the trackers' project (wandb) or experiment (MLflow); TensorBoard's subfolder


RUN_FILE = "run.yaml"  # `python train.py --config <check-dir>/logs/run.yaml` repeats the run
NOT_SETTINGS = ("config", "resume", "resume_from", "overwrite_output_dir")  # where a run starts, not what it is


def write_run_file(folder: Path, requested: dict[str, Any], resolved: dict[str, Any]) -> Path:
    """The run's settings as a run file: every flag's value as requested (`precision: auto` stays auto, to be
    resolved again on the machine that reads it), then under `resolved:` what this machine made of them, a
    record that --config never reads."""
    settings = {key: value for key, value in requested.items() if key not in NOT_SETTINGS}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_FILE
    path.write_text(yaml.safe_dump({**settings, RUN_FILE_RECORD: resolved}, sort_keys=False, allow_unicode=True))
    return path


def _step(line: str) -> float:
    """The step of a log line; a line cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def tracker_settings(report_to: list[str], folder: Path, resume_step: int) -> dict[str, Any]:
    """Accelerator(**this) for --report-to: the trackers, and where the file-based ones write."""
    trackers = [name for name in report_to if name != "none"]
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in os.environ:
        # A file store beside the run's other logs: MLflow's own default wants a database (SQLAlchemy),
        # which the light mlflow-skinny install lacks. MLflow keeps reading and writing file stores, but
        # only when told it may.
        os.environ["MLFLOW_TRACKING_URI"] = (folder / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return {"log_with": trackers or None, "project_dir": str(folder)}


class RunLog:
    """One JSON line per step and validation, and per sample; the same numbers to the trackers; curves.png
    redrawn at each validation. Continued across resumes.

    On resume, lines and TensorBoard events after the checkpoint's step are dropped first, so the logs show
    each step exactly once even when the interrupted run got further than its last checkpoint. Only the
    main process writes files; every process enters and leaves (the trackers' start and end are collective).
    """

    def __init__(self, folder: Path, resume_step: int, accelerator, config: dict[str, Any]):
        self.accelerator, self.enabled = accelerator, accelerator.is_main_process
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        if self.enabled:
            folder.mkdir(parents=True, exist_ok=True)
            for path in (self.metrics_path, self.samples_path):
                lines = path.read_text().splitlines() if path.exists() else []
                path.write_text("".join(line + "\n" for line in lines if _step(line) <= resume_step))
        purge = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step else {}
        wandb = {"wandb": {"dir": str(folder)}}
        # TensorBoard's hyperparameters take numbers, strings and booleans only.
        hyperparameters = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
        accelerator.init_trackers(PROJECT, hyperparameters, init_kwargs={**purge, **wandb})

    def _append(self, path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, step: int, epoch: int, **values: float) -> None:
        """`train_loss=...` becomes the tracker scalar `train/loss`."""
        if self.enabled:
            self._append(self.metrics_path, {"step": step, "epoch": epoch, **values})
        self.accelerator.log({name.replace("_", "/", 1): value for name, value in values.items()}, step=step)

    def samples(self, step: int, epoch: int, prompts: list[str], texts: list[str]) -> None:
        if not self.enabled:
            return
        for prompt, text in zip(prompts, texts, strict=True):
            self._append(self.samples_path, {"step": step, "epoch": epoch, "prompt": prompt, "text": text})
        for tracker in self.accelerator.trackers:  # text only where it reads as text
            if tracker.name == "tensorboard":
                tracker.writer.add_text("samples", "\n\n---\n\n".join(texts), step)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def curves(self, best_step: int | None) -> None:
        if self.enabled:
            plot_curves(self.records(), self.metrics_path.parent / "curves.png", best_step)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.accelerator.end_training()  # the trackers' last writes, then the processes part
