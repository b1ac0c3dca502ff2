"""train.py --self-play-rounds: SPIN rounds on a model, their loss and margin, best/ by distinguishability, the
resume of a run killed inside a round (bitwise), adapters, and the refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_script, script_env, train_args
from safetensors.torch import load_file

pytestmark = pytest.mark.xdist_group("self-play")  # one worker: the uninterrupted run is made once

# 2 rounds of 32 pairs of 48 new tokens (the tiny model has 128 positions), 8 batches of 4 a round, 2 accumulated
# a step: 4 steps a round; Step_3 falls inside round 1,
# Step_6 inside round 2. --train-size 0.5 leaves the style probe the validation text of 10 samples.
COMMON = (
    "--self-play-rounds 2 --self-play-pairs 32 --batch-size 4 --grad-accum-steps 2 --lr 1e-3 --warmup-steps 1 "
    "--train-size 0.5 --eval-style-samples 10 --sample-every 0 --report-to none --log-every 1 --precision fp32 "
    "--save-steps 3 --seed 3 --self-play-new-tokens 48"
).split()
LORA = ["--lora", "--rank-lora", "4", "--targets-lora", "c_attn"]

# SIGKILLs train.py at the N-th self-play forward pass (KILL_AT_PAIRS).
KILLER = """
import os, signal, sys
sys.argv[0] = "train.py"
import train
from austen_gpt import cli
from austen_gpt.training import self_play
at, calls, pair_loss_sums = int(os.environ["KILL_AT_PAIRS"]), [0], self_play.pair_loss_sums
def counting(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return pair_loss_sums(*args, **kwargs)
self_play.pair_loss_sums = counting
cli.run_cli(train.main)
"""


def self_play_run(tmp: Path, model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_script("train.py", *train_args(tmp, model, data, *COMMON, *extra), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, small_data) -> Path:
    tmp = tmp_path_factory.mktemp("self-play")
    result = self_play_run(tmp, tiny_model_dir, small_data)
    assert "4 steps per self-play round of 32 pairs" in result.stdout
    return tmp


@pytest.mark.slow
def test_a_round_lowers_the_spin_loss_and_widens_the_margin(uninterrupted):
    logged = [r for r in records(uninterrupted) if "self_play_margin" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    first, last = logged[0], logged[3]  # round 1's first and last step
    assert first["self_play_margin"] == pytest.approx(0, abs=1e-4)  # the policy starts as its reference
    assert first["self_play_spin_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert last["self_play_spin_loss"] < first["self_play_spin_loss"] - 0.05
    assert last["self_play_margin"] > first["self_play_margin"] + 1
    # round 2 starts against its own reference: the round-1 model
    assert logged[4]["self_play_margin"] == pytest.approx(0, abs=1e-4)


@pytest.mark.slow
def test_each_round_is_validated_checkpointed_and_best_is_named_by_its_round(uninterrupted):
    validations = [r for r in records(uninterrupted) if "self_play_round" in r]
    assert [r["self_play_round"] for r in validations] == [0, 1, 2]  # the model as given, then each round
    assert all({"style_distinguishability", "val_perplexity", "style_copied_8grams"} <= r.keys() for r in validations)
    best = json.loads((uninterrupted / "Checkpoints/best/best.json").read_text())
    told_apart = {r["self_play_round"]: r["style_distinguishability"] for r in validations}
    assert best["style_distinguishability"] == min(told_apart.values())
    assert told_apart[best["self_play_round"]] == best["style_distinguishability"]
    checkpoints = uninterrupted / "Checkpoints"
    assert (checkpoints / "Round_1").is_dir() and (checkpoints / "Round_2").is_dir()
    assert (checkpoints / "logs/curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_self_play_takes_the_split_of_the_models_own_run(uninterrupted, capsys):
    from austen_gpt.settings import ModelSettings
    from austen_gpt.training.self_play import self_play_split
    from austen_gpt.training.settings import SelfPlaySettings, TrainSettings

    asked = TrainSettings(model=ModelSettings(str(uninterrupted / "out")), self_play=SelfPlaySettings(1))
    taken = self_play_split(asked, set(), print)
    assert taken.data.train_size == 0.5 and taken.data.seed == 3 and taken.data.data.endswith("small.jsonl")
    assert "the run of" in capsys.readouterr().out


# Forward passes 1-8 are round 1's batches, 9-16 round 2's; Step_3 is saved after batch 6, Step_6 after batch 12.
KILLS = {  # (forward pass killed in, the checkpoint resumed from)
    "inside round 1, after Step_3": ("7", "Step_3"),  # round 1's pairs come back from the checkpoint
    "inside round 2, before any of its checkpoints": ("10", "Round_1"),  # round 2's pairs are drawn again
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", KILLS)
def test_a_run_killed_inside_a_round_resumes_to_the_uninterrupted_weights(
    moment, uninterrupted, tiny_model_dir, small_data, tmp_path
):
    argv = train_args(tmp_path, tiny_model_dir, small_data, *COMMON)
    kill_at, checkpoint = KILLS[moment]
    env = script_env({"KILL_AT_PAIRS": kill_at})
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv], cwd=tmp_path, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_script("train.py", *argv, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'Checkpoints' / checkpoint}:" in resumed.stdout
    for folder in ("out", "Checkpoints/best"):
        a = load_file(tmp_path / folder / "model.safetensors")
        b = load_file(uninterrupted / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


@pytest.mark.slow
def test_self_play_trains_adapters_on_a_model(tiny_model_dir, small_data, tmp_path):
    self_play_run(tmp_path, tiny_model_dir, small_data, *LORA, "--self-play-rounds", "1", "--load-best-at-end", "false")
    adapters = load_file(tmp_path / "out/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at zero
    logged = [r for r in records(tmp_path) if "self_play_margin" in r]
    assert logged[-1]["self_play_margin"] > logged[0]["self_play_margin"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--from-scratch"], "drop --from-scratch"),
        (["--self-play-beta", "0"], "--self-play-beta must be positive"),
        (["--eval-style-samples", "4"], "--eval-style-samples 10 or more"),
    ],
)
def test_impossible_self_play_settings_are_refused(extra, fragment, tiny_model_dir, small_data, tmp_path):
    result = run_script("train.py", *train_args(tmp_path, tiny_model_dir, small_data, *COMMON, *extra), cwd=tmp_path)
    assert_user_error(result, fragment)
    assert not (tmp_path / "Checkpoints").exists()


def test_self_play_on_a_model_with_no_training_run_needs_data(tiny_model_dir, tmp_path):
    out = ["--check-dir", str(tmp_path / "Checkpoints"), "--output-dir", str(tmp_path / "out")]
    result = run_script("train.py", "--model", str(tiny_model_dir), "--self-play-rounds", "1", *out, cwd=tmp_path)
    assert_user_error(result, "records no training run", "give --data")
    assert not (tmp_path / "Checkpoints").exists()


MEASURES = {"distinguishability", "distinguishability_spread", "delta_to_author", "copied_ngram_share"}
MEASURES |= {"val_perplexity", "distinct_1", "overused_phrase_share", "sampling_seconds"}


@pytest.mark.slow
def test_the_reports_self_play_and_rerank_rows_carry_every_measure(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted / "out", tmp_path / "model")  # the judge is written beside the model
    rounds = [str(uninterrupted / f"Checkpoints/Round_{n}") for n in (1, 2)]
    flags = ["--models", str(tmp_path / "model"), *rounds, "--names", "fine-tuned", "round 1", "round 2"]
    flags += ["--rerank", "2", "--n-samples", "10", "--max-new-tokens", "24", "--draws", "2", "--out", "report"]
    result = run_script("style_report.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report/report.json").read_text())
    rows = {row["name"]: row for row in report["models"]}
    assert list(rows) == [
        f"{name}{rerank}" for name in ("fine-tuned", "round 1", "round 2") for rerank in ("", ", rerank 2")
    ]
    assert all(MEASURES <= row.keys() for row in rows.values())
    assert rows["fine-tuned, rerank 2"]["rerank"] == 2 and "rerank 2" in (tmp_path / "report/report.md").read_text()
    author = next(row for row in report["references"] if row["name"] == "author, held out")
    assert MEASURES - {"val_perplexity", "sampling_seconds"} <= author.keys()  # the floor, beside them


def test_the_gpu_script_asks_each_step_for_what_it_has():
    """scripts/gpu_self_play.sh runs on a lent GPU only: a typo in its flags must fail here."""
    from conftest import script_commands

    import style_report
    from austen_gpt.training.flags import parse_args

    steps = script_commands("scripts/gpu_self_play.sh")
    assert [name for name, _ in steps] == ["train.py", "style_report.py"]
    train = parse_args(steps[0][1])
    assert train.model == "models/austen-small" and train.self_play_rounds == 3 and not train.from_scratch
    report = style_report.parse_args(steps[1][1])
    assert report.models[0] == "models/austen-small" and report.rerank == [4, 16]
    assert report.models[1:] == [f"{train.check_dir}/Round_{n}" for n in (1, 2, 3)]
