"""Loading models and tokenizers: from Hub ids or local folders, for training (all weights, LoRA, QLoRA,
8-bit) or for sampling (a model folder, or an adapter folder on its base model).

A cached Hub model loads with no network request; an unreachable Hub or a folder that is not a model
gets one line saying what is wrong and what to do.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from austen_gpt.cli import UserError, first_line
from austen_gpt.models import lora
from austen_gpt.models.device import compute_dtype
from austen_gpt.models.integrity import check_folder
from austen_gpt.settings import ModelSettings

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ----------------------------------------------------------------------------------------------
# Models and tokenizers from the Hub or from local folders


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine gets an answer now, not after a minute of Hub retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_source(name: str) -> str:
    """A local folder for `name`: the folder itself, or the cached snapshot of a Hub id.

    Resolving the cache ourselves means a cached model loads with no network request at all (Hub
    lookups retry for about a minute when offline). An uncached Hub id is returned as is, to download.
    """
    from huggingface_hub import snapshot_download

    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _looks_like_path(name):
        raise UserError(f"model folder {name} does not exist; check the path")
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (the exception type differs across huggingface_hub versions)
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(
            f"'{name}' is neither a local folder nor in the Hugging Face cache, and the Hub is unreachable; "
            "download it on a connected machine (hf download NAME --local-dir DIR) and pass that folder, "
            "or train the offline config: --model configs/austen-tiny --from-scratch"
        )
    return name


def from_hub_or_folder(load: Callable[..., Any], name: str, **kwargs) -> Any:
    """`load(source)` for a local folder, cached Hub id or Hub download; failures become one UserError line."""
    source = local_source(name)
    try:
        return load(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load '{name}' ({first_line(err)})") from None


def has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in WEIGHT_FILES)


def load_tokenizer(name: str):
    """The model's own tokenizer; GPT-2 has no pad token, so padding reuses end-of-text (masked by attention)."""

    folder = Path(name).expanduser()
    if folder.is_dir():
        check_folder(folder, "copy or download the folder again")
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        # transformers would quietly build an empty-vocabulary tokenizer from config.json alone
        raise UserError(
            f"{name} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); save the tokenizer beside the model"
        )
    tokenizer = from_hub_or_folder(AutoTokenizer.from_pretrained, name)
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {name} has no end-of-text token; this project needs one to mark paragraph ends"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, from_scratch: bool = False, **load_kwargs):
    """Pretrained weights from a Hub id or folder; random weights only when `from_scratch` is asked for.

    `load_kwargs` go to `from_pretrained` (e.g. a bitsandbytes quantization_config and device_map).
    """

    folder = Path(name).expanduser()
    if folder.is_dir():
        check_folder(folder, "copy or download the model folder again")
    if from_scratch:
        config = from_hub_or_folder(AutoConfig.from_pretrained, name)
        return AutoModelForCausalLM.from_config(config)
    if folder.is_dir() and not (folder / "config.json").exists():
        raise UserError(f"{name} is not a model folder (no config.json); pass a Hub id or a saved model folder")
    if folder.is_dir() and not has_weights(folder):
        raise UserError(
            f"{name} has a config but no weights; add --from-scratch to train it from random weights, "
            "or pass a folder with model.safetensors"
        )
    return from_hub_or_folder(AutoModelForCausalLM.from_pretrained, name, **load_kwargs)


def check_vocabulary(model, tokenizer, name: str) -> None:
    """Every token id the tokenizer gives must have a row in the model's embedding; more rows than tokens are
    fine (GPT-NeoX and Qwen pad theirs). A tokenizer from another model would index past the end mid-run."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"{name}: its tokenizer has {len(tokenizer):,} tokens but the model's embedding only {rows:,} rows, so "
            "the tokenizer is another model's; put the model's own tokenizer files beside its weights"
        )


# ----------------------------------------------------------------------------------------------
# A model to train


def load_trainable_model(
    settings: ModelSettings, checkpoint: Path | None, mixed_precision: str, gradient_checkpointing: bool = False
):
    """All weights, or LoRA adapters on a frozen (optionally 4/8-bit) base; with activation checkpointing
    as asked.

    A full fine-tune resumes from the checkpoint's weights; a LoRA run reloads --model and then the
    checkpoint's adapters.
    """
    if settings.adapters:
        model = load_adapter_model(settings, checkpoint, mixed_precision)
    else:
        # fp32 weights for the optimizer to update, from a bf16 or fp16 checkpoint too (transformers would keep
        # the checkpoint's dtype, and bf16 weights lose updates smaller than 1/256 of themselves)
        from_scratch = settings.from_scratch and not checkpoint
        model = load_model(str(checkpoint or settings.model), from_scratch=from_scratch, dtype=torch.float32)
    if gradient_checkpointing:
        # Recompute each block's activations in the backward pass: far less memory, ~1/3 more compute.
        # The non-reentrant kind replays the same dropout masks, so the result does not change.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_adapter_model(settings: ModelSettings, checkpoint: Path | None, mixed_precision: str):
    """--model, quantized to 4 or 8 bits if asked, with fresh adapters or the checkpoint's."""

    bits = 4 if settings.qlora else 8 if settings.load_in_8bit else None
    kwargs = {"dtype": torch.float32}  # a half-precision checkpoint too: autocast, not the weights, computes in bf16
    if bits:
        device = PartialState().device
        lora.require_bitsandbytes(device, "--qlora" if bits == 4 else "--load-in-8bit")
        config = lora.quantization_config(bits, compute_dtype(mixed_precision))
        kwargs = {"quantization_config": config, "device_map": {"": device}}
    model = load_model(settings.model, **kwargs)
    if bits == 4:
        lora.keep_4bit_weights_trainable(model)
    if checkpoint:
        model = lora.load_lora(model, checkpoint, quantized=bool(bits), trainable=True)
    else:
        model = lora.add_lora(
            model,
            settings.rank_lora,
            settings.alpha_lora,
            settings.lora_dropout,
            settings.targets_lora,
            quantized=bool(bits),
            base_name=settings.model,
        )
    return model


DROPOUT_CONFIG_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout", "dropout")
DROPOUT_RATES = ("attention_dropout", "dropout", "activation_dropout")  # rates that layers keep as plain numbers


def set_dropout(model, p: float) -> str | None:
    """Every dropout of the model but the adapters', and its config (so the saved config says what was
    trained); returns a line naming what the architecture lacks, where it has less dropout than GPT-2.

    Dropout comes two ways: nn.Dropout layers (GPT-2: embeddings, attention, residual stream; GPT-NeoX:
    embeddings, residual stream) and rates that layers keep as plain numbers and pass to a functional
    dropout or the attention kernel (Llama, Qwen2, Mistral, GPT-NeoX: `attention_dropout`; OPT: `dropout`
    and `activation_dropout` too), which no nn.Dropout shows.
    """

    layers, rates = 0, set()
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            module.p, layers = p, layers + 1
        for attribute in DROPOUT_RATES:
            rate = getattr(module, attribute, None)
            if isinstance(rate, int | float) and not isinstance(rate, bool):
                setattr(module, attribute, p)
                rates.add(attribute)
    for key in DROPOUT_CONFIG_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    kind = model.config.model_type
    if p == 0 or layers or rates - {"attention_dropout"}:
        return None
    if not rates:
        return f"--dropout {p:g} does nothing: {kind} models have no dropout this project can set"
    return f"--dropout {p:g} applies to attention only: {kind} models have no dropout on embeddings or residual stream"
