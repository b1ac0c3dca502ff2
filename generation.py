"""Sampling paragraphs from a model: one prompt, n samples, one batched `generate` call with the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cli import UserError


@dataclass
class SamplingSettings:
    max_length: int = 300  # prompt + generated tokens, as the seed's --max_length
    max_new_tokens: int | None = None  # overrides max_length when given
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    repetition_penalty: float = 1.0


def context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


@torch.no_grad()
def generate_paragraphs(
    model, tokenizer, prompt: str, n: int, settings: SamplingSettings, seed: int | None
) -> list[str]:
    """`n` continuations of `prompt`, each starting a new paragraph and stopping at end-of-text.

    The prompt is preceded by end-of-text, exactly as every training paragraph is. The torch RNG
    is forked, so sampling neither depends on nor disturbs the training run's random stream; with
    `seed=None` the samples differ on every call.
    """
    eot = tokenizer.eos_token_id
    prompt_ids = [eot, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    room = context_length(model) - len(prompt_ids)
    if room < 1:
        raise UserError(f"the prompt fills the model's whole {context_length(model)}-token context; shorten it")
    wanted = settings.max_new_tokens or settings.max_length - (len(prompt_ids) - 1)
    new_tokens = min(max(wanted, 1), room)  # a model cannot see past its context

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed if seed is not None else torch.seed())
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            max_new_tokens=new_tokens,
            top_k=settings.top_k,
            top_p=settings.top_p,
            temperature=settings.temperature,
            repetition_penalty=settings.repetition_penalty,
            num_return_sequences=n,
            eos_token_id=eot,
            pad_token_id=eot,
        )
    return tokenizer.batch_decode(output[:, 1:], skip_special_tokens=True)
