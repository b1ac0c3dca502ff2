"""Validation every N steps, the best model kept and exported, early stopping, the copying guard, curves, trackers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_in_process, run_script, train_args

from austen_gpt.training.flags import train_settings
from austen_gpt.training.loop import questionable_settings
from train import main

# A tiny model overfits 16 paragraphs within a few epochs at this learning rate: validation loss falls, then rises.
OVERFIT = (
    "--train-size 0.5 --epochs 40 --batch-size 4 --max-input-length 64 --lr 1e-2 --warmup-steps 0 "
    "--sample-every 0 --precision fp32 --eval-steps 2 --early-stopping-patience 3 --save-steps 1 --keep-last 1"
).split()


def paragraphs_file(folder: Path, paragraphs: list[str]) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def validations(run_dir: Path) -> list[dict]:
    lines = (run_dir / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "val_loss" in record]


@pytest.mark.slow
def test_an_overfitting_run_stops_early_and_exports_the_best_model(tmp_path, tiny_model_dir, austen_paragraphs):
    from matplotlib.image import imread

    data = paragraphs_file(tmp_path, austen_paragraphs[200:232])
    result = run_script("train.py", *train_args(tmp_path, tiny_model_dir, data, *OVERFIT), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    losses = [r["val_loss"] for r in validations(tmp_path)]
    lowest = losses.index(min(losses))
    assert 0 < lowest < len(losses) - 3 and losses[-1] > losses[lowest], losses  # fell, then rose
    assert len(losses) - 1 - lowest == 3  # stopped at the third validation without a new best
    assert "early stopping at step" in result.stdout and validations(tmp_path)[-1]["epoch"] < 40

    best = json.loads((tmp_path / "Checkpoints/best/best.json").read_text())
    assert best["val_loss"] == min(losses) and best["step"] == validations(tmp_path)[lowest]["step"]
    exported = (tmp_path / "out/model.safetensors").read_bytes()
    assert exported == (tmp_path / "Checkpoints/best/model.safetensors").read_bytes()
    last_step = validations(tmp_path)[-1]["step"]
    assert exported != (tmp_path / f"Checkpoints/Step_{last_step}/model.safetensors").read_bytes()
    summary = json.loads((tmp_path / "out/training_metrics.json").read_text())
    assert (summary["exported"], summary["step"], summary["last_step"]["step"]) == ("best", best["step"], last_step)
    assert f"the best model, from step {best['step']}" in result.stdout

    curves = imread(tmp_path / "Checkpoints/logs/curves.png")  # a real plot: a picture with lines on it
    assert curves.shape[0] > 300 and curves.shape[1] > 800 and curves[..., :3].std() > 0.05


@pytest.mark.slow
def test_the_copying_guard_keeps_a_copying_model_from_being_the_best(tmp_path, tiny_model_dir, austen_paragraphs):
    """A model drilled on one paragraph recites it (greedy samples: --top-k 1); as its validation loss falls
    below the best, the guard refuses the points whose samples copy too much. Also: --eval-style's measures are
    logged at every validation."""
    paragraph = next(p for p in austen_paragraphs[300:400] if 350 < len(p) < 450)
    data = paragraphs_file(tmp_path, [paragraph] * 100)
    settings = "--epochs 2 --batch-size 4 --max-input-length 64 --lr 6e-3 --warmup-steps 0 --sample-every 0"
    settings += " --precision fp32 --eval-steps 15 --eval-style --eval-style-samples 3 --top-k 1"
    argv = train_args(tmp_path, tiny_model_dir, data, *settings.split(), "--max-copied-8grams", "0.05")
    result = run_script("train.py", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for record in validations(tmp_path):  # --eval-style measured at every validation
        assert 0 <= record["style_p_author"] <= 1 and 0 <= record["style_copied_8grams"] <= 1
        assert record["style_names_per_1000_words"] >= 0
    assert {r["epoch"] for r in validations(tmp_path)} == {1, 2} and len(validations(tmp_path)) == 6
    assert "step 15 (epoch 1) style: P(author)" in result.stdout
    assert "warning: --eval-style logs no distinguishability: it needs --eval-style-samples 10" in result.stdout
    copying = [r["step"] for r in validations(tmp_path) if r["style_copied_8grams"] > 0.05]
    assert copying, [r["style_copied_8grams"] for r in validations(tmp_path)]  # it does copy
    state = json.loads((tmp_path / "Checkpoints/Epoch_2/trainer_state.json").read_text())
    assert state["copy_guard_refusals"] and set(state["copy_guard_refusals"]) <= set(copying)
    assert state["best_step"] not in copying
    step = state["copy_guard_refusals"][0]
    assert re.search(
        rf"step {step} \(epoch [12]\): the lowest validation loss so far, but its samples copy", result.stdout
    )
    assert "(--max-copied-8grams 0.05): not kept as the best model" in result.stdout


@pytest.mark.slow
def test_report_to_tensorboard_wandb_and_mlflow(tmp_path, tiny_model_dir, small_data, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    settings = "--epochs 1 --max-input-length 64 --sample-every 10 --max-output-length 12 --precision fp32"
    argv = train_args(tmp_path, tiny_model_dir, small_data, *settings.split(), "--report-to", "tensorboard", "wandb")
    argv += ["mlflow"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # MLflow: its default here, a store in the logs
    result = run_script("train.py", *argv, cwd=tmp_path, env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = tmp_path / "Checkpoints/logs"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert list((logs / "austen-gpt").glob("events.out.tfevents.*"))
    assert list((logs / "wandb").glob("offline-run-*/run-*.wandb"))
    client = MlflowClient((logs / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("austen-gpt").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [10, 20, 24]  # log points
    assert run.data.metrics["val/loss"] == pytest.approx(validations(tmp_path)[-1]["val_loss"])


def test_a_missing_tracker_package_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name))
    message = run_in_process(main, ["--report-to", "wandb"], capsys)
    assert "--report-to wandb needs the wandb package: pip install wandb" in message


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-copied-8grams", "0.01"], "--max-copied-8grams needs --eval-style"),
        (["--eval-style", "--max-copied-8grams", "5"], "--max-copied-8grams is a share in [0, 1]"),
        (["--early-stopping-patience", "-1"], "must be 0 (off) or more"),
        (["--early-stopping-threshold", "-0.1"], "--early-stopping-threshold must be 0 or more"),
        (["--report-to", "none", "wandb"], "--report-to none goes alone"),
    ],
)
def test_bad_validation_flags(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in run_in_process(main, argv, capsys)


def test_settings_that_cannot_do_what_they_say_are_named():
    def warnings(**changes) -> list[str]:
        flags = {"warmup_steps": 10, "lr": 1e-3, "eval_steps": 0, "early_stopping_patience": 0, "epochs": 2}
        settings = train_settings([*(f"--{k.replace('_', '-')}={v}" for k, v in {**flags, **changes}.items())])
        return questionable_settings(settings, batches_per_epoch=20, total_steps=40)

    assert warnings() == []
    (warmup,) = warnings(warmup_steps=100)
    assert "--warmup-steps 100 is longer than the whole run (40 steps)" in warmup and "peaks at 0.0004" in warmup
    assert "--eval-steps 50 is more than the run's 40 steps" in warnings(eval_steps=50)[0]
    assert "can never stop this run: it validates 2 times" in warnings(early_stopping_patience=2)[0]
    assert warnings(early_stopping_patience=2, eval_steps=5) == []  # 8 validations
