"""Crash-safe, exact resume: SIGKILL anywhere, interrupted saves, Ctrl-C/SIGTERM, NaN, bad resumes.

Every trial ends by comparing the final weights (or adapters) of the interrupted-and-resumed run with
those of one uninterrupted run: on CPU they must be bitwise equal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_user_error,
    logged_step,
    on_native_bf16,
    run_in_process,
    run_script,
    script_env,
    train_args,
)
from safetensors.torch import load_file

import train
from austen_gpt.training.checkpoints import TRAINER_STATE, check_optimizer_state_fits, sorted_checkpoints

# 2 epochs of 12 optimizer steps, each accumulating 2 batches of 8 blocks; a checkpoint every 3 steps.
COMMON = (
    "--epochs 2 --batch-size 8 --grad-accum-steps 2 --max-input-length 64 --lr 3e-3 --warmup-steps 2 "
    "--sample-every 5 --max-output-length 16 --precision fp32 --seed 5 --save-steps 3"
).split()
MODES = {
    "full": [],
    "lora": ["--lora", "--rank-lora", "8", "--targets-lora", "c_attn", "c_fc"],
    # validation every 4 steps, the best model kept, and an early stop before the last step
    "early stopping": "--eval-steps 4 --early-stopping-patience 1 --early-stopping-threshold 0.2".split(),
    # bf16 autocast, and dropout masks drawn from random bits (lean_layers.py): their random state must resume
    "bf16": ["--precision", "bf16"],
}
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "early stopping": "model.safetensors"}
WEIGHTS["bf16"] = WEIGHTS["full"]

# Runs train.py in a child that SIGKILLs itself at a chosen moment: at the N-th forward pass
# (KILL_AT_FORWARD, counting validation forwards too), or in the N-th checkpoint save, after the
# files are written and before the folder is renamed into place (KILL_IN_SAVE).
KILLER = """
import os, signal, sys
sys.argv[0] = "train.py"
import train
from austen_gpt import cli
from austen_gpt.models import evaluation, saving
from austen_gpt.training import step
forward_at, save_at, calls = int(os.environ.get("KILL_AT_FORWARD", 0)), int(os.environ.get("KILL_IN_SAVE", 0)), [0, 0]
loss_sum, fsync_tree = step.lm_loss_sum, saving._fsync_tree
def counting_loss(model, batch):
    calls[0] += 1
    if calls[0] == forward_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss_sum(model, batch)
def crashing_fsync(folder):
    calls[1] += folder.name.endswith(".tmp")
    if folder.name.endswith(".tmp") and calls[1] == save_at:
        os.kill(os.getpid(), signal.SIGKILL)
    fsync_tree(folder)
# the training step's loss and validation's; checkpoints and exports are written by saving
step.lm_loss_sum = evaluation.lm_loss_sum = counting_loss
saving._fsync_tree = crashing_fsync
cli.run_cli(train.main)
"""


def arguments(tmp: Path, base: Path, data: Path, mode: str, *extra: str) -> list[str]:
    return train_args(tmp, base, data, *COMMON, *MODES[mode], *extra)


def env(**extra: str) -> dict[str, str]:
    return script_env(extra)


def run_killer(tmp: Path, argv: list[str], **kill: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", KILLER, *argv], cwd=tmp, env=env(**kill), capture_output=True, text=True
    )
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    return result


def start_training(tmp: Path, argv: list[str], **streams) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=tmp, env=env(), text=True, **streams)


def wait_for_step(tmp: Path, child: subprocess.Popen, step: int) -> None:
    """Poll the run's metrics until it has logged optimizer step `step` or a later one (or ended)."""
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if logged_step(tmp) >= step:
            return
        time.sleep(0.005)


def final_weights(tmp: Path, mode: str) -> dict[str, torch.Tensor]:
    return load_file(tmp / "out" / WEIGHTS[mode])


def best_weights(tmp: Path, mode: str) -> dict[str, torch.Tensor]:
    return load_file(tmp / "Checkpoints/best" / WEIGHTS[mode])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metric_steps(tmp: Path) -> list[int]:
    lines = (tmp / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "train_loss" in line]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, small_data):
    """Each mode's uninterrupted run, made on first use: (final weights, logged steps, best/ weights)."""
    runs = {}

    def run(mode: str):
        if mode not in runs:
            tmp = tmp_path_factory.mktemp(f"uninterrupted-{mode}")
            result = run_script("train.py", *arguments(tmp, tiny_model_dir, small_data, mode), cwd=tmp)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "12 steps per epoch" in result.stdout  # the kill moments below assume it
            assert ("early stopping at step 20" in result.stdout) == (mode == "early stopping")  # after the kills
            assert ("dropout layers' masks from random bits" in result.stdout) == (mode == "bf16")
            runs[mode] = final_weights(tmp, mode), metric_steps(tmp), best_weights(tmp, mode)
        return runs[mode]

    return run


KILLS = {
    "inside gradient accumulation": {"KILL_AT_FORWARD": "8"},  # step 4's 1st batch already backpropagated
    "right after a save": {"KILL_AT_FORWARD": "13"},  # Step_6 was just written
    "in epoch 2": {"KILL_AT_FORWARD": "30"},  # after epoch 1 (23 batches), its validation and checkpoint
    "in a save, before the rename": {"KILL_IN_SAVE": "3"},  # Step_9.tmp is complete but not renamed
}


TRIALS = [("full", "inside gradient accumulation"), ("full", "in a save, before the rename")]
TRIALS += [("lora", "inside gradient accumulation"), ("lora", "in a save, before the rename")]
TRIALS += [("early stopping", "right after a save"), ("early stopping", "in epoch 2")]  # validation forwards count too
TRIALS += [pytest.param("bf16", "inside gradient accumulation", marks=on_native_bf16)]


@pytest.mark.slow
@pytest.mark.parametrize("mode, moment", TRIALS)
def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, mode, moment, tiny_model_dir, small_data, tmp_path):
    expected, expected_steps, expected_best = uninterrupted(mode)
    argv = arguments(tmp_path, tiny_model_dir, small_data, mode)
    run_killer(tmp_path, argv, **KILLS[moment])
    resumed = run_script("train.py", *argv, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    if moment == "in a save, before the rename":
        assert "ignoring incomplete checkpoints (an interrupted save): Step_9.tmp" in resumed.stdout
        assert "resumed from " + str(tmp_path / "Checkpoints/Step_6") in resumed.stdout
    assert_same_weights(final_weights(tmp_path, mode), expected)
    assert_same_weights(best_weights(tmp_path, mode), expected_best)
    assert metric_steps(tmp_path) == expected_steps  # every step logged once, none missing (and the same last one)


# train.py under code whose table of device choices says otherwise for this CPU in fp32
ANOTHER_TABLE = """
import sys
sys.argv[0] = "train.py"
import torch
import train
from austen_gpt import cli
from austen_gpt.training import hot_path
hot_path.DEVICE_TABLE[("cpu", torch.float32)] = hot_path.DeviceChoices(8, drawn_masks=True)
cli.run_cli(train.main)
"""


@pytest.mark.slow
def test_a_resumed_run_keeps_the_device_choices_it_started_with(uninterrupted, tiny_model_dir, small_data, tmp_path):
    """Resumed by code whose table would draw the dropout masks from random bits, the run keeps its checkpoint's
    choices (the model's own dropout) and ends bitwise as if never interrupted."""
    expected = uninterrupted("full")[0]
    argv = arguments(tmp_path, tiny_model_dir, small_data, "full")
    run_killer(tmp_path, argv, **KILLS["inside gradient accumulation"])
    recorded = json.loads((tmp_path / "Checkpoints/Step_3" / TRAINER_STATE).read_text())["device_choices"]
    assert recorded == {
        "recompute_attention_from_tokens": 256,
        "drawn_masks": False,
        "reuse_freed_memory_below_tokens": 256,
    }
    command = [sys.executable, "-c", ANOTHER_TABLE, *argv, "--resume"]
    resumed = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with the run's own device choices" in resumed.stdout
    assert "masks from random bits" not in resumed.stdout
    assert_same_weights(final_weights(tmp_path, "full"), expected)


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "a changed byte in the weights": ("model.safetensors", flip_one_byte, "its checksum differs"),
    "a trainer_state.json that is not JSON": (TRAINER_STATE, lambda path: path.write_text("{"), "not valid JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_as_uninterrupted(
    uninterrupted, damage, tiny_model_dir, small_data, tmp_path
):
    """Killed right after Step_6 was saved; Step_6 then damaged (an interrupted copy, bit rot): --resume names
    it, renames it Step_6.damaged, and goes on from Step_3 to the very weights of an uninterrupted run."""
    expected, expected_steps, _ = uninterrupted("full")
    argv = arguments(tmp_path, tiny_model_dir, small_data, "full")
    run_killer(tmp_path, argv, **KILLS["right after a save"])
    check_dir, (name, damage_file, reason) = tmp_path / "Checkpoints", DAMAGES[damage]
    damage_file(check_dir / "Step_6" / name)
    resumed = run_script("train.py", *argv, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{check_dir / 'Step_6' / name} is damaged ({reason}" in resumed.stdout
    assert "renamed it Step_6.damaged" in resumed.stdout and f"resumed from {check_dir / 'Step_3'}" in resumed.stdout
    assert (check_dir / "Step_6.damaged" / name).is_file()  # kept for inspection
    assert_same_weights(final_weights(tmp_path, "full"), expected)
    assert metric_steps(tmp_path) == expected_steps


@pytest.mark.slow
def test_external_sigkill_at_a_random_moment(uninterrupted, tiny_model_dir, small_data, tmp_path):
    """A real outside SIGKILL, wherever the run happens to be once it has passed step 5."""
    mode, (expected, _, _) = "full", uninterrupted("full")
    argv = arguments(tmp_path, tiny_model_dir, small_data, mode)
    child = start_training(tmp_path, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path, child, 5)
    child.kill()
    assert child.wait() == -signal.SIGKILL
    resumed = run_script("train.py", *argv, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path, mode), expected)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_prints_the_resume_command(
    sig, code, uninterrupted, tiny_model_dir, small_data, tmp_path
):
    mode, (expected, _, _) = "full", uninterrupted("full")
    argv = arguments(tmp_path, tiny_model_dir, small_data, mode)
    child = start_training(tmp_path, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(tmp_path, child, 4)
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr[-2000:]
    assert "finishing this step, then saving a checkpoint" in stderr
    command = stdout.split("resume with:\n", 1)[1].strip()
    assert command.startswith("python train.py") and command.endswith("--resume")
    saved = sorted_checkpoints(tmp_path / "Checkpoints")[-1]
    stopped_at = re.search(r"stopped by SIG\w+ at step (\d+);", stdout)
    assert json.loads((saved / TRAINER_STATE).read_text())["global_step"] == int(stopped_at.group(1))
    if sig == signal.SIGTERM:
        return  # the resumed result is checked once, after Ctrl-C
    resume = shlex.split(command)
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *resume[2:]], cwd=tmp_path, env=env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path, mode), expected)


@pytest.mark.slow
def test_second_ctrl_c_quits_at_once_without_corrupting_anything(tiny_model_dir, small_data, tmp_path):
    argv = arguments(tmp_path, tiny_model_dir, small_data, "full", "--save-steps", "1", "--epochs", "1")
    child = start_training(tmp_path, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_step(tmp_path, child, 3)
    child.send_signal(signal.SIGINT)
    time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=60)
    assert child.returncode in (130, -signal.SIGINT)
    for folder in (tmp_path / "Checkpoints").glob("Step_*"):
        assert folder.name.endswith(".tmp") or (folder / TRAINER_STATE).is_file()
    resumed = run_script("train.py", *argv, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, small_data, tmp_path):
    argv = arguments(
        tmp_path, tiny_model_dir, small_data, "full", "--lr", "1e30", "--warmup-steps", "0", "--save-steps", "1"
    )
    result = run_script("train.py", *argv, cwd=tmp_path)
    assert result.returncode == 1
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and "the loss became nan at step 2" in message[0] and "Step_1" in message[0], result.stderr
    assert [p.name for p in sorted_checkpoints(tmp_path / "Checkpoints")] == ["Step_1"]
    assert not (tmp_path / "Checkpoints/Step_2").exists() and not (tmp_path / "out").exists()
    assert load_file(tmp_path / "Checkpoints/Step_1/model.safetensors")  # intact and loadable


@pytest.mark.slow
def test_keep_last_prunes_only_complete_step_checkpoints(tiny_model_dir, small_data, tmp_path):
    """Also: --resume with no complete checkpoint yet starts from the beginning (the same command for every start)."""
    debris = tmp_path / "Checkpoints/Step_999.tmp"
    debris.mkdir(parents=True)
    argv = arguments(
        tmp_path, tiny_model_dir, small_data, "full", "--save-steps", "2", "--keep-last", "2", "--epochs", "1"
    )
    result = run_script("train.py", *argv, "--sample-every", "0", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring incomplete checkpoints (an interrupted save): Step_999.tmp" in result.stdout
    assert "no complete checkpoint" in result.stdout and (tmp_path / "out/model.safetensors").is_file()
    names = {p.name for p in sorted_checkpoints(tmp_path / "Checkpoints")}
    steps = sorted(int(n.split("_")[1]) for n in names if n.startswith("Step_"))
    assert steps == [10, 12] and "Epoch_1" in names
    assert debris.is_dir()  # an incomplete folder is never counted or deleted


# ---- resuming with other settings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, tiny_model_dir, small_data) -> Path:
    tmp = tmp_path_factory.mktemp("one-checkpoint")
    argv = arguments(tmp, tiny_model_dir, small_data, "full", "--epochs", "1", "--sample-every", "0")
    run_killer(tmp, argv, KILL_AT_FORWARD="9")
    assert [p.name for p in sorted_checkpoints(tmp / "Checkpoints")] == ["Step_3"]
    return tmp


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch-size", "16"], "was trained with --batch-size 8, not 16"),
        (["--lora"], "was trained with --lora False, not True"),
        (["--max-input-length", "32"], "was trained with --max-input-length 64, not 32"),
        (["--seed", "6"], "was trained with --seed 5, not 6"),
    ],
)
def test_incompatible_resume_is_refused(
    change, message, one_checkpoint, tiny_model_dir, small_data, capsys, monkeypatch
):
    monkeypatch.chdir(one_checkpoint)
    argv = arguments(one_checkpoint, tiny_model_dir, small_data, "full", "--epochs", "1", "--resume", *change)
    assert message in run_in_process(train.main, argv, capsys)


@pytest.mark.slow
def test_safe_changes_are_allowed_and_logged(one_checkpoint, tiny_model_dir, small_data, tmp_path):
    (tmp_path / "Checkpoints").mkdir()
    os.symlink(one_checkpoint / "Checkpoints/Step_3", tmp_path / "Checkpoints/Step_3")
    argv = arguments(tmp_path, tiny_model_dir, small_data, "full", "--epochs", "1", "--sample-every", "0")
    result = run_script("train.py", *argv, "--resume", "--save-steps", "5", "--sample-prompts", "Emma", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with changed settings: " in result.stdout
    assert "--save-steps 3 -> 5" in result.stdout and "--sample-prompts" in result.stdout


@pytest.mark.slow
def test_a_fresh_run_never_touches_another_runs_checkpoints(one_checkpoint, tiny_model_dir, small_data, tmp_path):
    argv = arguments(one_checkpoint, tiny_model_dir, small_data, "full", "--epochs", "1")
    before = (one_checkpoint / "Checkpoints/Step_3/model.safetensors").read_bytes()
    assert_user_error(
        run_script("train.py", *argv, cwd=tmp_path), "holds checkpoints (Step_3) from another run", "--resume"
    )
    assert (one_checkpoint / "Checkpoints/Step_3/model.safetensors").read_bytes() == before


def test_checkpoint_state_loads_without_unpickling(one_checkpoint):
    state = torch.load(one_checkpoint / "Checkpoints/Step_3/training_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    progress = json.loads((one_checkpoint / "Checkpoints/Step_3" / TRAINER_STATE).read_text())
    assert (progress["global_step"], progress["epoch"], progress["batches_in_epoch"]) == (3, 0, 6)


def test_an_optimizer_state_that_does_not_fit_the_model_is_refused():
    """E.g. a shard of the moments (an FSDP checkpoint): refused before the first step would crash on it."""
    from austen_gpt.cli import UserError

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    check_optimizer_state_fits(optimizer)  # its own state fits
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"].flatten()[:6]
    optimizer.load_state_dict(state)
    with pytest.raises(UserError, match=r"exp_avg of shape \(6,\) for a parameter of shape \(3, 4\)"):
        check_optimizer_state_fits(optimizer)
