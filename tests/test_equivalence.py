"""Equivalences: the same training done two ways gives the same numbers.

- k micro-batches of b examples accumulated = one batch of k x b (packed and padded batches);
- 2 processes x b with accumulation = 1 process x 2b with the same accumulation;
- a resume with changed --lr, --epochs, --eps or --weight-decay runs the schedule and the optimizer its flags
  define, from the first resumed step (the resume with unchanged flags is bitwise: tests/test_resume.py);
- noise in the position rows a from-scratch model never trained changes no sample.

All in fp32 with dropout 0, where the two ways must agree to rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file, save_file

import inference
from austen_gpt.data.batches import batch_loader, collate
from austen_gpt.data.tokens import TokenBlocks
from austen_gpt.training.flags import train_settings
from austen_gpt.training.loop import record_trained_positions, set_up
from austen_gpt.training.step import linear_schedule
from train import main

EXACT = ["--precision", "fp32", "--dropout", "0", "--max-input-length", "64", "--sample-every", "0"]
EXACT += ["--data-cache", "", "--lr", "1e-3", "--warmup-steps", "3", "--log-every", "1"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "out/model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged(run: Path, key: str) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if key in line}


def train_run(run: Path, model: Path, data: Path, *settings: str) -> Path:
    assert main(train_args(run, model, data, *EXACT, *settings)) == 0
    return run


# ---- accumulation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["True", "False"])
def test_accumulated_micro_batches_equal_one_batch_holding_them_all(packing, tmp_path, tiny_model_dir, small_data):
    """Padded batches hold from a few to hundreds of targets: each target must weigh the same in the step."""
    settings = ["--epochs", "1", "--packing", packing]
    one = train_run(tmp_path / "one", tiny_model_dir, small_data, *settings, "--batch-size", "8")
    four = train_run(
        tmp_path / "four", tiny_model_dir, small_data, *settings, "--batch-size", "2", "--grad-accum-steps", "4"
    )
    assert max_difference(weights(one), weights(four)) < 1e-4
    # the logged loss is per target too, not a mean of the micro-batches' means
    assert logged(one, "train_loss") == pytest.approx(logged(four, "train_loss"), rel=1e-5)


def test_the_window_weighs_micro_batches_by_their_targets():
    """The scale each micro-batch's summed loss gets: 1 / (targets in the whole window), whatever its own."""
    examples = TokenBlocks.from_lists([[1] * 5, [1] * 60, [1] * 3, [1] * 9, [1] * 2])
    sampler = batch_loader(examples, 2, 0, None, None).batch_sampler
    # batches: (4 + 59), (2 + 8), (1); windows of 2 batches: 73, 73, then the short last window: 1
    assert sampler.window_targets(2) == [73, 73, 1]
    assert sampler.window_targets(1) == [63, 10, 1]


def test_a_begin_of_text_token_of_its_own_is_never_a_target():
    bos, eos, pad = 1, 2, 2
    packed = [bos, 7, 8, eos, bos, 9, eos]
    labels = collate([packed], pad, unpredicted=bos)["labels"][0].tolist()
    assert labels == [-100, 7, 8, eos, -100, 9, eos]  # the first is never a target anyway (nothing before it)
    blocks = TokenBlocks.from_lists([[bos, 7], packed, [bos]])
    assert blocks.targets(bos) == [1, 5, 0]  # 8, eos, 9, eos and 7: the targets the loss sums
    assert blocks.targets() == [1, 6, 0]  # GPT-2's framing: its one end-of-text token is always a target


# ---- resuming with changed flags ---------------------------------------------------------------------------


def fresh_schedule_rates(lr: float, warmup: int, total: int) -> list[float]:
    """The rate of each step 1..total under a fresh schedule (step s runs at factor(s - 1))."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, rates = linear_schedule(optimizer, lr, warmup, total), []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_a_resume_with_a_lower_lr_and_more_epochs_follows_the_new_schedule(
    tmp_path, tiny_model_dir, small_data, capsys
):
    run = train_run(tmp_path, tiny_model_dir, small_data, "--epochs", "1")
    steps = max(logged(run, "train_lr"))  # one epoch
    assert list(logged(run, "train_lr").values()) == fresh_schedule_rates(1e-3, 3, steps)  # the step's own rate
    capsys.readouterr()
    resumed = ["--epochs", "2", "--lr", "4e-4", "--resume", "--overwrite-output-dir"]
    assert main(train_args(tmp_path, tiny_model_dir, small_data, *EXACT, *resumed)) == 0
    new_rates = fresh_schedule_rates(4e-4, 3, 2 * steps)
    rates = logged(run, "train_lr")
    assert [rates[s] for s in range(steps + 1, 2 * steps + 1)] == new_rates[steps:]  # from the first resumed step
    out = capsys.readouterr().out
    assert "resuming with changed settings: --epochs 1 -> 2; --lr 0.001 -> 0.0004" in out
    assert f"learning rate 0 -> {new_rates[steps]:.4g} (this run's schedule)" in out  # the old one had ended at 0


def test_a_resume_applies_the_new_eps_and_weight_decay(tmp_path, tiny_model_dir, small_data):
    train_run(tmp_path, tiny_model_dir, small_data, "--epochs", "1")
    settings = train_settings(
        train_args(tmp_path, tiny_model_dir, small_data, *EXACT, "--epochs", "2", "--resume")
        + ["--eps", "1e-6", "--weight-decay", "0.1"]
    )
    run, state = set_up(settings)
    decayed, plain = run.optimizer.param_groups
    assert (decayed["eps"], plain["eps"], decayed["weight_decay"], plain["weight_decay"]) == (1e-6, 1e-6, 0.1, 0.0)
    assert run.optimizer.state_dict()["state"]  # the moments were restored, not started again
    assert state.global_step > 0


# ---- untrained positions -----------------------------------------------------------------------------------


def test_noise_in_untrained_position_rows_changes_no_sample(tmp_path, tiny_config_dir, small_data, capsys):
    """A from-scratch run on 32-token blocks trains position rows 0-30 of 128; samples keep their window
    within them, so whatever the other rows hold, every sample is the same, past the window too."""
    settings = [
        "--from-scratch",
        "--epochs",
        "1",
        "--max-input-length",
        "32",
        "--batch-size",
        "16",
        "--eval-steps",
        "6",
    ]
    run = train_run(tmp_path, tiny_config_dir, small_data, *settings)
    for folder in ("out", "Checkpoints/Epoch_1", "Checkpoints/best"):  # the record travels with every copy
        assert json.loads((run / folder / "config.json").read_text())["trained_positions"] == 31

    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for file in (run / "out").iterdir():
        (noisy / file.name).write_bytes(file.read_bytes())
    tensors = load_file(noisy / "model.safetensors")
    tensors["transformer.wpe.weight"][31:] = torch.randn_like(tensors["transformer.wpe.weight"][31:]) * 10
    save_file(tensors, noisy / "model.safetensors", metadata={"format": "pt"})

    samples, _ = [], capsys.readouterr()
    for model in (run / "out", noisy):
        argv = ["--model-path", str(model), "--prompt", "Elizabeth", "--seed", "3", "--max-new-tokens", "80"]
        assert inference.main(argv + ["--paragraphs", "50", "--n-return-seqs", "2"]) == 0
        captured = capsys.readouterr()
        assert "sampling window: 31 of the model's 128 positions" in captured.err
        samples.append(captured.out)
    assert samples[0] == samples[1] and len(samples[0].split()) > 60  # well past the 31-token window


def test_a_later_run_only_raises_the_recorded_positions(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    record_trained_positions(model, TokenBlocks.from_lists([[1] * 20]), from_scratch=False, adapters=False)
    assert not hasattr(model.config, "trained_positions")  # pretrained positions: the whole context
    record_trained_positions(model, TokenBlocks.from_lists([[1] * 32, [1] * 5]), from_scratch=True, adapters=False)
    assert model.config.trained_positions == 31
    record_trained_positions(model, TokenBlocks.from_lists([[1] * 16]), from_scratch=False, adapters=False)
    assert model.config.trained_positions == 31  # shorter blocks later do not untrain the rows
    record_trained_positions(model, TokenBlocks.from_lists([[1] * 100]), from_scratch=False, adapters=True)
    assert model.config.trained_positions == 31  # adapters leave the position rows as they were
    record_trained_positions(model, TokenBlocks.from_lists([[1] * 65]), from_scratch=False, adapters=False)
    assert model.config.trained_positions == 64
