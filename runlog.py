"""The run's logs in <check-dir>/logs: metrics.jsonl, samples.jsonl and TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path


def _step(line: str) -> float:
    """The step of a log line; a line cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class RunLog:
    """One JSON line per step/epoch and per sample, mirrored to TensorBoard; continued across resumes.

    On resume, lines and events after the checkpoint's step are dropped first, so the logs show each
    step exactly once even when the interrupted run got further than its last checkpoint.
    Only the main process writes (`enabled=False` elsewhere).
    """

    def __init__(self, folder: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        for path in (self.metrics_path, self.samples_path):
            lines = path.read_text().splitlines() if path.exists() else []
            path.write_text("".join(line + "\n" for line in lines if _step(line) <= resume_step))
        self.tensorboard = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def _append(self, path: Path, record: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self, step: int, epoch: int, **values: float) -> None:
        """`train_loss=...` becomes the TensorBoard scalar `train/loss`."""
        if self.enabled:
            self._append(self.metrics_path, {"step": step, "epoch": epoch, **values})
            for name, value in values.items():
                self.tensorboard.add_scalar(name.replace("_", "/", 1), value, step)

    def samples(self, step: int, epoch: int, prompts: list[str], texts: list[str]) -> None:
        if self.enabled:
            for prompt, text in zip(prompts, texts, strict=True):
                self._append(self.samples_path, {"step": step, "epoch": epoch, "prompt": prompt, "text": text})
            self.tensorboard.add_text("samples", "\n\n---\n\n".join(texts), step)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self.tensorboard.close()
