"""A model and its tokenizer as one GGUF file, for llama.cpp, Ollama and LM Studio, written with `gguf`, the
llama.cpp project's own Python writer.

GPT-2, Llama and Qwen2 are written as llama.cpp's converter writes them: the same tensor names (gguf's own
name map), GPT-2's Conv1D weights transposed to rows of outputs, Llama's query and key rows (weights and biases)
reordered for llama.cpp's rotary layout, an output layer that shares the embedding written out, rotary scaling
(linear; Llama 3's as per-frequency factors). The tokenizer goes in whole
(its tokens, their types and merges) with its pre-tokenizer named as llama.cpp names it, and prompts start
with the token every training paragraph starts with, so llama.cpp's prompt tokens are `prompt_ids()`'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from austen_gpt.cli import UserError
from austen_gpt.data.tokens import paragraph_frame

ARCHITECTURES = {"gpt2": "GPT2", "llama": "LLAMA", "qwen2": "QWEN2"}  # transformers' model_type -> gguf's
# Pre-tokenizers by the regular expression that splits words before the merges, as llama.cpp names them
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {"gpt-2": "GPT-2's byte-level split", "llama-bpe": "Llama 3's", "qwen2": "Qwen2's"}
ROPE_SCALINGS = {"LLAMA": ("linear", "llama3"), "QWEN2": ("linear",)}  # what llama.cpp's loaders compute as PyTorch


@dataclass(frozen=True)
class Provenance:
    """What the file says of the model: its name, the data and run that trained it."""

    name: str
    data: str | None = None
    run: str | None = None


def architecture(model) -> str:
    """gguf's name of the model's architecture; refuses one llama.cpp's GPT-2, Llama and Qwen2 loaders do not read."""
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise UserError(f"--gguf: the model is a {kind}; GGUF export supports {supported}")
    return ARCHITECTURES[kind]


def pre_tokenizer(tokenizer) -> str:
    """tokenizer.ggml.pre: llama.cpp's name of how the tokenizer splits text before its merges. Refuses any
    other than GPT-2's byte-level split (GPT-2, this project's BPE), Llama 3's and Qwen2's."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"--gguf: the tokenizer is {model.get('type')}, not a byte-level BPE; GGUF export needs one")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    split = next((p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"), None)
    byte_level = any(p.get("type") == "ByteLevel" and not p.get("use_regex", True) for p in parts)
    if byte_level and split == LLAMA3_SPLIT:
        return "llama-bpe"
    if byte_level and split == QWEN2_SPLIT:
        return "qwen2"
    known = ", ".join(PRE_TOKENIZERS.values())
    raise UserError(f"--gguf: llama.cpp would split this tokenizer's text another way; supported: {known}")


def vocabulary(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp type (normal, control for special tokens, user-defined for other added
    ones, unused for the model's ids the tokenizer does not have)."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            kind = (
                gguf.TokenType.CONTROL
                if token in special
                else gguf.TokenType.USER_DEFINED
                if token in added
                else gguf.TokenType.NORMAL
            )
            types.append(kind)
    return tokens, [int(t) for t in types]


def merges(tokenizer) -> list[str]:
    found = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [" ".join(m) if isinstance(m, list) else m for m in found]


def permute_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's query or key rows in llama.cpp's rotary order (its converter's `permute`)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def rope_parameters(config) -> dict:
    """The model's rotary settings: transformers 5 keeps them in `rope_parameters` (with rope_theta), older
    configs in `rope_scaling` (the type under `type`, rope_theta beside it in the config)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_theta(config) -> float:
    return float(rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_scaling(config, arch: str) -> str | None:
    """The rotary scaling the file is to carry: "linear" (Llama, Qwen2) or "llama3" (Llama), None for none.
    Refuses any other (YaRN, dynamic NTK, LongRoPE, ...), whose positions llama.cpp would not compute as
    PyTorch does from what this export writes."""
    params = rope_parameters(config)
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default" or arch == "GPT2":  # GPT-2 has a position table, no rotary positions
        return None
    if kind not in ROPE_SCALINGS[arch]:
        raise UserError(
            f"--gguf: rope scaling {kind!r} is not supported by this export; supported: linear, llama3 (Llama)"
        )
    return kind


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> torch.Tensor:
    """rope_freqs: what llama.cpp divides each rotary frequency by under Llama 3's scaling, computed as llama.cpp's
    converter computes it (LlamaModel.generate_extra_tensors): 1 for wavelengths under the trained length /
    high_freq_factor, `factor` over the trained length / low_freq_factor, a smooth mix between. The trained length
    (original_max_position_embeddings) is read from the rope parameters, where transformers reads it."""
    params = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    trained = params.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * math.pi / freqs
    smooth = (trained / wavelengths - low) / (high - low)
    mixed = 1 / ((1 - smooth) / factor + smooth)
    scaled = torch.where(wavelengths > trained / low, torch.tensor(float(factor)), mixed)
    return torch.where(wavelengths < trained / high, torch.tensor(1.0), scaled).float()


def converted(name: str, tensor: torch.Tensor, config, arch: str, context: int) -> torch.Tensor:
    """One weight as llama.cpp reads it."""
    tensor = tensor.detach().float().cpu()
    if arch == "GPT2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return tensor.T.contiguous()  # Conv1D keeps (in, out); llama.cpp reads rows of outputs
    if arch == "GPT2" and name.endswith(".wpe.weight"):
        return tensor[:context]  # llama.cpp requires one row per position of the context length, no more
    if arch == "LLAMA" and name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rotary(tensor, config.num_attention_heads)
    if arch == "LLAMA" and name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rotary(tensor, config.num_key_value_heads)
    return tensor


def gguf_tensors(model, arch: str, context: int, scaling: str | None) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight llama.cpp reads, as its converter writes them; with Llama 3's rope
    scaling, its per-frequency factors."""
    import gguf

    config = model.config
    blocks = getattr(config, "num_hidden_layers", None) or config.n_layer
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), blocks)
    found = []
    for name, tensor in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal mask buffers, a rotary cache: not weights
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(f"--gguf: llama.cpp has no place for the {arch.lower()} weight {name}")
        found.append((mapped, converted(name, tensor, config, arch, context)))
    if "output.weight" not in dict(found):  # tied to the embedding: written out, as the converter does
        found.append(("output.weight", dict(found)["token_embd.weight"]))
    if scaling == "llama3":
        found.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config)))
    return found


def stored(name: str, tensor: torch.Tensor, kind: str):
    """The tensor as the file stores it: 1-D ones (norms, biases) in f32 always; matrices in f16 or q8_0 where
    asked (q8_0 where rows split into its 32-value blocks, else f16)."""
    import gguf

    data = tensor.numpy().astype(np.float32)
    if kind == "f32" or data.ndim < 2:
        return data, None
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def add_hyperparameters(writer, model, arch: str, context: int, scaling: str | None) -> None:
    import gguf

    c = model.config
    writer.add_context_length(context)
    if arch == "GPT2":
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        return
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(c))
    writer.add_rope_freq_base(rope_theta(c))
    if scaling == "linear":  # as the converter writes it; llama.cpp's loaders all read it (Llama 3's is a tensor)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(c)["factor"]))


def write_gguf(model, tokenizer, out: Path, kind: str, context: int, provenance: Provenance) -> Path:
    """The model and tokenizer as `out` (a .gguf file) in `kind` (f32, f16 or q8_0); `context` is the
    context length llama.cpp is told (a from-scratch model's trained length)."""
    import gguf

    arch = architecture(model)
    pre = pre_tokenizer(tokenizer)
    scaling = rope_scaling(model.config, arch)  # refused, if it is, before any file is written
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)])
    writer.add_name(provenance.name)
    described = [f"{provenance.name}, written by austen-gpt's export.py"]
    described += [f"trained on {provenance.data}"] if provenance.data else []
    writer.add_description("; ".join(described))
    if provenance.data:
        writer.add_string("austen_gpt.training_data", provenance.data)
    if provenance.run:
        writer.add_string("austen_gpt.run", provenance.run)
    add_hyperparameters(writer, model, arch, context, scaling)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    size = model.get_input_embeddings().weight.shape[0]
    tokens, types = vocabulary(tokenizer, size)
    start, end = paragraph_frame(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer))
    writer.add_bos_token_id(start)  # every prompt starts as a training paragraph does
    writer.add_eos_token_id(end)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, tensor in gguf_tensors(model, arch, context, scaling):
        data, raw = stored(name, tensor, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize_q4_k_m(source: Path, out: Path) -> None:
    """`source` (an f16 GGUF) quantized to Q4_K_M by llama.cpp's own quantizer, through llama-cpp-python."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"--gguf-type q4_k_m: llama.cpp's quantizer failed on {source}")


def modelfile(gguf_path: Path, tokenizer, settings, context: int) -> str:
    """An Ollama Modelfile for the file: the raw prompt continued, stopping at the paragraph's end
    (end-of-text), sampled as inference.py samples the model (`settings`): every sampler Ollama has on by
    default set to inference.py's value or off."""
    stop = tokenizer.convert_ids_to_tokens(paragraph_frame(tokenizer)[1])
    parameters = {
        "stop": json.dumps(stop),
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "min_p": 0.0,  # inference.py has no min-p cut; Ollama's default could be one
        "repeat_penalty": settings.repetition_penalty,  # Ollama's own default (1.1) would penalize where it does not
        "repeat_last_n": -1,  # the whole window (num_ctx): inference.py's penalty counts every token of the text
        # inference.py's new tokens for an empty prompt: its --max-length counts the prompt, Ollama's count does not
        "num_predict": settings.new_tokens(0),
        "num_ctx": context,
    }
    return "\n".join(
        [
            f"# ollama create {gguf_path.stem} -f {gguf_path.with_suffix('.Modelfile').name}",
            f'# ollama run {gguf_path.stem} "It was a fine morning"',
            f"FROM ./{gguf_path.name}",
            'TEMPLATE """{{ .Prompt }}"""',
            *(f"PARAMETER {name} {value}" for name, value in parameters.items()),
            "",
        ]
    )
