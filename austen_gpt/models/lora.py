"""LoRA and QLoRA: quantized base models, adapters on chosen modules, and their sizes.

GPT-2's token embedding is tied to its output layer and this project adds no tokens, so adapters never
touch the embedding: they stay a few MB and the merged model keeps its tied embedding.

peft is imported inside the functions that make or load adapters: with the bitsandbytes it loads it takes
about 1.5 s, which a full fine-tune and sampling from a plain model never pay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from austen_gpt.cli import UserError, first_line
from austen_gpt.models.integrity import check_folder

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(path: str | Path) -> str:
    """The base model an adapter folder was trained on (a Hub id or an absolute local path)."""
    check_folder(Path(path), "copy the adapter folder again, or train it anew")
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def quantization_config(bits: int, compute_dtype):
    """bitsandbytes settings: 4-bit NF4 with double quantization (QLoRA), or LLM.int8()."""

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def require_bitsandbytes(device, flag: str) -> None:
    """Stop before any work when k-bit quantization cannot run on this machine."""

    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:
        raise UserError(f"{flag} needs bitsandbytes ({err}); pip install bitsandbytes, or use --lora") from None
    try:
        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device))
    except Exception as err:  # no backend for this device: the error types differ between releases
        raise UserError(
            f"{flag}: bitsandbytes cannot quantize on {device} ({first_line(err)}); use --lora instead"
        ) from None


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for fast CPU inference.

    On CPUs with AVX512-BF16, an eval-mode forward (validation, periodic samples) repacks each
    Linear4bit's weights into a CPU-only inference layout, and the next training step then crashes
    on them. Training must keep the standard layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_target_names(model) -> list[str]:
    """Names of the layers LoRA can adapt (GPT-2: c_attn, c_proj, c_fc), without the tied output layer."""

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head")
    }
    return sorted(names)


def resolve_lora_targets(model, targets: list[str]) -> list[str]:
    """The layer names --targets-lora means for this model: `auto` picks per architecture, `all-linear` is
    every linear layer but the output layer, anything else must name layers the model has."""
    valid = lora_target_names(model)
    if targets == ["all-linear"]:
        return valid
    if targets == ["auto"]:
        return auto_lora_targets(model.config.model_type, valid)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise UserError(
            f"--targets-lora {' '.join(unknown)}: no such layer in this model; choose from {' '.join(valid)}, "
            "or auto or all-linear"
        )
    return targets


def auto_lora_targets(model_type: str, layers: list[str]) -> list[str]:
    """--targets-lora auto: the attention's input projections, and its output projection where it is separate.

    GPT-2: the fused c_attn only, the original project's choice. GPT-NeoX (Pythia): the fused query_key_value,
    as PEFT does. Llama, Qwen, Mistral, Gemma, OPT, Phi and most newer models: q_proj, k_proj, v_proj and the
    output projection (o_proj or out_proj); Phi-3's fused qkv_proj and o_proj. Anything else: PEFT's own
    mapping for the architecture.
    """

    output = [name for name in ("o_proj", "out_proj") if name in layers][:1]
    if model_type == "gpt2":
        return ["c_attn"]
    if "query_key_value" in layers:
        return ["query_key_value"]
    if {"q_proj", "k_proj", "v_proj"} <= set(layers):
        return ["q_proj", "k_proj", "v_proj", *output]
    if "qkv_proj" in layers:
        return ["qkv_proj", *output]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS  # costly

    peft_default = [name for name in PEFT_TARGETS.get(model_type, []) if name in layers]
    if peft_default:
        return peft_default
    raise UserError(
        f"--targets-lora auto knows no attention layers for model type '{model_type}'; name them, e.g. "
        f"--targets-lora {' '.join(layers[:2])} (this model has {' '.join(layers)}), or use all-linear"
    )


def add_lora(model, rank: int, alpha: int, dropout: float, targets: list[str], quantized: bool, base_name: str):
    """Freeze the base model and attach fresh LoRA adapters to the `targets` layers (see resolve_lora_targets)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # costly: see the top

    targets = resolve_lora_targets(model, targets)
    if quantized:
        # Casts the remaining fp16/bf16 weights (LayerNorms, embeddings) to fp32 for stable training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=has_conv1d(model),  # GPT-2's Conv1D stores weights transposed (bitsandbytes layers do not)
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = portable_name(base_name)
    return model


def frozen_matmul_weights_in(model, dtype: torch.dtype) -> int:
    """Store the frozen base's matmul layers (Linear, GPT-2's Conv1D: weight and bias) in `dtype`, the
    autocast dtype; returns how many. Autocast would cast them to it at every forward, so each matmul sees the
    same values, bitwise, and the base takes half the memory. Embeddings (and an output layer tied to them)
    and norms keep fp32, as autocast keeps them."""
    embeddings = model.get_input_embeddings().weight
    layers = [
        module
        for module in model.modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
        and not module.weight.requires_grad
        and module.weight.dtype == torch.float32
        and module.weight is not embeddings
    ]
    for layer in layers:
        for param in (layer.weight, layer.bias):
            if param is not None and not param.requires_grad:
                param.data = param.data.to(dtype)
    return len(layers)


def adapted_layers(model) -> list[str]:
    """The layer names a PEFT model's adapters sit on, as its adapter_config.json records them."""
    return sorted(model.peft_config["default"].target_modules)


def load_lora(model, adapter_dir: Path, quantized: bool, trainable: bool):
    """Attach the adapters saved in `adapter_dir` (a checkpoint or a final adapter folder)."""
    from peft import PeftConfig, PeftModel, prepare_model_for_kbit_training  # costly: see the top

    check_folder(Path(adapter_dir), "copy the adapter folder again, or train it anew")
    if quantized and trainable:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # The same adapter matrices fit GPT-2's transposed Conv1D and a quantized Linear: say which one this is.
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.fan_in_fan_out = has_conv1d(model)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=trainable)


def has_conv1d(model) -> bool:

    return any(isinstance(module, Conv1D) for module in model.modules())


def portable_name(name: str) -> str:
    """What an adapter records as its base: a Hub id as is, a local folder as an absolute path."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting each packed 4-bit weight as its real number of values."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def adapter_size(config: Any, rank: int, targets: list[str]) -> tuple[int, int]:
    """(adapter bytes, base model bytes) in fp32 safetensors, from a config alone (no weights are made)."""
    from peft import LoraConfig, get_peft_model  # costly: see the top

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        base_bytes = 4 * sum(p.numel() for p in model.parameters())  # tied embedding counted once
        targets = resolve_lora_targets(model, targets)
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, fan_in_fan_out=has_conv1d(model))
        peft_model = get_peft_model(model, lora)
    adapter_bytes = 4 * sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return adapter_bytes, base_bytes
