"""LoRA and QLoRA: frozen base, small adapters, exact resume, adapter loading, merging, bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, run_in_process, run_script, tiny_config, train_args
from safetensors.torch import load_file

import export
import inference
import train
from austen_gpt.cli import UserError
from austen_gpt.models import lora
from austen_gpt.models.evaluation import lm_loss_sum
from austen_gpt.training.step import make_optimizer

COMMON = (
    "--epochs 2 --batch-size 8 --max-input-length 64 --lr 2e-2 --warmup-steps 2 --rank-lora 8 "
    "--alpha-lora 16 --targets-lora c_attn c_proj c_fc --precision fp32 --seed 3"
).split()


def train_adapters(tmp: Path, base: Path, data: Path, mode: str, *extra: str):
    return run_script("train.py", *train_args(tmp, base, data, mode, *COMMON, *extra), cwd=tmp)


@pytest.fixture(scope="module", params=["--lora", "--qlora"])
def run(request, tmp_path_factory, tiny_model_dir, small_data) -> tuple[str, Path]:
    """One uninterrupted 2-epoch LoRA run and one QLoRA run (with samples every 3 steps)."""
    tmp = tmp_path_factory.mktemp(request.param.strip("-"))
    result = train_adapters(
        tmp, tiny_model_dir, small_data, request.param, "--sample-every", "3", "--max-output-length", "12"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp / "stdout.txt").write_text(result.stdout)
    return request.param, tmp


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("It is a truth universally acknowledged, that a single man", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.slow
def test_loss_falls_and_samples_during_training_do_not_break_it(run):
    _, tmp = run
    metrics = [json.loads(line) for line in (tmp / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] - 0.05  # each: the mean since the previous log point
    samples = (tmp / "Checkpoints/logs/samples.jsonl").read_text().splitlines()
    assert len(samples) >= 3 * 10  # sampled (eval mode) every 3 steps, training went on each time
    stdout = (tmp / "stdout.txt").read_text()
    assert "trainable (" in stdout and "MiB in memory" in stdout


@pytest.mark.slow
def test_output_is_a_small_standard_peft_adapter(run, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    _, tmp = run
    out = tmp / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)  # no embedding, no base weight
    assert (out / "adapter_model.safetensors").stat().st_size <= 0.10 * (
        tiny_model_dir / "model.safetensors"
    ).stat().st_size
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve()
    )
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # finds its base through adapter_config.json
    assert model.peft_config["default"].r == 8


@pytest.mark.slow
def test_resume_equals_uninterrupted(run, tiny_model_dir, small_data, tmp_path):
    mode, tmp = run
    for kept in ("Epoch_1", "best"):  # what the interrupted run leaves: its checkpoint and the best adapters so far
        shutil.copytree(tmp / "Checkpoints" / kept, tmp_path / "Checkpoints" / kept)
    resumed = train_adapters(
        tmp_path,
        tiny_model_dir,
        small_data,
        mode,
        "--sample-every",
        "3",
        "--max-output-length",
        "12",
        "--restore-file",
        "Epoch_1",
        "--load-checkpoint",
        "True",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "out/adapter_model.safetensors"), load_file(tmp / "out/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_adapters_train_and_the_base_stays_bit_identical(tiny_model_dir, tokenizer, tmp_path, austen_paragraphs):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from austen_gpt.data.batches import collate
    from austen_gpt.data.tokens import tokenize_paragraphs

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    originals = dict(base.named_parameters())  # the same tensors live on inside the PeftModel
    before = {name: p.detach().clone() for name, p in originals.items()}
    model = lora.add_lora(base, 8, 16, 0.0, ["c_attn", "c_fc"], quantized=False, base_name=str(tiny_model_dir))
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    batch = collate(tokenize_paragraphs(tokenizer, austen_paragraphs[:8], 64).tolist(), tokenizer.pad_token_id)
    losses = []
    for _ in range(8):
        loss_sum, n = lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / n).item())
    assert losses[-1] < losses[0]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)  # B starts at 0
    for name, value in before.items():  # every base weight, bit for bit, weight decay notwithstanding
        assert torch.equal(originals[name], value), name
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(logits_of(model, tokenizer), logits_of(reloaded, tokenizer))


@pytest.mark.slow
def test_inference_detects_the_adapter_folder(run, capsys):
    _, tmp = run
    argv = ["--model_path", str(tmp / "out"), "--prompt", "Emma", "--max-new-tokens", "6", "--seed", "4"]
    assert inference.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. Emma") and "3. Emma" in out


@pytest.mark.slow
def test_merged_model_matches_the_adapters_and_keeps_embeddings_tied(run, tokenizer, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    _, tmp = run
    assert export.main(["--adapter", str(tmp / "out"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    assert not any("lora" in key for key in load_file(tmp_path / "merged/model.safetensors"))
    adapters = AutoPeftModelForCausalLM.from_pretrained(tmp / "out").eval()
    difference = (logits_of(merged, tokenizer) - logits_of(adapters, tokenizer)).abs().max().item()
    assert difference < 1e-4


def test_adapter_sizes_for_gpt2_and_gpt2_medium_stay_under_ten_percent():
    from transformers import GPT2Config

    for config in (GPT2Config(), GPT2Config(n_embd=1024, n_layer=24, n_head=16)):  # gpt2, gpt2-medium
        adapter, base = lora.adapter_size(config, rank=64, targets=["auto"])
        assert adapter <= 0.10 * base
    adapter, _ = lora.adapter_size(GPT2Config(), rank=64, targets=["auto"])  # c_attn
    assert adapter == 4 * 12 * 64 * (768 + 3 * 768)  # A: 768 x 64, B: 64 x 2304 per layer, fp32


@pytest.mark.parametrize(
    "name, mib_rank_64, mib_rank_16",
    [("smollm2-135m", 28.1, 7.0), ("qwen2.5-0.5b", 33.0, 8.2), ("pythia-160m", 9.0, 2.2)],
)
def test_adapter_sizes_of_real_models_as_documented(name, mib_rank_64, mib_rank_16):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(REPO / "configs/real" / name)
    for rank, documented in ((64, mib_rank_64), (16, mib_rank_16)):
        adapter, base = lora.adapter_size(config, rank=rank, targets=["auto"])
        assert round(adapter / 2**20, 1) == documented and adapter < 0.06 * base


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)


@pytest.mark.parametrize(
    "model_type, extra, expected",
    [
        ("gpt2", dict(n_embd=32, n_layer=2, n_head=4), ["c_attn"]),
        ("llama", dict(num_key_value_heads=2), ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("qwen2", dict(num_key_value_heads=2), ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("mistral", dict(num_key_value_heads=2), ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gemma", dict(num_key_value_heads=2, head_dim=8), ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("gpt_neox", {}, ["query_key_value"]),
        ("opt", dict(ffn_dim=64, word_embed_proj_dim=32), ["q_proj", "k_proj", "v_proj", "out_proj"]),
        ("phi", {}, ["q_proj", "k_proj", "v_proj"]),
        ("phi3", dict(num_key_value_heads=2, pad_token_id=0), ["qkv_proj", "o_proj"]),
    ],
)
def test_auto_targets_are_the_attention_projections_of_each_architecture(model_type, extra, expected):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY, **extra))
    assert lora.resolve_lora_targets(model, ["auto"]) == expected
    linear = lora.resolve_lora_targets(model, ["all-linear"])
    assert set(expected) < set(linear) and "lm_head" not in linear
    with pytest.raises(UserError, match="no such layer in this model; choose from"):
        lora.resolve_lora_targets(model, ["attn_nonexistent"])


def test_auto_targets_fall_back_to_peft_and_else_ask_for_names():
    assert lora.auto_lora_targets("bloom", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]) == [
        "query_key_value"
    ]
    assert lora.auto_lora_targets("falcon", ["dense", "query_key_value"]) == ["query_key_value"]
    assert lora.auto_lora_targets("mpt", ["Wqkv", "out_proj", "up_proj"]) == ["Wqkv"]  # PEFT's mapping
    with pytest.raises(UserError, match="knows no attention layers for model type 'mystery'"):
        lora.auto_lora_targets("mystery", ["wi", "wo"])


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--qlora", "--load-in-8bit"], "--qlora (4-bit) and --load-in-8bit exclude each other"),
        (["--lora", "--rank-lora", "0"], "--rank-lora must be at least 1"),
        (["--lora", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--lora", "--from-scratch"], "LoRA freezes the base model: drop --from-scratch"),
    ],
)
def test_bad_lora_flags(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in run_in_process(train.main, argv, capsys)


def test_unknown_target_module_lists_the_valid_ones(capsys, tmp_path, monkeypatch, tiny_model_dir, small_data):
    monkeypatch.chdir(tmp_path)
    argv = ["--lora", "--model", str(tiny_model_dir), "--data", str(small_data), "--targets-lora", "c_attn", "q_proj"]
    message = run_in_process(train.main, argv, capsys)
    assert "--targets-lora q_proj: no such layer" in message and "choose from c_attn c_fc c_proj" in message


def test_missing_bitsandbytes_suggests_lora(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # import now fails
    with pytest.raises(UserError, match="--qlora needs bitsandbytes .*use --lora"):
        lora.require_bitsandbytes("cpu", "--qlora")


def test_adapter_whose_base_model_is_unavailable(tmp_path, tiny_model_dir):
    from transformers import GPT2LMHeadModel

    adapter = tmp_path / "adapter"
    model = lora.add_lora(
        GPT2LMHeadModel(tiny_config()), 4, 8, 0.0, ["c_attn"], quantized=False, base_name="no-org/no-model"
    )
    model.save_pretrained(adapter)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, adapter / name)
    for script, argv in (
        ("inference.py", ["--model_path", "adapter"]),
        ("export.py", ["--adapter", "adapter", "--out", "m"]),
    ):
        result = run_script(script, *argv, cwd=tmp_path)
        assert_user_error(result, "need their base model", "no-org/no-model", "--base-model")
    assert not (tmp_path / "m").exists()


def test_in_bf16_the_frozen_base_is_stored_in_bf16_and_computes_bitwise_the_same(tiny_model_dir, tokenizer):
    """Autocast casts the frozen base's matmul weights to bf16 at every forward; stored in bf16 they are not
    cast at all and take half the memory, and loss and adapter gradients are bitwise the same."""
    from transformers import AutoModelForCausalLM

    from austen_gpt.data.batches import collate

    batch = collate([tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]], 0)

    def adapters(stored_in_bf16: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = lora.add_lora(base, 8, 16, 0.0, ["c_attn", "c_fc"], quantized=False, base_name=str(tiny_model_dir))
        layers = lora.frozen_matmul_weights_in(model, torch.bfloat16) if stored_in_bf16 else 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, _ = lm_loss_sum(model, batch)
        loss_sum.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return model, layers, loss_sum, grads

    stored, layers, loss, grads = adapters(stored_in_bf16=True)
    cast, _, cast_loss, cast_grads = adapters(stored_in_bf16=False)
    blocks = stored.config.n_layer
    assert layers == 4 * blocks  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each block
    assert stored.get_input_embeddings().weight.dtype == torch.float32  # and the output layer tied to it
    assert torch.equal(loss, cast_loss) and grads.keys() == cast_grads.keys()
    assert all(torch.equal(g, cast_grads[k]) for k, g in grads.items())
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)  # the adapters
    from transformers.pytorch_utils import Conv1D

    halved = sum(p.numel() * 2 for m in cast.modules() if isinstance(m, Conv1D) for p in m.parameters())
    assert cast.get_memory_footprint() - stored.get_memory_footprint() == halved  # 4 bytes each, now 2


@pytest.mark.slow
def test_lora_trains_in_bf16_with_samples_and_validation(tiny_model_dir, small_data, tmp_path):
    argv = [a if a != "fp32" else "bf16" for a in COMMON]
    result = run_script(
        "train.py",
        *train_args(tmp_path, tiny_model_dir, small_data, "--lora", *argv, "--epochs", "1", "--sample-every", "3"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "Checkpoints/logs/metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] - 0.05 and any("val_loss" in m for m in metrics)
    assert len((tmp_path / "Checkpoints/logs/samples.jsonl").read_text().splitlines()) >= 3 * 3
