"""Tiny random models of the causal-LM families the tool supports (GPT-2, Llama, Qwen2, GPT-NeoX, Mistral),
each with a tokenizer whose special tokens are laid out as in the real family's, built offline with `tokenizers`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from austen_gpt.data.bpe import train_bpe


@dataclass(frozen=True)
class Family:
    model_type: str
    bos: str | None  # as the real tokenizers: Llama 3 and Mistral have their own, Qwen2 none, GPT-2/Pythia = eos
    eos: str
    pad: str | None  # Qwen2 pads with end-of-text, the others have no pad token
    specials: tuple[str, ...]
    config: dict
    lora_targets: tuple[str, ...]


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FAMILIES = {
    "gpt2": Family(
        "gpt2", "<|endoftext|>", "<|endoftext|>", None, ("<|endoftext|>",),
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), ("c_attn",),
    ),
    "llama": Family(
        "llama", "<|begin_of_text|>", "<|end_of_text|>", None, ("<|begin_of_text|>", "<|end_of_text|>"),
        dict(TINY, num_key_value_heads=2, tie_word_embeddings=True), ATTENTION,
    ),
    "qwen2": Family(
        "qwen2", None, "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        dict(TINY, num_key_value_heads=2, tie_word_embeddings=True), ATTENTION,
    ),
    "gpt_neox": Family(
        "gpt_neox", "<|endoftext|>", "<|endoftext|>", None, ("<|endoftext|>", "<|padding|>"),
        dict(TINY), ("query_key_value",),
    ),
    "mistral": Family(
        "mistral", "<s>", "</s>", None, ("<unk>", "<s>", "</s>"), dict(TINY, num_key_value_heads=2), ATTENTION
    ),
}  # fmt: skip


def build_family(folder: Path, family: Family, paragraphs: list[str]) -> Path:
    """A random tiny model of `family` saved with its tokenizer, like a Hub model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokens = dict(bos_token=family.bos, eos_token=family.eos, pad_token=family.pad)
    tokens = {key: value for key, value in tokens.items() if value is not None}
    if "<unk>" in family.specials:
        tokens["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(paragraphs, 512, family.specials), **tokens)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family.model_type, **family.config, **ids))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
