"""The shipped base, configs/base-tiny: the recorded file, its README's numbers, and what a model that knows
English must do here: fine-tuning and LoRA on Austen lower its Austen loss, the merged export equals the
adapter model, and Austen's excerpts in the prompt lower its loss on her held-out text."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from safetensors import safe_open

import export
from austen_gpt.data.paragraphs import load_paragraphs, load_split
from austen_gpt.sampling import few_shot
from austen_gpt.sampling.loading import load_for_sampling
from austen_gpt.settings import DataSettings
from austen_gpt.style.report import held_out_perplexity, load_scored_model

BASE = REPO / "configs/base-tiny"
README = (BASE / "README.md").read_text()
HELD_OUT_EXCERPTS = REPO / "tests/fixtures/held-out-works"


def readme_bits_per_char(row: str) -> float:
    """The bits per character the README's table gives for the held-out text whose row starts with `row`."""
    line = next(line for line in README.splitlines() if line.startswith(f"| {row}"))
    return float(line.rstrip(" |").rsplit("|", 1)[1].strip(" *"))


def austen_bits_per_char(model_path: Path, data: Path) -> float:
    """Bits per character on `data`'s validation split (train.py's, --train-size 0.9), train.py's way."""
    model, tokenizer = load_scored_model(str(model_path))
    held_out = load_split(DataSettings(data=str(data), train_size=0.9))[1]
    return held_out_perplexity(model, tokenizer, held_out, 128, 32)["val_bits_per_char"]


def test_the_shipped_base_is_the_file_its_readme_records():
    weights = BASE / "model.safetensors"
    assert weights.stat().st_size <= 12 * 2**20  # the one committed model: at most 12 MB
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", README).group(1)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded  # rebuilt only by its recipe
    with safe_open(weights, "pt") as tensors:
        assert {tensors.get_slice(name).get_dtype() for name in tensors.keys()} == {"BF16"}
        rows = tensors.get_slice("transformer.wte.weight").get_shape()[0]
    config = json.loads((BASE / "config.json").read_text())
    vocabulary = json.loads((BASE / "tokenizer.json").read_text())["model"]["vocab"]
    assert rows == config["vocab_size"] == len(vocabulary) == 4096


def test_its_held_out_bits_per_char_match_its_readme():
    model, tokenizer = load_scored_model(str(BASE))
    paragraphs = load_paragraphs(HELD_OUT_EXCERPTS)
    measured = held_out_perplexity(model, tokenizer, paragraphs, 128, 32)["val_bits_per_char"]
    assert measured == pytest.approx(readme_bits_per_char("tests/fixtures/held-out-works"), abs=0.02)
    # a model that knows this English, not one that guesses: random weights are above 3.5 bits per character
    assert measured < 2.5


def austen_loss_before_and_after(small_data: Path, tmp_path: Path, *arguments: str) -> tuple[float, float]:
    """train.py with `arguments` for 8 steps of 64-token blocks on the small Austen data, run from the repository
    as users run it; the bits per character of the base and of the trained model on the data's held-out split."""
    result = run_script(
        "train.py",
        *arguments,
        *("--data", str(small_data), "--train-size", "0.9", "--max-steps", "8", "--max-input-length", "64"),
        *("--warmup-steps", "2", "--check-dir", str(tmp_path / "Checkpoints"), "--output-dir", str(tmp_path / "out")),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = (austen_bits_per_char(path, small_data) for path in (BASE, tmp_path / "out"))
    return before, after


@pytest.mark.slow
def test_the_quickstarts_fine_tune_of_the_base_lowers_its_austen_loss(small_data, tmp_path):
    """configs/quickstart.yaml as it is (its model a path relative to the repository), for 8 steps."""
    before, after = austen_loss_before_and_after(small_data, tmp_path, "--config", "configs/quickstart.yaml")
    assert after < before - 0.03, (before, after)
    with safe_open(tmp_path / "out/model.safetensors", "pt") as trained:  # the bf16 base trained as fp32 weights
        assert {trained.get_slice(name).get_dtype() for name in trained.keys()} == {"F32"}


@pytest.mark.slow
def test_lora_on_the_base_lowers_the_loss_and_its_merged_export_equals_it(small_data, tmp_path):
    before, after = austen_loss_before_and_after(
        small_data, tmp_path, "--model", str(BASE), "--lora", "--lr", "1e-2", "--batch-size", "16"
    )
    assert after < before - 0.03, (before, after)

    assert export.main(["--adapter", str(tmp_path / "out"), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([[0, *range(100, 160)]])
    with torch.no_grad():
        adapters, merged = (load_for_sampling(str(tmp_path / p))(input_ids=ids).logits for p in ("out", "merged"))
    assert torch.allclose(merged, adapters, atol=1e-4)


def continuation_loss(model, tokenizer, prompt: str, continuation: list[int]) -> float:
    """Mean loss of `continuation`'s tokens after end-of-text and `prompt`, as a base model is prompted."""
    prompt_ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(continuation)).item()


def test_austens_excerpts_in_the_prompt_lower_the_bases_loss_on_her_held_out_text():
    model, tokenizer = load_scored_model(str(BASE))
    train, held_out = load_split(DataSettings())  # excerpts from the training split, scored on held-out text
    continuations = [ids[:100] for ids in tokenizer(held_out[:40], add_special_tokens=False)["input_ids"]]
    mean_loss = {}
    for k in (0, 3):
        losses = []
        for n, continuation in enumerate(continuations):
            prompt = few_shot.build_prompt(tokenizer, train, "", k, seed=n, context=511, new_tokens=100).text
            losses.append(continuation_loss(model, tokenizer, prompt, continuation))
        mean_loss[k] = sum(losses) / len(losses)
    assert mean_loss[3] < mean_loss[0] - 0.05, mean_loss
