"""The model's own layers, computing the same function while keeping less for backward.

* GELU. GPT-2's activation, `gelu_new` (also Phi's and GPT-J's; `gelu_fast` is the same formula), is written
  in transformers as a chain of elementwise operations: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))).
  In training each link keeps its output for backward, six tensors the width of the MLP (4 x the model width)
  per layer, and each link is a pass over memory. PyTorch's `gelu(approximate="tanh")` computes the same
  function in one kernel (in fp32 internally for bf16 inputs) and keeps only its input.
* Attention with dropout on a CPU. PyTorch's fused CPU attention kernel takes no dropout, so with GPT-2's
  attention dropout (0.1) training on a CPU falls back to the unfused attention, which keeps every layer's
  batch x heads x tokens x tokens scores, probabilities and dropout mask in fp32 for backward: 3.6 GB for
  GPT-2 124M at 8 x 512 tokens. Here that attention is recomputed in backward instead (activation
  checkpointing of the attention alone, the dropout mask drawn again from the same saved random state), so
  the result is bitwise the same. Only from RECOMPUTE_FROM_TOKENS tokens on: the scores grow with the square
  of the length, and at 100 tokens they are small while drawing the dropout masks again costs about 8% of a
  step. On a GPU the fused kernels take dropout and keep no scores: nothing to do.

docs/benchmarks.md has the side-by-side numbers. The config saved with the model is unchanged.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SAME_AS_TANH_GELU = (NewGELUActivation, FastGELUActivation)
RECOMPUTED_ATTENTION = "sdpa_recomputed_with_dropout"
RECOMPUTE_FROM_TOKENS = 256


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace every tanh-approximated GELU module written in Python by PyTorch's fused one; returns how many."""
    swaps = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) in SAME_AS_TANH_GELU
    ]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)


def fused_activations(model: torch.nn.Module) -> int:
    """How many of the model's activations are PyTorch's fused tanh GELU."""
    return sum(type(module) is GELUTanh for module in model.modules())


def sdpa_recomputed_with_dropout(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; in training with dropout on long sequences, recomputed in backward rather
    than kept. (Query: batch x heads x tokens x head size.)"""
    long = query.shape[2] >= RECOMPUTE_FROM_TOKENS
    if long and module.training and torch.is_grad_enabled() and kwargs.get("dropout", 0.0) > 0:
        inputs = (module, query, key, value, attention_mask)
        return checkpoint(sdpa_attention_forward, *inputs, use_reentrant=False, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECOMPUTED_ATTENTION, sdpa_recomputed_with_dropout)
AttentionMaskInterface.register(RECOMPUTED_ATTENTION, sdpa_mask)


def recompute_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """On a CPU, have a model whose SDPA attention has dropout recompute it in backward; returns whether it
    does."""
    base = _transformers_model(model)
    config = base.config
    dropout = getattr(config, "attn_pdrop", None) or getattr(config, "attention_dropout", None) or 0.0
    if device.type != "cpu" or config._attn_implementation != "sdpa" or not dropout > 0:
        return False
    base.set_attn_implementation(RECOMPUTED_ATTENTION)
    return True


def recomputes_attention(model: torch.nn.Module) -> bool:
    return _transformers_model(model).config._attn_implementation == RECOMPUTED_ATTENTION


def _transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside any wrapper (PEFT, DDP)."""
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))
