"""Typed settings that more than one layer reads: which paragraphs train (DataSettings), which model learns
them (ModelSettings) and how samples are drawn (SamplingSettings), with the defaults every script's flags
show. Scripts turn their parsed flags into these (`from_flags`); library code takes them, or plain values,
never an argparse Namespace.

Each field is named as its flag's destination (`--max-input-length` -> `max_input_length`), so a run's settings
keep the names its checkpoints and run.yaml store them under.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

DEFAULT_DATA = "austen_dataset.pkl"  # the bundled Austen paragraphs, found from any working folder
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the device computes it natively, fp16 on older GPUs
DEFAULT_PRECISION = "auto"

Settings = TypeVar("Settings")


@dataclass
class DataSettings:
    """The paragraphs and how they become examples."""

    data: str = DEFAULT_DATA
    """a file (.pkl, .txt, .jsonl, .json, .csv, .parquet, .arrow, also .gz/.zst), a folder or a Hub dataset id"""
    data_config: str | None = None
    """the configuration (subset) of a Hub dataset"""
    data_split: str | None = None
    """the split of a Hub dataset or a saved DatasetDict; None: train"""
    text_column: str | None = None
    """the column or field with the text; None: text, else sentence"""
    train_size: float = 0.9
    """the share of paragraphs that train; the rest validate"""
    split_by: str = "paragraph"
    """what validation holds out whole: paragraphs, or works (each .txt file of a --data folder)"""
    whole_works: bool = False
    """with --split-by work, train on each work as one document (its paragraphs joined by blank lines,
    end-of-text between works), as pretraining reads a corpus, instead of paragraph by paragraph; validation
    stays one paragraph per example"""
    keep_out: list[str] = field(default_factory=list)
    """data that --data must not hold on either side of the split (the author a base is later fine-tuned on)"""
    seed: int = 42
    """draws the split; in training also the data order and any new weights"""
    max_input_length: int = 100
    """tokens per example; longer paragraphs are cut in several"""
    data_cache: str = field(
        default_factory=lambda: os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "austen-gpt")
    )
    """folder of tokenized data, keyed by a hash of it; '' disables"""
    packing: bool = True
    """pack paragraphs into full blocks (no padding) instead of one per example"""


@dataclass
class ModelSettings:
    """The model, and LoRA/QLoRA adapters on it."""

    model: str = "gpt2"
    """Hub id or local folder of the base model"""
    from_scratch: bool = False
    """random weights from the --model config instead of pretrained ones"""
    lora: bool = False
    """train LoRA adapters on the frozen base model instead of all weights"""
    qlora: bool = False
    """LoRA on the base model quantized to 4-bit NF4 (bitsandbytes)"""
    load_in_8bit: bool = False
    """LoRA on the base model quantized to 8-bit (bitsandbytes)"""
    rank_lora: int = 64
    """LoRA rank"""
    alpha_lora: int = 16
    """LoRA alpha (the update is scaled by alpha/rank)"""
    targets_lora: list[str] = field(default_factory=lambda: ["auto"])
    """layers that get adapters, e.g. q_proj v_proj; auto: the attention projections (GPT-2: c_attn, GPT-NeoX:
    query_key_value, Llama/Qwen/Mistral/Gemma: q_proj k_proj v_proj o_proj); all-linear: every linear layer but
    the output layer"""
    dropout: float | None = None
    """dropout of the model's embeddings, attention and residual stream (default: the model's own, 0.1 for GPT-2);
    not the adapters' (--lora-dropout)"""
    lora_dropout: float = 0.05
    """dropout on the adapters' input"""

    @property
    def adapters(self) -> bool:
        """Whether the run trains adapters (LoRA, QLoRA or 8-bit) rather than all weights."""
        return self.lora or self.qlora or self.load_in_8bit


@dataclass
class SamplingSettings:
    """How a sample is drawn and how long it runs."""

    max_length: int = 300
    """prompt plus generated tokens, as the original project's --max_length"""
    max_new_tokens: int | None = None
    """generated tokens; overrides max_length when given"""
    top_k: int = 50
    """sample from the k likeliest tokens; 0 disables"""
    top_p: float = 0.95
    """nucleus sampling probability mass"""
    temperature: float = 1.0
    """softmax temperature; lower is more conservative"""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the text, special tokens aside; 1 disables"""
    paragraphs: int | None = 1
    """stop after this many end-of-text tokens; None: write on to the full length"""
    static_cache: bool = False
    """a preallocated KV cache, which transformers compiles on CUDA"""

    def new_tokens(self, prompt_tokens: int) -> int:
        return max(self.max_new_tokens or self.max_length - prompt_tokens, 1)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_flags(cls: type[Settings], flags: argparse.Namespace) -> Settings:
    """A settings dataclass filled from parsed flags: each field from the flag of its name (a field that no flag
    sets keeps its default), and a field that is itself a settings dataclass from its own fields."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_flags(kind, flags)
        elif hasattr(flags, f.name):
            values[f.name] = getattr(flags, f.name)
    return cls(**values)


def flat_settings(settings: Any) -> dict[str, Any]:
    """{flag destination: value} for every field of `settings` and of the settings groups inside it, in order."""
    flat = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        flat.update(flat_settings(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return flat
