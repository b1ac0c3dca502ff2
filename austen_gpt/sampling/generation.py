"""Sampling from a model: batched `generate` calls with the KV cache, texts longer than the context window,
and a stop after a number of paragraphs.

Long texts slide a window: the model reads the whole prompt and writes until its context is full, then the
newest WINDOW_KEPT of the context is encoded again as the new start and the writing goes on. The new tokens
are only ever appended, so nothing is repeated or lost at a seam; what changes is how far back the model
sees: all of the text until it fills the context, then at least the newest 3/4 of a context (768 tokens for
GPT-2, 192 for configs/austen-tiny's 256) and at most a whole one. Only a prompt that leaves no room to write (as
long as the context) is read from its newest 3/4 at once, and `prompt_cut_note` says so. Each row keeps its
own window, so a row of a batch sees what it would see alone.

Every row (sample) draws its tokens with its own random generator, seeded from (seed, prompt, sample
number) by `row_seed`, so a sample does not depend on which rows share its calls, how many there are, or
their order: the number of rows per call may follow free GPU memory.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from austen_gpt.cli import UserError
from austen_gpt.data.tokens import paragraph_frame
from austen_gpt.settings import SamplingSettings


def sample_texts(model, tokenizer, prompts: list[str], settings, seed: int) -> list[str]:
    """One sample per prompt, in eval mode, with its own seed (training's random stream is untouched)."""

    model.eval()
    texts = [generate_paragraphs(model, tokenizer, p, 1, settings, seed + i)[0] for i, p in enumerate(prompts)]
    model.train()
    return texts


WINDOW_KEPT = 3 / 4  # of the context, kept in view when the window slides
MAX_ROWS_PER_CALL = 64  # samples in one generate call, fewer where memory is short


def model_positions(model) -> int:
    """The positions the architecture has (GPT-2's n_positions, others' max_position_embeddings)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def context_length(model) -> int:
    """The tokens a sample sees at most: the model's positions, or fewer where a run from random weights
    recorded the positions it trained (`trained_positions` in its config): past them the weights are noise."""
    trained = getattr(model.config, "trained_positions", None)
    return min(model_positions(model), trained or model_positions(model))


def window_note(model) -> str | None:
    """The line that says why samples see fewer tokens than the model's positions, where they do."""
    context, positions = context_length(model), model_positions(model)
    if context == positions:
        return None
    return (
        f"sampling window: {context} of the model's {positions} positions (trained from random weights on "
        f"examples of up to {context + 1} tokens, it never learned the positions from {context} on)"
    )


def window_tokens(context: int) -> int:
    """The tokens kept in view when the window slides (the model then writes context - this many more)."""
    return max(1, int(context * WINDOW_KEPT))


def first_window_start(prompt_tokens: int, context: int) -> int:
    """Where a row's first window starts in its prompt: at its start while the prompt leaves room for a new
    token, so the model reads all of it; else the window as it slides (the newest window_tokens of it)."""
    return 0 if prompt_tokens < context else prompt_tokens - window_tokens(context)


def prompt_cut_note(model, prompt_tokens: int) -> str | None:
    """The line that tells the caller the model cannot read the whole prompt (None where it can)."""
    context = context_length(model)
    if not first_window_start(prompt_tokens, context):
        return None
    return (
        f"the prompt is {prompt_tokens} tokens, the model's context {context}: it leaves no room to write, so "
        f"the model reads the prompt's last {window_tokens(context)} tokens (the sample still begins with all of it)"
    )


def tell_if_prompt_cut(model, prompt: list[int]) -> None:
    """Print prompt_cut_note's line (to stderr), where the model cannot read the whole prompt."""
    if note := prompt_cut_note(model, len(prompt)):
        print(note, file=sys.stderr)


class EndOfText:
    """Where paragraphs end in a row's new tokens: at each end-of-text token, as the training paragraphs do."""

    def __init__(self, eot: int):
        self.eot = eot

    def count(self, new: torch.Tensor) -> torch.Tensor:
        """Paragraph ends in each row of `new` (rows x tokens)."""
        return (new == self.eot).sum(dim=1)

    def positions(self, row: list[int]) -> list[int]:
        """The indices of the row's tokens that end a paragraph."""
        return [k for k, token in enumerate(row) if token == self.eot]


class Stop(StoppingCriteria):
    """Per row: done after `needed` more paragraph ends (None: never) or `limit` new tokens, or once
    `cancelled()` names it (a bool per row: a server's client that went away). `done_at` keeps, per row, how
    many new tokens it had when it was done (0: not yet): generate goes on drawing for it until every row is."""

    def __init__(self, start: int, ends: EndOfText, needed: list[int] | None, limit: list[int], device, cancelled=None):
        self.start, self.ends, self.cancelled = start, ends, cancelled
        self.needed = None if needed is None else torch.tensor(needed, device=device)
        self.limit = torch.tensor(limit, device=device)
        self.done_at = torch.zeros(len(limit), dtype=torch.long, device=device)  # on the device: no sync per step

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start :]
        done = self.limit <= new.shape[1]
        if self.needed is not None:
            done |= self.ends.count(new).to(done.device) >= self.needed
        if self.cancelled is not None:
            done |= torch.tensor(self.cancelled(), device=done.device)
        self.done_at = torch.where(done & (self.done_at == 0), new.shape[1], self.done_at)
        return done


class RowTokens(BaseStreamer):
    """Hands each row's new tokens to `on_token(row, token)` as generate draws them: not the call's input, nor
    what generate still draws for a row after it was done (Stop.done_at; generate may hand a step's tokens
    over before or after it asks Stop). `rows` are the call's rows' numbers."""

    def __init__(self, on_token: Callable[[int, int], None], rows: list[int], stop: Stop):
        self.on_token, self.rows, self.stop, self.step = on_token, rows, stop, -1

    def put(self, value: torch.Tensor) -> None:
        self.step += 1
        if self.step == 0:  # generate's first put is the input
            return
        done_at = self.stop.done_at.tolist()
        for row, token, done in zip(self.rows, value.tolist(), done_at, strict=True):
            if not done or self.step <= done:
                self.on_token(row, token)

    def end(self) -> None:
        pass


def row_seed(seed: int, prompt: Sequence[int], sample: int) -> int:
    """The seed of one sample's own random generator: the first 8 bytes (little-endian) of the SHA-256 of
    "seed/sample/prompt token ids", e.g. "7/0/0,464,318" for sample 0 of tokens [0, 464, 318] with seed 7.

    A hash rather than seed + offsets, so that no two samples share a stream (seed 1's sample 0 is not
    seed 0's sample 1), and the prompt's tokens rather than its place in a file, so that a sample depends
    on its own prompt only: the same prompt, sample number and seed give the same stream in any batch.
    """
    text = f"{seed}/{sample}/{','.join(map(str, prompt))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def sample_numbers(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Each row's sample number: how many earlier rows hold the same prompt (0, 1, ... for n copies of one)."""
    seen: dict[tuple[int, ...], int] = {}
    numbers = []
    for prompt in prompts:
        numbers.append(seen.get(tuple(prompt), 0))
        seen[tuple(prompt)] = numbers[-1] + 1
    return numbers


class RowStreams:
    """Every row's own uniform numbers in [0, 1) (float64), from a CPU torch.Generator seeded with its
    row_seed: the same numbers on any machine, whatever rows share its calls. A row's t-th new token is drawn
    with its t-th number, across all the windows of a long text."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def next(self, rows: list[int], count: int, device: torch.device) -> torch.Tensor:
        """The next `count` numbers of each of `rows`, a row of the result each; drawn on the CPU a window at a
        time (one small copy per call, not one per token)."""
        drawn = [torch.rand(count, generator=self.generators[i], dtype=torch.float64) for i in rows]
        return torch.stack(drawn).to(device)


def sampling_warpers(settings: SamplingSettings) -> list[LogitsProcessor]:
    """transformers' own temperature, top-k and top-p warpers, in the order its sampling applies them."""
    warpers: list[LogitsProcessor] = []
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(settings.temperature)))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(settings.top_p)))
    return warpers


def draw_tokens(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row (a column of token ids), the first token whose cumulative probability exceeds u * the total,
    u the row's number in `uniforms` (shape rows x 1): a token drawn by its probability, never one of
    probability 0. The cumulative sum is in float64, so that no token's share is lost to rounding."""
    cumulative = scores.double().softmax(dim=-1).cumsum(dim=-1)
    total = cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, uniforms * total, right=True)
    # u * total can round up to the total: then the last token of positive probability (the first to reach it)
    return torch.minimum(tokens, (cumulative < total).sum(dim=-1, keepdim=True))


class RowSampler(LogitsProcessor):
    """The last logits processor: temperature, top-k and top-p as transformers' sampling applies them, then
    each row's token drawn with the row's own next number (draw_tokens), returned as scores of 0 for that
    token and -inf for every other, so that generate's greedy pick (do_sample=False) takes it.

    `uniforms` holds this call's numbers, a row each, one per new token; `width` is the call's input width,
    so the number of a step is its column.
    """

    def __init__(self, settings: SamplingSettings, uniforms: torch.Tensor, width: int):
        self.warpers, self.uniforms, self.width = sampling_warpers(settings), uniforms, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        step = input_ids.shape[1] - self.width
        tokens = draw_tokens(scores, self.uniforms[:, step : step + 1])
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


class RepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty as transformers applies it (a seen token's score divided by `penalty` where
    positive, multiplied where negative), counting only the tokens `counted` keeps: not the special ones.

    transformers' RepetitionPenaltyLogitsProcessor counts every id in input_ids, and every prompt starts with
    the paragraph frame's end-of-text (GPT-2) or begin-of-text token: the penalty then made a paragraph's end
    less likely from the first token on, and paragraphs ran long.
    """

    def __init__(self, penalty: float, skipped_ids: Iterable[int]):
        self.penalty = penalty
        self.skipped = torch.tensor(sorted(set(skipped_ids)), dtype=torch.long)
        self.counted_from: torch.Tensor | None = None  # per row, the first position that counts (set per call)

    def counted(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Which positions of input_ids count as seen (a bool per position): not the special tokens, nor a
        row's positions before its `counted_from` (a few-shot prompt's excerpts and the user's prompt)."""
        self.skipped = self.skipped.to(input_ids.device)
        counted = ~torch.isin(input_ids, self.skipped)
        if self.counted_from is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            counted &= positions >= self.counted_from.to(input_ids.device)[:, None]
        return counted

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, self.counted(input_ids).to(scores.dtype))
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(counts > 0, penalised, scores)


@torch.no_grad()
def sample_ids(
    model,
    prompts: list[list[int]],
    settings: SamplingSettings,
    seed: int,
    eot: int,
    streamer=None,
    *,
    samples: list[int] | None = None,
    special_ids: Iterable[int] = (),
    penalise_prompt: bool = True,
    counted_prompt: list[int] | None = None,
    ends: EndOfText | None = None,
    seeds: list[int] | None = None,
    new_tokens: list[int] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """The new tokens after each prompt (token ids), all rows in one `generate` call per window.

    Each row stops after `settings.paragraphs` end-of-text tokens (the last one kept) or its
    `settings.new_tokens`, which may be more than the context holds (the window slides, see the module's
    doc). Rows of different lengths are padded on the left.

    A row's tokens are a function of its prompt, its sample number, `seed` and `settings` only (and of the
    model's numbers for its window): it draws with its own generator, seeded with row_seed(seed, prompt,
    sample number), and slides its window when its own window is full. `samples` gives the rows' sample
    numbers, by default sample_numbers(prompts) (0, 1, ... for n copies of one prompt). No other random
    stream is used or disturbed. The repetition penalty leaves out end-of-text and `special_ids`, and with
    `penalise_prompt=False` the prompts' own tokens (a few-shot prompt's excerpts must not be avoided).
    `counted_prompt`: the tokens of each prompt that `settings.max_length` counts (by default all but the
    start token; a few-shot prompt counts only the user's).
    `ends` finds the paragraph ends (by default EndOfText(eot); a chat model's answer has its own).
    `streamer` (one row only) is given every new token as it is drawn.
    For a server's batch of requests: `seeds`, each row's own seed (instead of `seed`); `new_tokens`, each
    row's own new-token count (instead of the settings'); `cancelled(row)`, true once the row is to stop where
    it is; `on_token(row, token)`, called with each row's every kept token as it is drawn.
    """
    context = context_length(model)
    keep = window_tokens(context)
    device = next(model.parameters()).device
    texts = [list(p) for p in prompts]
    samples = sample_numbers(prompts) if samples is None else samples
    seeds = seeds or [seed] * len(prompts)
    streams = RowStreams([row_seed(s, p, k) for s, p, k in zip(seeds, prompts, samples, strict=True)])
    starts = [first_window_start(len(t), context) for t in texts]  # each row's window, as it would be alone
    penalty = [RepetitionPenalty(settings.repetition_penalty, {eot, *special_ids})]
    penalty = penalty if settings.repetition_penalty != 1.0 else []
    new: list[list[int]] = [[] for _ in prompts]
    counted_prompt = counted_prompt or [len(p) - 1 for p in prompts]  # the start token is not the user's
    limits = new_tokens or [settings.new_tokens(n) for n in counted_prompt]
    needed = [settings.paragraphs] * len(prompts) if settings.paragraphs else None
    ends = ends or EndOfText(eot)
    active = list(range(len(prompts)))
    while active:
        windows = [texts[i][starts[i] :] for i in active]
        width = max(len(w) for w in windows)
        input_ids = torch.tensor([[eot] * (width - len(w)) + w for w in windows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(w)) + [1] * len(w) for w in windows], device=device)
        left = [limits[i] - len(new[i]) for i in active]
        steps = min(context - width, max(left))  # the call ends when the fullest window fills
        gone = (lambda rows=active: [cancelled(i) for i in rows]) if cancelled else None
        stop = Stop(width, ends, None if needed is None else [needed[i] for i in active], left, device, gone)
        watch = RowTokens(on_token, active, stop) if on_token else streamer
        draw = RowSampler(settings, streams.next(active, steps, device), width)
        if penalty and not penalise_prompt:  # a row's prompt ends at len(prompt) in its text, left-padded here
            firsts = [len(prompts[i]) - starts[i] + width - len(w) for i, w in zip(active, windows, strict=True)]
            penalty[0].counted_from = torch.tensor(firsts)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,  # RowSampler has drawn the token: the greedy pick takes it
            logits_processor=LogitsProcessorList([*penalty, draw]),
            repetition_penalty=1.0,  # RepetitionPenalty instead, or none (not a model's generation_config's)
            max_new_tokens=steps,
            eos_token_id=None,  # Stop ends rows, after `paragraphs` of them
            pad_token_id=eot,
            stopping_criteria=[stop],
            streamer=watch,
            cache_implementation="static" if settings.static_cache else None,
        )
        still = []
        for i, row in zip(active, out[:, width:].tolist(), strict=True):
            row = row[: limits[i] - len(new[i])]
            if needed is not None:
                found = ends.positions(row)
                row = row[: found[needed[i] - 1] + 1] if len(found) >= needed[i] else row
                needed[i] -= min(len(found), needed[i])
            new[i] += row
            texts[i] += row
            if len(new[i]) < limits[i] and (needed is None or needed[i] > 0) and not (cancelled and cancelled(i)):
                # It goes on, having kept every token of the call: its numbers stay in step with its tokens.
                still.append(i)
                if len(texts[i]) - starts[i] >= context:  # its own window is full: slide it
                    starts[i] = len(texts[i]) - keep
        active = still
    return new


def fresh_seed() -> int:
    """A seed for samples that should differ on every call, yet be reproducible from the record of it."""
    return secrets.randbits(31)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens after the token that starts every training paragraph (dataset.paragraph_frame),
    so that a sample starts as a new paragraph."""
    return [paragraph_frame(tokenizer)[0], *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def special_token_ids(tokenizer) -> list[int]:
    """The tokenizer's special tokens and the paragraph frame's: the repetition penalty leaves them alone."""
    return sorted({*tokenizer.all_special_ids, *paragraph_frame(tokenizer)})


def as_text(tokenizer, ids: list[int]) -> str:
    """Tokens as text, each end-of-text a paragraph break."""
    text = tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.eos_token, "\n\n")
    if tokenizer.bos_token and tokenizer.bos_token != tokenizer.eos_token:
        text = text.replace(tokenizer.bos_token, "")
    return text.strip()


def generate_paragraphs(
    model, tokenizer, prompt: str, n: int, settings: SamplingSettings, seed: int | None, streamer=None
) -> list[str]:
    """`n` continuations of `prompt` as text, the prompt included, from one batched call per window (sample k
    is the prompt's sample k wherever it is drawn, see sample_ids); with `seed=None` they differ on every call."""
    ids = prompt_ids(tokenizer, prompt)
    tell_if_prompt_cut(model, ids)
    seed = fresh_seed() if seed is None else seed
    eot, special = paragraph_frame(tokenizer)[1], special_token_ids(tokenizer)
    rows = sample_ids(model, [ids] * n, settings, seed, eot, streamer, special_ids=special)
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
    """`n` continuations (the prompt included) of every prompt, in calls of up to rows_per_call samples.

    Sample k of a prompt is drawn with row_seed(seed, its tokens, k) whatever shares its call (sample_ids),
    so the same prompts, settings and seed give the same samples whatever a card's free memory (where the
    model computes in fp32, up to rounding-level near-ties; docs/inference.md says why bf16 can differ); the
    same prompt twice gives the same samples twice. The rows are grouped by prompt length, so that rows whose
    windows fill together share calls (less padding, and fewer calls past the context).
    """
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    for ids in encoded:
        tell_if_prompt_cut(model, ids)
    rows = sorted(((i, k) for i in range(len(prompts)) for k in range(n)), key=lambda row: len(encoded[row[0]]))
    size, eot, special = rows_per_call(model), paragraph_frame(tokenizer)[1], special_token_ids(tokenizer)
    texts: dict[tuple[int, int], str] = {}
    for first in range(0, len(rows), size):
        batch = rows[first : first + size]
        ids = [encoded[i] for i, _ in batch]
        new = sample_ids(model, ids, settings, seed, eot, samples=[k for _, k in batch], special_ids=special)
        texts.update({row: as_text(tokenizer, p[1:] + t) for row, p, t in zip(batch, ids, new, strict=True)})
    return [[texts[i, k] for k in range(n)] for i in range(len(prompts))]


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

    The text is the continuation only, paragraph breaks (end-of-text) written as blank lines. Sample i is
    its prompt's sample i // len(prompts), drawn as sample_ids says, so the same seed gives the same samples.
    """
    eot, special = paragraph_frame(tokenizer)[1], special_token_ids(tokenizer)
    samples = []
    for i, prompt in enumerate(prompts[:n]):
        ids = prompt_ids(tokenizer, prompt)
        for row in sample_ids(model, [ids] * len(range(i, n, len(prompts))), settings, seed, eot, special_ids=special):
            samples.append({"prompt": prompt, "text": as_text(tokenizer, row)})
    return samples


class TextStream(TextStreamer):
    """Prints one sample's new tokens as they are drawn, to `out`, end-of-text as a paragraph break, across
    the windows of a long text (each window's re-encoded start is skipped, not printed again). A chat model's
    answer (`chat`) is printed without its special tokens: its end of turn is no paragraph break."""

    def __init__(self, tokenizer, out, chat: bool = False):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=chat)
        self.out, self.eos = out, tokenizer.eos_token

    def end(self) -> None:  # a window ends: the next call's input is its re-encoded start, not new text
        self.next_tokens_are_prompt = True

    def finish(self) -> None:
        """Flush what is held back (a word may still be growing) and end the line."""
        super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text.replace(self.eos, "\n\n") + ("\n" if stream_end else ""))
        self.out.flush()
