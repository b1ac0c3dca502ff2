"""Damaged files from outside (an interrupted copy, a full disk, a dying volume): every script that loads a
model, adapter or checkpoint folder names the damaged file in one line and exits 2, never a traceback.
Checkpoints carry a manifest that catches what a well-formed file cannot show; a full disk loses nothing."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from conftest import run_in_process, train_args
from safetensors.torch import load_file

import export
import inference
import style_report
import train
from austen_gpt.cli import run_cli
from austen_gpt.models import integrity, saving
from austen_gpt.models.integrity import MANIFEST_KEY, safetensors_problem
from austen_gpt.models.saving import _fsync_tree, folder_bytes
from austen_gpt.training import checkpoints
from austen_gpt.training.checkpoints import TRAINER_STATE, TRAINING_STATE, save_checkpoint


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def change_one_byte(path: Path) -> None:
    """Bit rot: the same size, the same well-formed header, one byte of the data different."""
    data = bytearray(path.read_bytes())
    data[-len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": cut_in_half,
    "zero bytes": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(b"\x00garbage" * 64),
    "one byte changed": change_one_byte,
    "missing": Path.unlink,
}
SEEN_WITHOUT_A_MANIFEST = ["truncated", "zero bytes", "garbage"]  # a changed byte needs the checksum


RUNS_SETTINGS = ["--epochs", "2", "--max-input-length", "64", "--sample-every", "0", "--precision", "fp32"]
RUNS_SETTINGS += ["--data-cache", ""]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, small_data) -> Path:
    """A full run (Epoch_1, Epoch_2, out) and a LoRA run (Epoch_1, out: an adapter folder), one epoch-sized each."""
    root = tmp_path_factory.mktemp("runs")
    assert train.main(train_args(root / "full", tiny_model_dir, small_data, *RUNS_SETTINGS)) == 0
    lora = ["--lora", "--rank-lora", "4", "--epochs", "1"]
    assert train.main(train_args(root / "lora", tiny_model_dir, small_data, *RUNS_SETTINGS[2:], *lora)) == 0
    return root


def damaged_copy(source: Path, tmp: Path, name: str, how: str) -> Path:
    folder = tmp / f"damaged-{source.name}"
    shutil.copytree(source, folder)
    DAMAGE[how](folder / name)
    return folder


@pytest.mark.parametrize("how", SEEN_WITHOUT_A_MANIFEST)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_model_folder_is_named_by_inference_and_the_style_report(runs, tmp_path, capsys, name, how):
    folder = damaged_copy(runs / "full/out", tmp_path, name, how)
    message = run_in_process(inference.main, ["--model-path", str(folder), "--prompt", "Emma"], capsys)
    assert f"{folder / name} is damaged" in message and "again" in message
    argv = ["--models", str(folder), "--n-samples", "10", "--out", str(tmp_path / "report")]
    assert f"{folder / name} is damaged" in run_in_process(style_report.main, argv, capsys)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("how", SEEN_WITHOUT_A_MANIFEST)
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_damaged_adapter_folder_is_named_by_inference_and_export(runs, tmp_path, capsys, name, how):
    folder = damaged_copy(runs / "lora/out", tmp_path, name, how)
    assert f"{folder / name} is damaged" in run_in_process(inference.main, ["--model-path", str(folder)], capsys)
    argv = ["--adapter", str(folder), "--out", str(tmp_path / "merged")]
    assert f"{folder / name} is damaged" in run_in_process(export.main, argv, capsys)
    assert not (tmp_path / "merged").exists()


CHECKPOINT_DAMAGE = [("full", "model.safetensors", how) for how in [*SEEN_WITHOUT_A_MANIFEST, "one byte changed"]]
CHECKPOINT_DAMAGE += [("full", "config.json", "garbage"), ("full", "tokenizer.json", "missing")]
CHECKPOINT_DAMAGE += [("full", TRAINING_STATE, "truncated"), ("full", TRAINER_STATE, "garbage")]
CHECKPOINT_DAMAGE += [("lora", "adapter_model.safetensors", how) for how in SEEN_WITHOUT_A_MANIFEST]
CHECKPOINT_DAMAGE += [("lora", "adapter_config.json", "garbage")]


@pytest.mark.parametrize("run, name, how", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_refused_by_name_and_set_aside_by_resume(
    runs, tmp_path, capsys, tiny_model_dir, small_data, run, name, how
):
    """--resume-from and --restore-file: the checkpoint named is refused and left as it is. --resume: it is
    named, renamed Epoch_1.damaged, and with no other checkpoint left the run stops instead of starting over."""
    check_dir, damaged = tmp_path / "Checkpoints", tmp_path / "Checkpoints/Epoch_1" / name
    shutil.copytree(runs / run / "Checkpoints/Epoch_1", check_dir / "Epoch_1")
    DAMAGE[how](damaged)
    settings = RUNS_SETTINGS + (["--lora", "--rank-lora", "4"] if run == "lora" else [])
    argv = train_args(tmp_path, tiny_model_dir, small_data, *settings)
    for resume in (["--resume-from", "Epoch_1"], ["--restore-file", "Epoch_1", "--load-checkpoint", "True"]):
        message = run_in_process(train.main, [*argv, *resume], capsys)
        assert f"{damaged} is {'missing' if how == 'missing' else 'damaged'}" in message
        assert "--resume-from" in message and [p.name for p in check_dir.iterdir()] == ["Epoch_1"]

    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, [*argv, "--resume"])
    said, message = capsys.readouterr()
    assert exit_info.value.code == 2 and len(message.splitlines()) == 1
    assert message.startswith("error: --resume: no intact checkpoint left") and "(damaged: Epoch_1.damaged)" in message
    assert f"{damaged} is " in said and "renamed it Epoch_1.damaged" in said
    assert [p.name for p in check_dir.iterdir()] == ["Epoch_1.damaged"]  # nothing deleted


# ---- the manifest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["full", "lora"])
def test_every_checkpoint_file_is_in_the_manifest_with_its_true_size_and_checksum(runs, run):
    checkpoint = runs / run / "Checkpoints/Epoch_1"
    manifest = json.loads((checkpoint / TRAINER_STATE).read_text())[MANIFEST_KEY]
    assert set(manifest) == {p.name for p in checkpoint.iterdir()} - {TRAINER_STATE}
    for name, recorded in manifest.items():
        data = (checkpoint / name).read_bytes()
        assert recorded == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name


@pytest.mark.parametrize("adapters", [False, True])
def test_a_save_checksums_its_weights_and_state_as_it_writes_them(tmp_path, tiny_model_dir, adapters, monkeypatch):
    """Only the small files other code writes (config, tokenizer) are read back to checksum them."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.models.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if adapters:
        model = add_lora(model, 4, 8, 0.0, ["c_attn"], quantized=False, base_name=str(tiny_model_dir))
    read_back = []
    monkeypatch.setattr(integrity, "file_crc32", lambda path: read_back.append(path.name) or "00000000")
    state = {"rng": torch.arange(5)}
    save_checkpoint(tmp_path / "Step_1", model, load_tokenizer(tiny_model_dir), state, {"global_step": 1, "epoch": 0})
    weights = "adapter_model.safetensors" if adapters else "model.safetensors"
    assert weights not in read_back and TRAINING_STATE not in read_back
    assert "tokenizer.json" in read_back


def test_a_changed_byte_that_only_the_manifest_can_see_is_caught(runs, tmp_path, capsys):
    folder = damaged_copy(runs / "full/Checkpoints/Epoch_2", tmp_path, "model.safetensors", "one byte changed")
    assert safetensors_problem(folder / "model.safetensors") is None  # still a well-formed file
    message = run_in_process(inference.main, ["--model-path", str(folder), "--prompt", "Emma"], capsys)
    assert f"{folder / 'model.safetensors'} is damaged (its checksum differs from the one saved with it)" in message


# ---- --keep-last and full disks ---------------------------------------------------------------------------


def training_stops(argv: list[str], capsys) -> str:
    """train.py run until it stops, as the CLI runs it: exit code 1 and, after the progress bars, one line
    saying why (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 1 and last.startswith("error: ") and "Traceback" not in err, err[-2000:]
    return last


SHORT = ["--max-input-length", "64", "--sample-every", "0", "--precision", "fp32", "--data-cache", ""]


def test_keep_last_keeps_the_last_good_checkpoint_when_the_new_one_fails_its_check(
    tmp_path, capsys, tiny_model_dir, small_data, monkeypatch
):
    """A disk that damages Step_4 as it is written: the run stops, Step_2 stays, --resume goes on from it."""
    argv = train_args(tmp_path, tiny_model_dir, small_data, *SHORT, "--epochs", "1", "--save-steps", "2")
    argv += ["--keep-last", "1"]
    save_checkpoint = checkpoints.save_checkpoint

    def failing_disk(folder: Path, *args, **kwargs) -> None:
        save_checkpoint(folder, *args, **kwargs)
        if folder.name == "Step_4":
            DAMAGE["one byte changed"](folder / "model.safetensors")

    monkeypatch.setattr(checkpoints, "save_checkpoint", failing_disk)
    message = training_stops(argv, capsys)
    assert "Step_4/model.safetensors is damaged (its checksum differs" in message
    assert "right after it was saved" in message and "deleted no older checkpoint" in message
    check_dir = tmp_path / "Checkpoints"
    assert sorted(p.name for p in check_dir.glob("Step_*")) == ["Step_2", "Step_4.damaged"]
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    assert train.main([*argv, "--resume"]) == 0
    assert f"resumed from {check_dir / 'Step_2'}" in capsys.readouterr().out


def no_space_at(tmp_name: str):
    """An fsync that fails as on a full disk (where delayed allocation reports it) for the folder `tmp_name`,
    after a partial file was written there."""
    fsync_tree = _fsync_tree

    def full_disk(folder: Path) -> None:
        if folder.name == tmp_name:
            (folder / "partial.bin").write_bytes(bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync_tree(folder)

    return full_disk


def test_a_full_disk_during_a_checkpoint_save_stops_and_the_run_resumes_exactly(
    runs, tmp_path, capsys, tiny_model_dir, small_data, monkeypatch
):
    argv = train_args(tmp_path, tiny_model_dir, small_data, *RUNS_SETTINGS)
    monkeypatch.setattr(saving, "_fsync_tree", no_space_at("Epoch_2.tmp"))
    message = training_stops(argv, capsys)
    assert (
        f"the disk is full: saving {tmp_path / 'Checkpoints/Epoch_2'} needs " in message and "is free there" in message
    )
    assert "the partial Epoch_2.tmp is removed" in message and "resume with: python train.py" in message
    check_dir = tmp_path / "Checkpoints"
    assert sorted(p.name for p in check_dir.glob("Epoch_*")) == ["Epoch_1"] and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    assert_same_folder_weights(tmp_path / "out", runs / "full/out")


def test_a_full_disk_during_the_final_export_keeps_the_old_model_and_resume_writes_the_new(
    runs, tmp_path, capsys, tiny_model_dir, small_data, monkeypatch
):
    output = tmp_path / "out"
    shutil.copytree(runs / "lora/out", output)  # a model from before, which --overwrite-output-dir replaces
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    argv = train_args(tmp_path, tiny_model_dir, small_data, *RUNS_SETTINGS, "--overwrite-output-dir")
    monkeypatch.setattr(saving, "_fsync_tree", no_space_at("out.tmp"))
    message = training_stops(argv, capsys)
    assert f"the disk is full: saving {output} needs " in message and "is free there" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before and not (tmp_path / "out.tmp").exists()
    monkeypatch.undo()
    assert train.main([*argv, "--resume"]) == 0
    assert "completed the run, but its final model is not in" in capsys.readouterr().out
    assert_same_folder_weights(output, runs / "full/out")
    again = run_in_process(train.main, [*argv, "--resume"], capsys)
    assert "already completed 2 epochs; raise --epochs" in again


def assert_same_folder_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(name, size)`: a real filesystem of `size` bytes (tmpfs), and `small_disk.grow(path, size)`.
    Skips where tests may not mount one (it needs root on Linux); the injected ENOSPC tests above run anywhere."""
    mounted = []

    def mount(name: str, size: int) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if made.returncode:
            pytest.skip("cannot mount a small filesystem here (needs root)")
        mounted.append(folder)
        return folder

    def grow(folder: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

    mount.grow = grow
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command")
def test_a_real_full_disk_at_a_checkpoint_and_at_the_export_loses_nothing(
    runs, tmp_path, capsys, tiny_model_dir, small_data, small_disk
):
    """On real small filesystems, where each library fails its own way (torch.save, safetensors, plain writes)."""
    checkpoint, model = (folder_bytes(runs / "full" / p) for p in ("Checkpoints/Epoch_1", "out"))
    check_dir = small_disk("checkpoints", checkpoint * 3 // 2)  # room for Epoch_1 and the logs, not Epoch_2
    output_disk = small_disk("output", folder_bytes(runs / "lora/out") + model // 2)
    output = output_disk / "model"
    shutil.copytree(runs / "lora/out", output)  # the model from before, to be replaced
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    argv = ["--model", str(tiny_model_dir), "--data", str(small_data), "--check-dir", str(check_dir)]
    argv += ["--output-dir", str(output), *RUNS_SETTINGS, "--overwrite-output-dir"]

    message = training_stops(argv, capsys)
    assert f"the disk is full: saving {check_dir}/" in message and "needs about" in message  # best/ or Epoch_2
    assert not list(check_dir.glob("*.tmp")) and (check_dir / "Epoch_1").is_dir()
    assert not (check_dir / "Epoch_2").exists() and integrity.folder_problem(check_dir / "Epoch_1") is None
    small_disk.grow(check_dir, checkpoint * 4)

    message = training_stops([*argv, "--resume"], capsys)
    assert f"the disk is full: saving {output} needs about" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    small_disk.grow(output_disk, model * 4)

    assert train.main([*argv, "--resume"]) == 0
    assert_same_folder_weights(output, runs / "full/out")
