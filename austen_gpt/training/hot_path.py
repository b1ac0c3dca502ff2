"""How a training step runs on each device and precision: one table, recorded in every checkpoint.

The lean layers (models/lean_layers.py) compute the model's own function with less kept for backward; some
of them pay only on some devices, or from some length on. Those choices come from DEVICE_TABLE, measured
side by side with bench.py (docs/training.md#where-the-lean-layers-pay). A run records the row it started
with in its checkpoints, and a resumed run takes that row, not the table's, so that code with a new table
resumes an old run bitwise as it would have gone on. The chunked loss and the fused GELU are flags
(--chunked-loss, --fused-activations), on by default everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from austen_gpt.models import chunked_loss, lean_layers, lora
from austen_gpt.models.chunked_loss import CHUNK_TOKENS, chunked_head, uses_fused_kernel
from austen_gpt.models.device import reuse_freed_memory
from austen_gpt.models.lean_layers import draws_masks, fused_activations, recomputes_attention
from austen_gpt.training.settings import OptimizationSettings


@dataclass(frozen=True)
class DeviceChoices:
    """The step's choices that depend on the device and precision."""

    recompute_attention_from_tokens: int = 0  # attention with dropout recomputed in backward from this length; 0: never
    drawn_masks: bool = False  # dropout masks from random bits, attention with dropout written out
    reuse_freed_memory_below_tokens: int = 0  # shorter sequences: the C library keeps freed memory for reuse; 0: never


# bench.py at 8 x 100 and 8 x 512 (docs/benchmarks.md). On GPUs nothing: PyTorch's fused attention takes dropout
# and keeps no scores, its masks come from the same kernel, and the CUDA caching allocator reuses memory.
DEVICE_TABLE: dict[tuple[str, torch.dtype], DeviceChoices] = {
    ("cpu", torch.float32): DeviceChoices(256, drawn_masks=False, reuse_freed_memory_below_tokens=256),
    ("cpu", torch.bfloat16): DeviceChoices(256, drawn_masks=True, reuse_freed_memory_below_tokens=256),
}


def device_choices(device: torch.device, compute: torch.dtype, recorded: dict[str, Any] | None) -> DeviceChoices:
    """The run's choices: those `recorded` in the checkpoint it resumes, else the table's for this device."""
    if recorded is not None:
        known = {f.name for f in fields(DeviceChoices)}
        return DeviceChoices(**{key: value for key, value in recorded.items() if key in known})
    return DEVICE_TABLE.get((device.type, compute), DeviceChoices())


def record(choices: DeviceChoices) -> dict[str, Any]:
    return asdict(choices)


def install_lean_layers(
    model, opt: OptimizationSettings, choices: DeviceChoices, compute: torch.dtype, max_tokens: int, sharded: bool
) -> None:
    """The chunked loss and fused GELU as asked, the device's choices for sequences of up to `max_tokens`
    tokens, and a frozen base (LoRA) stored in the `compute` dtype, where they apply."""
    if compute != torch.float32 and not sharded:  # (FSDP flattens, DeepSpeed casts, the weights their own way)
        lora.frozen_matmul_weights_in(model, compute)
    if opt.chunked_loss and not sharded:  # FSDP and DeepSpeed shard the output layer's weight
        chunked_loss.install(model)
    if opt.fused_activations:
        lean_layers.fuse_activations(model)
    recompute = choices.recompute_attention_from_tokens > 0
    if recompute and not (opt.gradient_checkpointing or sharded):  # (they recompute, or wrap, the whole block)
        lean_layers.recompute_attention(model, choices.recompute_attention_from_tokens)
    if choices.drawn_masks:
        lean_layers.draw_masks(model)
    if max_tokens < choices.reuse_freed_memory_below_tokens:  # longer: it holds on to more memory at the peak
        reuse_freed_memory()


def describe(model, device: torch.device, compute: torch.dtype) -> str:
    """How the output layer, the loss, the activations and attention run."""
    if not chunked_head(model):
        loss = "the model's own output layer and a whole-batch loss"
    elif uses_fused_kernel(device, compute):
        loss = "output layer and loss in Cut Cross-Entropy's kernel"
    else:
        loss = f"output layer and loss in chunks of {CHUNK_TOKENS:,} tokens"
    fused, drawn = fused_activations(model), draws_masks(model)
    loss += f", {fused} activations in PyTorch's fused GELU" if fused else ""
    loss += ", attention with dropout recomputed in backward" if recomputes_attention(model) else ""
    return loss + (f", {drawn} dropout layers' masks from random bits" if drawn else "")
