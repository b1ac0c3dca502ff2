"""Two processes (torchrun, gloo on CPU) train like one process with the same global batch, and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
from conftest import REPO, assert_user_error, run_script, train_args
from safetensors.torch import load_file

COMMON = ["--max-input-length", "64", "--sample-every", "0", "--lr", "1e-3"]
# bf16 rounding or dropout masks would differ by design
EXACT = ["--precision", "fp32", "--dropout", "0", "--epochs", "1"]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """train.py in two CPU processes, as the README's multi-process command runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "train.py"), *args]
    options = dict(cwd=cwd, env=env, text=True, stdout=PIPE, stderr=PIPE, start_new_session=True)
    with subprocess.Popen(command, **options) as run:
        try:
            stdout, stderr = run.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)  # the workers too, not only torchrun
            raise
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def val_losses(run: Path) -> list[float]:
    lines = (run / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, small_data):
    one, two = tmp_path / "one", tmp_path / "two"
    settings = [*COMMON, *EXACT, "--sample-every", "10"]  # samples are drawn on every process, printed by one
    single = run_script(
        "train.py", *train_args(one, tiny_model_dir, small_data, *settings, "--batch-size", "8"), cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(*train_args(two, tiny_model_dir, small_data, *settings, "--batch-size", "4"), cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "8 examples per optimizer step (4 x 1 accumulated x 2 processes)" in double.stdout
    assert "linear decay to 0 at step 24" in double.stdout  # 189 examples in global batches of 8
    assert max_difference(weights(one / "out"), weights(two / "out")) < 1e-4
    assert val_losses(one) == pytest.approx(val_losses(two), rel=1e-5)
    # only the first process writes: one log line per step, one checkpoint message
    metrics = (two / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len((one / "Checkpoints/logs/metrics.jsonl").read_text().splitlines())
    assert double.stdout.count("saved ") == 1 and double.stdout.count("final model in") == 1
    samples = (two / "Checkpoints/logs/samples.jsonl").read_text().splitlines()
    assert len(samples) == len((one / "Checkpoints/logs/samples.jsonl").read_text().splitlines()) == 6
    assert double.stdout.count("[step 10]") == 3  # three prompts, printed once


def test_two_process_resume_is_exact_and_needs_two_processes(tmp_path, tiny_model_dir, small_data):
    """Dropout on: each process draws its own masks, and its random state is in the checkpoint."""
    settings = [*COMMON, "--batch-size", "4", "--epochs", "1", "--save-steps", "10"]
    whole = torchrun(*train_args(tmp_path / "whole", tiny_model_dir, small_data, *settings), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole/Checkpoints/Step_10", resumed / "Checkpoints/Step_10")
    again = train_args(resumed, tiny_model_dir, small_data, *settings, "--resume")
    assert_user_error(run_script("train.py", *again, cwd=tmp_path), "2 processes")  # one process would differ
    result = torchrun(*again, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert max_difference(weights(tmp_path / "whole/out"), weights(resumed / "out")) == 0.0

    one = tmp_path / "one"  # the same global batch in one process: other masks, about the same loss
    single = run_script(
        "train.py",
        *train_args(one, tiny_model_dir, small_data, *COMMON, "--batch-size", "8", "--epochs", "1"),
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert val_losses(one)[-1] == pytest.approx(val_losses(tmp_path / "whole")[-1], rel=0.02)


def test_lora_in_two_processes_equals_one_process(tmp_path, tiny_model_dir, small_data):
    lora = ["--lora", "True", "--rank-lora", "4", "--lora-dropout", "0", *COMMON, *EXACT]
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_script(
        "train.py", *train_args(one, tiny_model_dir, small_data, *lora, "--batch-size", "8"), cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = torchrun(*train_args(two, tiny_model_dir, small_data, *lora, "--batch-size", "4"), cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    adapters = "adapter_model.safetensors"
    assert max_difference(weights(one / "out", adapters), weights(two / "out", adapters)) < 1e-4
