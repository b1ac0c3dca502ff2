"""A model ready to sample: a model folder, or an adapter folder on its base model, on the best device."""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from austen_gpt.cli import UserError, flag_name
from austen_gpt.models import lora
from austen_gpt.models.device import compute_dtype, default_device, resolve_precision
from austen_gpt.models.loading import load_model
from austen_gpt.models.saving import run_settings
from austen_gpt.sampling.generation import window_note
from austen_gpt.settings import SamplingSettings

RUN_SAMPLING = ("top_k", "top_p")  # what train.py records of how its model samples (its samples during training)

# ----------------------------------------------------------------------------------------------
# A model to sample from


def load_for_sampling(path: str, base_model: str | None = None, load_in_4bit: bool = False):
    """A full model (folder or Hub id), or an adapter folder on its base model, on the default device in
    eval mode; `load_in_4bit` quantizes the (base) model to 4-bit NF4."""

    device = default_device()
    # On a CPU, fp32 whatever the checkpoint's dtype (the shipped base is bf16): most CPUs emulate bf16 slowly, and
    # every number then means the same on every machine. On a GPU, the checkpoint's own dtype (transformers' default).
    kwargs = {"dtype": torch.float32} if device.type == "cpu" else {}
    if load_in_4bit:
        lora.require_bitsandbytes(device, "--load-in-4bit")
        config = lora.quantization_config(4, compute_dtype(resolve_precision("auto")))
        kwargs = {"quantization_config": config, "device_map": {"": device}}
    if lora.is_adapter_folder(path):
        base = base_model or lora.adapter_base_model(path)
        try:
            model = load_model(base, **kwargs)
        except UserError as err:
            raise UserError(f"the adapters in {path} need their base model: {err}; or pass --base-model") from None
        model = lora.load_lora(model, path, quantized=load_in_4bit, trainable=False)
    else:
        model = load_model(path, **kwargs)
    if note := window_note(model):
        print(note, file=sys.stderr)
    return (model if load_in_4bit else model.to(device)).eval()


def sampling_of_run(path: str, settings: SamplingSettings, given: set[str]) -> tuple[SamplingSettings, str]:
    """`settings` with the sampling settings not `given` on the command line taken from the run that trained the
    model in `path`, as train.py records them; and a line that says where they come from."""
    recorded = run_settings(path) or {}
    taken = {key: recorded[key] for key in RUN_SAMPLING if key in recorded and key not in given}
    if not recorded:
        return (
            settings,
            f"settings: from the flags ({path} records no run of this project's: a Hub model or an older one)",
        )
    settings = replace(settings, **taken)
    spelled = " ".join(f"{flag_name(key)} {getattr(settings, key)}" for key in RUN_SAMPLING)
    return settings, f"settings: {spelled} as the run that trained {path} sampled (flags given here override them)"
