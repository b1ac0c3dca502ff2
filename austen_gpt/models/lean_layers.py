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
  the result is bitwise the same. Only from a length on (256 tokens on a CPU: austen_gpt/training/hot_path.py):
  the scores grow with the square of the length, and at 100 tokens they are small while drawing the dropout
  masks again costs about 8% of a step. On a GPU the fused kernels take dropout and keep no scores.
* Dropout masks from random bits, on a CPU in bf16. `bernoulli_`, which nn.Dropout and the attention kernel
  use, draws one random number per element (about 6 ns each on a CPU): at 8 x 512 tokens GPT-2's attention
  masks alone are 300 million elements a step, a fifth of the step. Here one 64-bit random word gives four
  16-bit lanes, each kept where it is at or above the dropout rate's threshold: 5x cheaper. The rate is
  rounded to 1/65,536 (0.1 becomes 0.100006) and the kept values scaled by the exact inverse of the kept
  share, so the expectation is unchanged. The attention with dropout is then written out (PyTorch's CPU
  attention takes no mask), in bf16 where PyTorch's would compute in fp32. Under fp32 the model's own
  dropout runs, so an fp32 run is bitwise as before.

docs/benchmarks.md has the side-by-side numbers. The config saved with the model is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SAME_AS_TANH_GELU = (NewGELUActivation, FastGELUActivation)
RECOMPUTED_ATTENTION = "sdpa_recomputed_with_dropout"
RECOMPUTE_FROM = "recompute_attention_from_tokens"  # set by recompute_attention() on every module of the model


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
    than kept, and with masks drawn from random bits where the model's dropout layers are (draws_masks).
    (Query: batch x heads x tokens x head size.)"""
    attention = sdpa_attention_forward
    dropout = kwargs.get("dropout", 0.0)
    if module.training and dropout > 0 and getattr(module, DRAWS_MASKS, False) and _plain(kwargs):
        attention = attention_with_drawn_dropout
    long = query.shape[2] >= getattr(module, RECOMPUTE_FROM, math.inf)
    if long and module.training and torch.is_grad_enabled() and dropout > 0:
        inputs = (module, query, key, value, attention_mask)
        return checkpoint(attention, *inputs, use_reentrant=False, **kwargs)
    return attention(module, query, key, value, attention_mask, **kwargs)


def _plain(kwargs: dict) -> bool:
    """Attention without the extras only transformers' own functions implement (soft-capping, position bias)."""
    return kwargs.get("softcap") is None and kwargs.get("position_bias") is None


# ---- dropout masks from random bits ----------------------------------------------------------------------

DRAWS_MASKS = "draws_dropout_masks"  # set by draw_masks() on every module of the model
LANES = 2**16  # a mask element is one 16-bit lane of a random 64-bit word


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(where dropout at rate `p` keeps an element, the scale of the kept ones): each element kept with
    probability 1 - p rounded to 1/65,536, and scaled by the exact inverse of that."""
    dropped = round(p * LANES)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.int16)[:n].view(shape) >= dropped - LANES // 2
    return keep, LANES / (LANES - dropped)


class MaskedScale(torch.autograd.Function):
    """x x scale x keep, keeping only the boolean mask for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, ctx.scale).mul_(keep), None, None


def drawn_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout at rate `p` in training, its mask from random bits."""
    keep, scale = keep_mask(x.shape, p, x.device)
    return MaskedScale.apply(x, keep, scale)


class DrawnDropout(torch.nn.Dropout):
    """nn.Dropout with its mask from random bits (still an nn.Dropout: setting the rate works as before)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drawn_dropout(x, self.p) if self.training and self.p > 0 else x


def attention_with_drawn_dropout(
    module, query, key, value, attention_mask, dropout: float, scaling: float | None = None, is_causal=None, **_
):
    """What PyTorch's attention computes with dropout, written out: softmax(q k^T x scale + mask) with dropout,
    times v; all in the inputs' dtype (the softmax kernel computes in fp32 and rounds once: the probabilities
    are what the bf16 matmul with v would read). Returns transformers' (output, None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, k_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    elif attention_mask is not None:
        scores = scores + attention_mask
    elif is_causal and q_length > 1:
        later = torch.ones(q_length, k_length, dtype=torch.bool, device=query.device).triu_(k_length - q_length + 1)
        scores = scores.masked_fill(later, float("-inf"))
    output = torch.matmul(drawn_dropout(torch.softmax(scores, dim=-1), dropout), value)
    return output.transpose(1, 2).contiguous(), None


def draw_masks(model: torch.nn.Module) -> int:
    """Have the model's dropout layers (not adapters') and its attention dropout draw their masks from random
    bits; returns how many layers do."""
    swaps = [
        (parent, name, child)
        for parent_name, parent in model.named_modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout and "lora_dropout" not in parent_name
    ]
    for parent, name, child in swaps:
        setattr(parent, name, DrawnDropout(child.p))
    for module in model.modules():  # the attention function reads it from the module that calls it
        setattr(module, DRAWS_MASKS, True)
    return len(swaps)


def draws_masks(model: torch.nn.Module) -> int:
    """How many of the model's dropout layers draw their masks from random bits."""
    return sum(type(module) is DrawnDropout for module in model.modules())


AttentionInterface.register(RECOMPUTED_ATTENTION, sdpa_recomputed_with_dropout)
AttentionMaskInterface.register(RECOMPUTED_ATTENTION, sdpa_mask)


def recompute_attention(model: torch.nn.Module, from_tokens: int) -> bool:
    """Have a model whose SDPA attention has dropout recompute it in backward on sequences of `from_tokens`
    tokens or more; returns whether it does."""
    base = _transformers_model(model)
    config = base.config
    dropout = getattr(config, "attn_pdrop", None) or getattr(config, "attention_dropout", None) or 0.0
    if config._attn_implementation != "sdpa" or not dropout > 0:
        return False
    base.set_attn_implementation(RECOMPUTED_ATTENTION)
    for module in model.modules():  # the attention function reads it from the module that calls it
        setattr(module, RECOMPUTE_FROM, from_tokens)
    return True


def recomputes_attention(model: torch.nn.Module) -> bool:
    return _transformers_model(model).config._attn_implementation == RECOMPUTED_ATTENTION


def _transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside any wrapper (PEFT, DDP)."""
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))
