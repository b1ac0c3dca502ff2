"""Damaged files from outside (an interrupted copy, a full disk, a dying volume): every script that loads a
model, adapter or checkpoint folder names the damaged file in one line and exits 2, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import train_args
from test_cli import run_in_process

import export
import inference
import style_report
import train


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated": cut_in_half,
    "zero bytes": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(b"\x00garbage" * 64),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, small_data) -> Path:
    """A full run (Epoch_1, Epoch_2, out) and a LoRA run (out: an adapter folder), one epoch-sized each."""
    root = tmp_path_factory.mktemp("runs")
    settings = ["--epochs", "2", "--max-input-length", "64", "--sample-every", "0", "--precision", "fp32"]
    assert train.main(train_args(root / "full", tiny_model_dir, small_data, *settings, "--data-cache", "")) == 0
    lora = ["--lora", "--rank-lora", "4", "--epochs", "1", "--data-cache", ""]
    assert train.main(train_args(root / "lora", tiny_model_dir, small_data, *settings[2:], *lora)) == 0
    return root


def damaged_copy(source: Path, tmp: Path, name: str, how: str) -> Path:
    folder = tmp / f"damaged-{source.name}"
    shutil.copytree(source, folder)
    DAMAGE[how](folder / name)
    return folder


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_model_folder_is_named_by_inference_and_the_style_report(runs, tmp_path, capsys, name, how):
    folder = damaged_copy(runs / "full/out", tmp_path, name, how)
    message = run_in_process(inference.main, ["--model-path", str(folder), "--prompt", "Emma"], capsys)
    assert f"{folder / name} is damaged" in message and "again" in message
    argv = ["--models", str(folder), "--n-samples", "10", "--out", str(tmp_path / "report")]
    assert f"{folder / name} is damaged" in run_in_process(style_report.main, argv, capsys)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_damaged_adapter_folder_is_named_by_inference_and_export(runs, tmp_path, capsys, name, how):
    folder = damaged_copy(runs / "lora/out", tmp_path, name, how)
    assert f"{folder / name} is damaged" in run_in_process(inference.main, ["--model-path", str(folder)], capsys)
    argv = ["--adapter", str(folder), "--out", str(tmp_path / "merged")]
    assert f"{folder / name} is damaged" in run_in_process(export.main, argv, capsys)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json", "config.json"])
def test_resuming_from_a_damaged_checkpoint_names_the_file(
    runs, tmp_path, capsys, tiny_model_dir, small_data, name, how
):
    check_dir = tmp_path / "Checkpoints"
    shutil.copytree(runs / "full/Checkpoints/Epoch_1", check_dir / "Epoch_1")
    DAMAGE[how](check_dir / "Epoch_1" / name)
    argv = train_args(tmp_path, tiny_model_dir, small_data, "--epochs", "2", "--max-input-length", "64")
    for resume in (["--resume"], ["--restore-file", "Epoch_1", "--load-checkpoint", "True"]):
        message = run_in_process(train.main, [*argv, "--sample-every", "0", *resume], capsys)
        assert f"{check_dir / 'Epoch_1' / name} is damaged" in message and "--resume-from" in message
    assert (check_dir / "Epoch_1" / name).exists() and not (tmp_path / "out").exists()  # nothing deleted
