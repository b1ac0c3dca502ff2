"""Sampling from a model: batched `generate` calls with the KV cache, texts longer than the context window,
and a stop after a number of paragraphs.

Long texts slide a window: the model writes until its context is full, then the newest WINDOW_KEPT of the
context is encoded again as the new start and the writing goes on. The new tokens are only ever appended,
so nothing is repeated or lost at a seam; what changes is how far back the model sees: all of the text
until it fills the context, then at least the newest 3/4 of a context (768 tokens for GPT-2, 192 for the
quickstart's 256) and at most a whole one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import StoppingCriteria, TextStreamer

from cli import UserError
from dataset import paragraph_frame

WINDOW_KEPT = 3 / 4  # of the context, kept in view when the window slides
MAX_ROWS_PER_CALL = 64  # samples in one generate call, fewer where memory is short


@dataclass
class SamplingSettings:
    max_length: int = 300  # prompt + generated tokens, as the seed's --max_length
    max_new_tokens: int | None = None  # overrides max_length when given
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    paragraphs: int | None = 1  # stop after this many end-of-text tokens; None: write on to the full length
    static_cache: bool = False  # a preallocated KV cache, which transformers compiles on CUDA

    def new_tokens(self, prompt_tokens: int) -> int:
        return max(self.max_new_tokens or self.max_length - prompt_tokens, 1)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def window_tokens(context: int) -> int:
    """The tokens kept in view when the window slides (the model then writes context - this many more)."""
    return max(1, int(context * WINDOW_KEPT))


class Stop(StoppingCriteria):
    """Per row: done after `needed` more end-of-text tokens (None: never) or `limit` new tokens."""

    def __init__(self, start: int, eot: int, needed: list[int] | None, limit: list[int], device):
        self.start, self.eot = start, eot
        self.needed = None if needed is None else torch.tensor(needed, device=device)
        self.limit = torch.tensor(limit, device=device)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start :]
        done = self.limit <= new.shape[1]
        if self.needed is not None:
            done |= (new == self.eot).sum(dim=1) >= self.needed
        return done


@torch.no_grad()
def sample_ids(
    model, prompts: list[list[int]], settings: SamplingSettings, seed: int, eot: int, streamer=None
) -> list[list[int]]:
    """The new tokens after each prompt (token ids), all rows in one `generate` call per window.

    Each row stops after `settings.paragraphs` end-of-text tokens (the last one kept) or its
    `settings.new_tokens`, which may be more than the context holds (the window slides, see the module's
    doc). Rows of different lengths are padded on the left. The torch RNG is forked and seeded with `seed`,
    so sampling neither depends on nor disturbs any other random stream. `streamer` (one row only) is
    given every new token as it is drawn.
    """
    context = context_length(model)
    keep = window_tokens(context)
    device = next(model.parameters()).device
    texts = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    limits = [settings.new_tokens(len(p) - 1) for p in prompts]  # the start token is not the user's
    needed = [settings.paragraphs] * len(prompts) if settings.paragraphs else None
    active = list(range(len(prompts)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        while active:
            windows = [texts[i][-keep:] for i in active]
            width = max(len(w) for w in windows)
            input_ids = torch.tensor([[eot] * (width - len(w)) + w for w in windows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(w)) + [1] * len(w) for w in windows], device=device)
            left = [limits[i] - len(new[i]) for i in active]
            stop = Stop(width, eot, None if needed is None else [needed[i] for i in active], left, device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                max_new_tokens=min(context - width, max(left)),
                top_k=settings.top_k,
                top_p=settings.top_p,
                temperature=settings.temperature,
                repetition_penalty=settings.repetition_penalty,
                eos_token_id=None,  # Stop ends rows, after `paragraphs` of them
                pad_token_id=eot,
                stopping_criteria=[stop],
                streamer=streamer,
                cache_implementation="static" if settings.static_cache else None,
            )
            still = []
            for i, row in zip(active, out[:, width:].tolist(), strict=True):
                row = row[: limits[i] - len(new[i])]
                if needed is not None:
                    ends = [k for k, token in enumerate(row) if token == eot]
                    row = row[: ends[needed[i] - 1] + 1] if len(ends) >= needed[i] else row
                    needed[i] -= min(len(ends), needed[i])
                new[i] += row
                texts[i] += row
                if len(new[i]) < limits[i] and (needed is None or needed[i] > 0):
                    still.append(i)
            active = still
    return new


def fresh_seed() -> int:
    """A seed for samples that should differ on every call, yet be reproducible from the record of it."""
    return secrets.randbits(31)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens after the token that starts every training paragraph (dataset.paragraph_frame),
    so that a sample starts as a new paragraph."""
    return [paragraph_frame(tokenizer)[0], *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def as_text(tokenizer, ids: list[int]) -> str:
    """Tokens as text, each end-of-text a paragraph break."""
    text = tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.eos_token, "\n\n")
    if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token:
        text = text.replace(tokenizer.bos_token, "")
    return text.strip()


def generate_paragraphs(
    model, tokenizer, prompt: str, n: int, settings: SamplingSettings, seed: int | None, streamer=None
) -> list[str]:
    """`n` continuations of `prompt` as text, the prompt included, from one batched call per window; with
    `seed=None` they differ on every call."""
    ids = prompt_ids(tokenizer, prompt)
    seed = fresh_seed() if seed is None else seed
    rows = sample_ids(model, [ids] * n, settings, seed, paragraph_frame(tokenizer)[1], streamer)
    return [as_text(tokenizer, ids[1:] + row) for row in rows]


def rows_per_call(model) -> int:
    """Samples per generate call: MAX_ROWS_PER_CALL, or fewer where half the free GPU memory cannot hold
    their KV caches (a whole context each)."""
    if next(model.parameters()).device.type != "cuda":
        return MAX_ROWS_PER_CALL
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    width = getattr(config, "hidden_size", None) or config.n_embd
    bytes_per_row = 2 * layers * context_length(model) * width * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(MAX_ROWS_PER_CALL, free // 2 // bytes_per_row))


def sample_prompts(
    model, tokenizer, prompts: list[str], n: int, settings: SamplingSettings, seed: int
) -> list[list[str]]:
    """`n` continuations (the prompt included) of every prompt, in calls of up to rows_per_call samples;
    call k seeds with seed + k, so the same prompts, settings and seed give the same samples."""
    rows = [(p, prompt_ids(tokenizer, p)) for p in prompts for _ in range(n)]
    size, eot = rows_per_call(model), paragraph_frame(tokenizer)[1]
    texts = []
    for call, first in enumerate(range(0, len(rows), size)):
        batch = rows[first : first + size]
        new = sample_ids(model, [ids for _, ids in batch], settings, seed + call, eot)
        texts += [as_text(tokenizer, ids[1:] + row) for (_, ids), row in zip(batch, new, strict=True)]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def read_prompts(path: str | Path, flag: str = "--prompts") -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text; give a text file with one prompt per line") from None
    except OSError as error:
        raise UserError(f"{flag} {path} cannot be read ({error.strerror}); give a readable text file") from None
    prompts = [line.strip() for line in lines]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"{flag} {path} holds no prompt; write one prompt per line")
    return prompts


def generate_samples(
    model, tokenizer, prompts: list[str], n: int, settings: SamplingSettings, seed: int
) -> list[dict[str, str]]:
    """`n` samples {prompt, text}, sample i continuing prompt i % len(prompts); one batched call per prompt.

    The text is the continuation only, paragraph breaks (end-of-text) written as blank lines. Prompt i
    samples with seed + i, so the same seed gives the same samples.
    """
    eot = paragraph_frame(tokenizer)[1]
    samples = []
    for i, prompt in enumerate(prompts[:n]):
        ids = prompt_ids(tokenizer, prompt)
        for row in sample_ids(model, [ids] * len(range(i, n, len(prompts))), settings, seed + i, eot):
            samples.append({"prompt": prompt, "text": as_text(tokenizer, row)})
    return samples


class TextStream(TextStreamer):
    """Prints one sample's new tokens as they are drawn, to `out`, end-of-text as a paragraph break, across
    the windows of a long text (each window's re-encoded start is skipped, not printed again)."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
        self.out, self.eos = out, tokenizer.eos_token

    def end(self) -> None:  # a window ends: the next call's input is its re-encoded start, not new text
        self.next_tokens_are_prompt = True

    def finish(self) -> None:
        """Flush what is held back (a word may still be growing) and end the line."""
        super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text.replace(self.eos, "\n\n") + ("\n" if stream_end else ""))
        self.out.flush()
