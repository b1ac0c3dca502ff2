"""Sampling paragraphs from a model: one prompt, n samples, one batched `generate` call with the KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError
from dataset import paragraph_frame


@dataclass
class SamplingSettings:
    max_length: int = 300  # prompt + generated tokens, as the seed's --max_length
    max_new_tokens: int | None = None  # overrides max_length when given
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    stop_at_end_of_text: bool = True  # False: write on into the next paragraph, for fixed-length samples


def context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def generate_paragraphs(
    model, tokenizer, prompt: str, n: int, settings: SamplingSettings, seed: int | None
) -> list[str]:
    """`n` continuations of `prompt` as text, the prompt included (see generate_ids)."""
    return tokenizer.batch_decode(
        generate_ids(model, tokenizer, prompt, n, settings, seed)[:, 1:], skip_special_tokens=True
    )


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, n: int, settings: SamplingSettings, seed: int | None) -> torch.Tensor:
    """`n` continuations of `prompt`, each starting a new paragraph and stopping at end-of-text.

    Returns the token ids, `<start> prompt continuation`, rows padded with end-of-text after it. The
    prompt is preceded by the token that starts every training paragraph (dataset.paragraph_frame). The
    torch RNG is forked, so sampling neither depends on nor disturbs the training run's random stream;
    with `seed=None` the samples differ on every call.
    """
    start, eot = paragraph_frame(tokenizer)
    prompt_ids = [start, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
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
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            max_new_tokens=new_tokens,
            top_k=settings.top_k,
            top_p=settings.top_p,
            temperature=settings.temperature,
            repetition_penalty=settings.repetition_penalty,
            num_return_sequences=n,
            eos_token_id=eot if settings.stop_at_end_of_text else None,
            pad_token_id=eot,
        )


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt; write one prompt per line")
    return prompts


def generate_samples(
    model, tokenizer, prompts: list[str], n: int, settings: SamplingSettings, seed: int
) -> list[dict[str, str]]:
    """`n` samples {prompt, text}, sample i continuing prompt i % len(prompts); one batched call per prompt.

    The text is the continuation only, paragraph breaks (end-of-text) written as blank lines. Prompt i
    samples with seed + i, so the same seed gives the same samples.
    """
    samples = []
    for i, prompt in enumerate(prompts[:n]):
        ids = generate_ids(model, tokenizer, prompt, len(range(i, n, len(prompts))), settings, seed + i)
        start = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for row in ids[:, start:]:
            text = tokenizer.decode(row, skip_special_tokens=False).replace(tokenizer.eos_token, "\n\n")
            if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token:
                text = text.replace(tokenizer.bos_token, "")
            samples.append({"prompt": prompt, "text": text.strip()})
    return samples
