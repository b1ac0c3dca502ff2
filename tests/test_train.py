"""train.py end to end on a tiny GPT-2: learning, checkpoints, final model, exact epoch resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script, train_args
from safetensors.torch import load_file

COMMON = (
    "--epochs 2 --batch-size 8 --max-input-length 64 --lr 3e-3 --warmup-steps 2 --sample-every 10 "
    "--max-output-length 20 --precision fp32 --seed 7"
).split()


def train(tmp: Path, model: Path, data: Path, *extra: str):
    return run_script("train.py", *train_args(tmp, model, data, *COMMON, *extra), cwd=tmp)


# the tests that read `trained` run on one worker, which trains the shared run (half a minute) once for all of them
shares_the_run = pytest.mark.xdist_group("trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpt2_tiny_model_dir, small_data) -> Path:
    """One uninterrupted 2-epoch run with GPT-2's tokenizer, as fine-tuning GPT-2 does, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    result = train(tmp, gpt2_tiny_model_dir, small_data)
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "stdout.txt").write_text(result.stdout)
    return tmp


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@shares_the_run
def test_loss_falls(trained):
    metrics = read_jsonl(trained / "Checkpoints/logs/metrics.jsonl")
    train_losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    val = [m for m in metrics if "val_loss" in m]
    assert len(val) == 2 and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_best_loss"] == min(v["val_loss"] for v in val)
    assert train_losses[-1] < train_losses[0] - 0.5  # each: the mean since the previous log point
    assert all(
        m["val_perplexity"] == pytest.approx(2.718281828 ** m["val_loss"]) and m["val_bits_per_char"] > 0 for m in val
    )
    steps = [m["step"] for m in metrics if "train_loss" in m]
    assert steps == [10, 20, 21, 30, 40, 42]  # every --log-every 10 steps, and at each epoch's last step


@shares_the_run
def test_checkpoint_layout_and_safe_loading(trained):
    from austen_gpt.training.checkpoints import TRAINER_STATE, TRAINING_STATE

    for epoch in (1, 2):
        folder = trained / f"Checkpoints/Epoch_{epoch}"
        for name in (
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            TRAINING_STATE,
            TRAINER_STATE,
        ):
            assert (folder / name).is_file(), name
        state = torch.load(folder / TRAINING_STATE, weights_only=True)  # no pickled objects inside
        assert {"optimizer", "scheduler", "rng"} <= set(state)
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
        assert trainer_state["epoch"] == epoch and trainer_state["args"]["seed"] == 7
    assert not list((trained / "Checkpoints").glob("*.tmp"))
    assert list((trained / "Checkpoints/logs/austen-gpt").glob("events.out.tfevents.*"))  # TensorBoard


@shares_the_run
def test_samples_are_printed_and_logged(trained):
    samples = read_jsonl(trained / "Checkpoints/logs/samples.jsonl")
    assert samples and {s["prompt"] for s in samples} == {"", '"I cannot think," said she,', "The ball at"}
    assert all(s["text"].startswith(s["prompt"]) for s in samples)
    assert "[step 10]" in (trained / "stdout.txt").read_text() or samples[0]["step"] == 10


@shares_the_run
def test_final_model_loads_with_plain_transformers_and_pipeline(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out = trained / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    final = load_file(out / "model.safetensors")
    assert torch.equal(model.transformer.wte.weight, final["transformer.wte.weight"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # embeddings stay tied
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)("Emma", max_new_tokens=5)
    assert generated[0]["generated_text"].startswith("Emma")


@pytest.mark.slow
@shares_the_run
def test_epoch_resume_equals_uninterrupted(trained, gpt2_tiny_model_dir, small_data, tmp_path):
    # The interrupted run: all it left behind is its epoch-1 checkpoint and the best model so far.
    for kept in ("Epoch_1", "best"):
        shutil.copytree(trained / "Checkpoints" / kept, tmp_path / "Checkpoints" / kept)
    result = train(tmp_path, gpt2_tiny_model_dir, small_data, "--restore-file", "Epoch_1", "--load-checkpoint", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed, uninterrupted = load_file(tmp_path / "out/model.safetensors"), load_file(trained / "out/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # The logs continue where the checkpoint (step 21) left off, at the uninterrupted run's log points.
    steps = [m["step"] for m in read_jsonl(tmp_path / "Checkpoints/logs/metrics.jsonl") if "train_loss" in m]
    assert steps == [30, 40, 42]


@pytest.mark.slow
def test_from_scratch_trains_a_config_only_folder_and_padded_mode_trains_too(tiny_config_dir, small_data, tmp_path):
    argv = ["--from-scratch", "--packing", "False", "--epochs", "1", "--sample-every", "0"]
    result = train(tmp_path, tiny_config_dir, small_data, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation of <= 64 tokens (one paragraph each)" in result.stdout
    assert (tmp_path / "out/model.safetensors").is_file()


@pytest.mark.slow
@shares_the_run
def test_gradient_checkpointing_changes_memory_not_results(trained, gpt2_tiny_model_dir, small_data, tmp_path):
    result = train(tmp_path, gpt2_tiny_model_dir, small_data, "--gradient-checkpointing")
    assert result.returncode == 0, result.stderr[-3000:]
    with_checkpointing, without = (
        load_file(tmp_path / "out/model.safetensors"),
        load_file(trained / "out/model.safetensors"),
    )
    assert all(torch.equal(with_checkpointing[k], without[k]) for k in without)


@shares_the_run
def test_the_run_file_repeats_the_run_with_its_requested_settings(trained, gpt2_tiny_model_dir, small_data):
    """<check-dir>/logs/run.yaml read back with --config gives the settings the run's own command line gave
    (as requested: `precision: auto` would stay auto); what this machine made of them is kept under
    `resolved:`, which --config never reads."""
    import yaml

    from austen_gpt.training.flags import parse_args

    run_file = trained / "Checkpoints/logs/run.yaml"
    written = yaml.safe_load(run_file.read_text())
    asked = vars(parse_args(train_args(trained, gpt2_tiny_model_dir, small_data, *COMMON)))
    assert written["precision"] == asked["precision"] and written["resolved"]["precision"] == "no"  # fp32
    assert written["resolved"]["processes"] == 1 and "resume" not in written
    repeated = vars(parse_args(["--config", str(run_file)]))
    assert {k: v for k, v in repeated.items() if k != "config"} == {k: v for k, v in asked.items() if k != "config"}


@shares_the_run
def test_the_final_model_records_its_runs_settings(trained):
    """The export's training_metrics.json carries the run's settings (as run.yaml has them), which the style
    report reads the split from."""
    from austen_gpt.models.saving import run_settings

    settings = run_settings(trained / "out")
    assert settings["seed"] == 7 and settings["max_input_length"] == 64 and settings["train_size"] == 0.9
    assert "resume" not in settings and run_settings(trained / "Checkpoints/Epoch_1")["seed"] == 7
