"""Any causal LM: GPT-2, Llama, Qwen2, GPT-NeoX (Pythia) and Mistral, each as a tiny random model with a
tokenizer whose special tokens are laid out as in the real family's, built offline with `tokenizers`.

For each: the paragraph framing follows its own special tokens; full fine-tuning learns and resumes
bitwise; sampling starts a paragraph and stops at end-of-text; LoRA picks the family's attention layers by
itself and merges back exactly; QLoRA trains on its 4-bit layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_family
from safetensors.torch import load_file

import export
import inference
import train
from austen_gpt.data.batches import collate
from austen_gpt.data.tokens import paragraph_frame, tokenize_paragraphs


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, austen_paragraphs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(root / name, family, austen_paragraphs[:400]) for name, family in FAMILIES.items()}


def train_run(tmp: Path, model: Path, data: Path, *extra: str) -> None:
    argv = ["--model", str(model), "--data", str(data), "--check-dir", str(tmp / "Checkpoints")]
    argv += ["--output-dir", str(tmp / "out"), "--max-input-length", "64", "--batch-size", "8", "--lr", "3e-3"]
    argv += ["--warmup-steps", "2", "--sample-every", "0", "--precision", "fp32", "--seed", "3", "--data-cache", ""]
    assert train.main(argv + list(extra)) == 0


def metrics(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", FAMILIES)
def test_paragraphs_are_framed_by_the_tokenizers_own_special_tokens(name, family_dirs, austen_paragraphs):
    from austen_gpt.models.loading import load_tokenizer

    family, tokenizer = FAMILIES[name], load_tokenizer(str(family_dirs[name]))
    start, end = paragraph_frame(tokenizer)
    assert tokenizer.convert_ids_to_tokens([start, end]) == [family.bos or family.eos, family.eos]
    paragraphs = austen_paragraphs[:3]
    body = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in paragraphs]
    examples = tokenize_paragraphs(tokenizer, paragraphs, 10_000).tolist()
    assert examples == [[start, *ids, end] for ids in body]  # nothing added, nothing dropped
    between = [end] if start == end else [end, start]  # GPT-2 and Pythia: one token between paragraphs
    stream = [start, *body[0], *between, *body[1], *between, *body[2], end]
    assert tokenize_paragraphs(tokenizer, paragraphs, 10_000, pack=True).tolist() == [stream]
    batch = collate(examples[:2], tokenizer.pad_token_id)
    short = min(len(e) for e in examples[:2])
    row = [len(e) for e in examples[:2]].index(short)
    assert batch["labels"][row, short - 1] == end  # the closing end-of-text is a real target
    assert (batch["labels"][row, short:] == -100).all()  # padding never is, whatever its id


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_full_fine_tuning_learns_resumes_bitwise_and_samples(name, family_dirs, small_data, tmp_path, capsys):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_run(whole, family_dirs[name], small_data, "--epochs", "2")
    losses = [m["train_loss"] for m in metrics(whole) if "train_loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns (each: the mean since the previous log point)
    shutil.copytree(whole / "Checkpoints/Epoch_1", resumed / "Checkpoints/Epoch_1")
    train_run(resumed, family_dirs[name], small_data, "--epochs", "2", "--resume")
    first, second = load_file(whole / "out/model.safetensors"), load_file(resumed / "out/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    capsys.readouterr()
    argv = ["--model-path", str(whole / "out"), "--prompt", "Elizabeth", "--n-return-seqs", "2", "--seed", "1"]
    assert inference.main(argv + ["--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1. Elizabeth") and "\n2. Elizabeth" in printed
    family = FAMILIES[name]
    assert family.eos not in printed and (family.bos is None or family.bos not in printed)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_lora_picks_the_attention_layers_merges_exactly_and_qlora_trains(name, family_dirs, small_data, tmp_path):
    import bitsandbytes as bnb
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from austen_gpt.sampling.loading import load_for_sampling

    train_run(tmp_path / "lora", family_dirs[name], small_data, "--lora", "--rank-lora", "4", "--epochs", "1")
    adapter = tmp_path / "lora/out"
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == sorted(
        FAMILIES[name].lora_targets
    )
    assert export.main(["--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapters = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    ids = torch.tensor([[1, 5, 9, 200, 300, 17]])
    with torch.no_grad():
        assert (merged(ids).logits - adapters(ids).logits).abs().max() < 1e-4

    train_run(tmp_path / "qlora", family_dirs[name], small_data, "--qlora", "--rank-lora", "4", "--epochs", "1")
    train_losses = [m["train_loss"] for m in metrics(tmp_path / "qlora") if "train_loss" in m]
    assert sum(train_losses[-3:]) < sum(train_losses[:3])  # it learns on the 4-bit layers
    quantized = load_for_sampling(str(tmp_path / "qlora/out"), load_in_4bit=True)  # as inference.py does
    four_bit = [layer for layer, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert all(any(layer.endswith(f"{t}.base_layer") for layer in four_bit) for t in FAMILIES[name].lora_targets)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt_neox"])
def test_dropout_reaches_attention_where_the_architecture_keeps_it_as_a_number(name, family_dirs):
    """Llama, Qwen2 and Mistral have no nn.Dropout at all: their attention reads a rate from the config."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import set_dropout

    model = AutoModelForCausalLM.from_pretrained(family_dirs[name]).train()
    ids = torch.tensor([[1, 5, 9, 200, 300, 17]])
    assert torch.equal(model(ids).logits, model(ids).logits)  # as built: no dropout anywhere
    note = set_dropout(model, 0.5)
    assert not torch.equal(model(ids).logits, model(ids).logits)  # now there is
    assert model.config.attention_dropout == 0.5  # and the saved config says so
    if name == "gpt_neox":
        assert note is None and model.config.hidden_dropout == 0.5  # embeddings and residuals: nn.Dropout layers
    else:
        lacks = f"{name} models have no dropout on embeddings or residual stream"
        assert note == f"--dropout 0.5 applies to attention only: {lacks}"


def test_dropout_reaches_opts_plain_number_rates():
    """OPT keeps all its dropout as numbers named dropout, attention_dropout and activation_dropout."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from austen_gpt.models.loading import set_dropout

    shape = dict(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(OPTConfig(**shape, dropout=0.0, attention_dropout=0.0)).train()
    ids = torch.tensor([[2, 5, 9, 20, 30]])
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert set_dropout(model, 0.5) is None  # residual and attention dropout: nothing to warn about
    assert not torch.equal(model(ids).logits, model(ids).logits) and model.config.dropout == 0.5
