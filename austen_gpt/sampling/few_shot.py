"""Few-shot prompting: the author's own excerpts placed in the prompt of a base or a chat model.

The original project's other way to get an author's style, measured beside the fine-tune. A prompt is built
from K excerpts of the training split (never the validation split, which stays for scoring) and the user's
prompt:

* A base model gets the excerpts as plain paragraphs separated by blank lines, then the prompt: the classic
  few-shot continuation.
* A chat model (its tokenizer has a chat template) gets the template: a system message and a user message
  carry the instruction and the excerpts, and the user's prompt starts the assistant's turn, so the model
  continues the prose rather than answering it ("Sure! Here is..." is never scored as style).

The excerpts share the context fairly: what the context has left after the template, the prompt and the new
tokens is split equally among the K excerpts, and each is cut at a sentence end within its share. Passages are
drawn uniformly, whatever their length, so the excerpts show the author as her paragraphs are.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import torch

from austen_gpt.cli import UserError
from austen_gpt.settings import DEFAULT_DATA

MIN_SHARE = 32  # tokens: an excerpt shorter than this shows little of a style
STAND_IN = "word"  # an excerpt's place while the fixed part of a prompt is counted
DEFAULT_AUTHOR = "Jane Austen"  # of the bundled data
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # ChatML, Llama 3, Gemma, Phi
TITLES = ("Mr", "Mrs", "Dr", "St", "Ms", "Col", "Capt", "Lt", "Gen", "Rev")  # a full stop that ends no sentence
SENTENCE_END = re.compile("".join(rf"(?<!\b{title}\.)" for title in TITLES) + r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")


def default_instruction(author: str) -> str:
    return (
        f"You are a novelist writing in the style of {author}. Continue the passage you are given as {author} "
        "would, in her or his own voice, vocabulary and rhythm. Write only the continuation."
    )


@dataclass(frozen=True)
class FewShotPrompt:
    """A built prompt: its text (a chat template's rendering or plain paragraphs), the indices of the excerpts'
    passages in the training split, and the excerpts as placed."""

    text: str
    passages: list[int]
    excerpts: list[str]


def chat_instruction(tokenizer, author: str | None, instruction: str | None, data: str) -> str | None:
    """A chat model's instruction: `instruction`, else the default one naming `author` (Jane Austen where the
    excerpts come from the bundled data); None for a base model, which gets no instruction. Refuses a chat model
    with neither an author nor the bundled data as `data`: whose style would it be asked for?"""
    if not has_chat_template(tokenizer):
        return None
    author = author or (DEFAULT_AUTHOR if str(data) == str(DEFAULT_DATA) else None)
    if not (instruction or author):
        raise UserError(
            f"--few-shot on a chat model needs --author: whose style to ask for ({data} is not Jane Austen's)"
        )
    return instruction or default_instruction(author)


def has_chat_template(tokenizer) -> bool:
    """A chat model's tokenizer: it has a chat template (a base model's has none)."""
    return getattr(tokenizer, "chat_template", None) is not None


def choose_passages(n_passages: int, k: int, seed: int) -> list[int]:
    """K distinct passage indices, each passage equally likely (seeded): short and long alike."""
    if k < 0:
        raise UserError(f"--few-shot {k}: the number of excerpts must be 0 or more")
    if k > n_passages:
        raise UserError(f"--few-shot {k}: the training split has only {n_passages} passages; ask for fewer")
    return random.Random(seed).sample(range(n_passages), k)


def sentences(text: str) -> list[str]:
    """The text's sentences, each with the space that follows it."""
    pieces, start = [], 0
    for end in SENTENCE_END.finditer(text):
        pieces.append(text[start : end.end()])
        start = end.end()
    return pieces + ([text[start:]] if text[start:] else [])


def cut_to_share(count_tokens, passage: str, share: int) -> str:
    """A run of the passage's whole sentences within `share` tokens: from its first sentence that fits on, as
    many as fit. Where no sentence of it fits, its longest run of whole words from the start that does."""
    parts = sentences(passage)
    for first in range(len(parts)):
        kept = ""
        for sentence in parts[first:]:
            if count_tokens((kept + sentence).rstrip()) > share:
                break
            kept += sentence
        if kept:
            return kept.rstrip()
    words = passage.split(" ")
    fit, too_many = 1, len(words) + 1  # a prefix's tokens grow with its words: halve the range between these
    while too_many - fit > 1:
        middle = (fit + too_many) // 2
        fit, too_many = (middle, too_many) if count_tokens(" ".join(words[:middle])) <= share else (fit, middle)
    return " ".join(words[:fit])


def excerpt_share(context: int, fixed_tokens: int, new_tokens: int, k: int) -> int:
    """Tokens each of K excerpts may take: what the context leaves after the template, the prompt
    (`fixed_tokens`) and the new tokens, shared equally. Refuses a share under MIN_SHARE, naming the largest
    K that fits or the new-token count that would."""
    left = context - fixed_tokens - new_tokens
    share = left // k if k else left
    if k and share < MIN_SHARE:
        fits = max(0, left // MIN_SHARE)
        fewer_new = context - fixed_tokens - k * MIN_SHARE
        ways = [f"--few-shot {fits} or fewer"] if fits else []
        ways += [f"--max-new-tokens {fewer_new} or fewer"] if fewer_new >= 1 else []
        raise UserError(
            f"--few-shot {k} with {new_tokens} new tokens leaves each excerpt {max(share, 0)} of the model's "
            f"{context} context tokens, under {MIN_SHARE}; " + (" or ".join(ways) if ways else "shorten the prompt")
        )
    return share


def base_model_text(excerpts: list[str], prompt: str) -> str:
    """Plain paragraphs separated by blank lines, then the prompt."""
    return "\n\n".join([*excerpts, prompt])


def chat_messages(excerpts: list[str], prompt: str, instruction: str) -> list[dict[str, str]]:
    """System: the instruction; user: the instruction and the excerpts; assistant: the prompt, to continue."""
    shown = "\n\n".join(f"Excerpt {n}:\n{text}" for n, text in enumerate(excerpts, 1))
    user = instruction + (f"\n\nExcerpts of the author's own writing:\n\n{shown}" if excerpts else "")
    return [
        {"role": "system", "content": instruction},
        {"role": "user", "content": user},
        {"role": "assistant", "content": prompt},
    ]


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The template's rendering with the assistant's turn left open after its prefill. A template that
    refuses a system message (Gemma's) gets the messages without it: the user message carries the instruction
    too. One line where it still fails."""
    from jinja2 import TemplateError

    for attempt in (messages, [m for m in messages if m["role"] != "system"]):
        try:
            return tokenizer.apply_chat_template(attempt, tokenize=False, continue_final_message=True)
        except (TemplateError, ValueError) as error:
            failure = error
    raise UserError(f"the model's chat template cannot render a few-shot prompt: {failure}") from None


def turn_end_id(tokenizer, generation_config=None) -> int:
    """The id that ends a chat model's turn: a usual end-of-turn token its vocabulary has (looked up in the
    vocabulary: an unknown token would map to the unknown id), else its generation config's first
    end-of-sequence id, else the tokenizer's."""
    vocabulary = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocabulary:
            return vocabulary[token]
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        return configured if isinstance(configured, int) else configured[0]
    return tokenizer.eos_token_id


def build_prompt(
    tokenizer,
    passages: list[str],
    prompt: str,
    k: int,
    seed: int,
    context: int,
    new_tokens: int,
    instruction: str | None = None,
) -> FewShotPrompt:
    """The few-shot prompt for `prompt` from K of the training split's `passages`, fitting `context` with
    `new_tokens` to come: the chat template where the tokenizer has one (with `instruction`), else plain
    paragraphs."""
    chosen = choose_passages(len(passages), k, seed)
    chat = has_chat_template(tokenizer)

    def render(excerpts: list[str]) -> str:
        if chat:
            return chat_text(tokenizer, chat_messages(excerpts, prompt, instruction or ""))
        return base_model_text(excerpts, prompt)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    start = 0 if chat else 1  # a base model's prompt gets the paragraph's start token first (sample)
    # The template, separators and prompt, each separator tokenized as between words (one word per excerpt
    # stands in): an empty excerpt would let the separators around it merge into fewer tokens than they take.
    fixed = count_tokens(render([STAND_IN] * k)) - k * count_tokens(STAND_IN) + start
    share = excerpt_share(context, fixed, new_tokens, k)
    while True:  # the prompt as built is measured: it must leave the new tokens room in the context
        excerpts = [cut_to_share(count_tokens, passages[i], share) for i in chosen]
        text = render(excerpts)
        over = count_tokens(text) + start + new_tokens - context
        if over <= 0:
            return FewShotPrompt(text, chosen, excerpts)
        if not k:
            raise UserError(
                f"the prompt ({count_tokens(text) + start} tokens) and {new_tokens} new tokens are more than the "
                f"model's {context} context tokens; ask for {max(context - count_tokens(text) - start, 0)} new "
                "tokens or fewer, or shorten the prompt"
            )
        # the excerpts took more in place than alone: count that as fixed, so each share shrinks (by one at least)
        fixed += max(over, k)
        share = excerpt_share(context, fixed, new_tokens, k)


class AnswerEnds:
    """Where a chat model's answer ends its paragraphs (sample_ids' `ends`): at each blank line of its text (the
    token that completes the blank line), and at the end of its turn, which ends the answer and so every
    paragraph still wanted. With `paragraphs` None only the end of the turn ends it (the style report's samples
    run on past blank lines, as the other rows' run past end-of-text). `prompted`: the answer starts with the
    user's prompt, so a blank line at once ends its first paragraph (one before any text never does)."""

    def __init__(self, tokenizer, turn_end: int, paragraphs: int | None, prompted: bool):
        self.tokenizer, self.turn_end, self.paragraphs, self.prompted = tokenizer, turn_end, paragraphs, prompted
        self.pieces: dict[int, str] = {}  # a token's own text, decoded once

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tokenizer.decode([token])
        return self.pieces[token]

    def positions(self, row: list[int]) -> list[int]:
        found, newlines, written = [], 0, self.prompted
        for k, token in enumerate(row):
            if token == self.turn_end:
                return found + [k] * (self.paragraphs or 1)
            for character in self.piece(token) if self.paragraphs else "":
                if character == "\n":
                    newlines += 1
                    if newlines == 2 and written:  # a blank line after some text: a paragraph ends
                        found.append(k)
                elif not character.isspace():
                    newlines, written = 0, True
        return found

    def count(self, new: torch.Tensor) -> torch.Tensor:
        return torch.tensor([len(self.positions(row)) for row in new.tolist()])


def sample(
    model,
    tokenizer,
    built: FewShotPrompt,
    prompt: str,
    n: int,
    settings,
    seed: int,
    streamer=None,
    continuation_only: bool = False,
) -> list[str]:
    """`n` continuations of `prompt` after the few-shot prompt `built`, each as the prompt and what follows
    it (the excerpts are not repeated), or what follows only. A base model's samples start as a new paragraph
    and stop after `settings.paragraphs` of them; a chat model's stop at the end of its turn, or after
    `settings.paragraphs` paragraphs of its answer (blank lines). The repetition penalty leaves the whole prompt
    alone, and `settings.max_length` counts the user's prompt only. `streamer` (n=1) gets the new tokens."""
    from austen_gpt.data.tokens import paragraph_frame
    from austen_gpt.sampling.generation import as_text, sample_ids, special_token_ids

    chat = has_chat_template(tokenizer)
    ids = tokenizer(built.text, add_special_tokens=False)["input_ids"]
    ends = None
    if chat:
        stop = turn_end_id(tokenizer, getattr(model, "generation_config", None))
        ends = AnswerEnds(tokenizer, stop, settings.paragraphs, bool(prompt.strip()))
        settings = replace(settings, paragraphs=settings.paragraphs or 1)  # the end of the turn always ends it
    else:
        ids, stop = [paragraph_frame(tokenizer)[0], *ids], paragraph_frame(tokenizer)[1]
    user = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = sample_ids(
        model,
        [ids] * n,
        settings,
        seed,
        stop,
        streamer,
        special_ids=special_token_ids(tokenizer),
        penalise_prompt=False,
        counted_prompt=[len(user)] * n,
        ends=ends,
    )
    shown = [] if continuation_only else user
    if chat:  # (the end-of-turn token is left out)
        return [tokenizer.decode(shown + row, skip_special_tokens=True).strip() for row in rows]
    return [as_text(tokenizer, shown + row) for row in rows]


@dataclass(frozen=True)
class FewShot:
    """Few-shot prompting as inference.py --few-shot K asks for it: K excerpts of the training split's
    `passages` before each prompt, and a chat model's `instruction`."""

    passages: list[str]
    k: int
    instruction: str | None

    def write(
        self, model, tokenizer, prompt: str, n: int, settings, seed: int, streamer=None
    ) -> tuple[list[str], dict]:
        """`n` samples of `prompt` (the prompt and what follows), and what rebuilds their prompt: K, the passages'
        indices in the training split and the whole prompt's text."""
        from austen_gpt.sampling.generation import context_length

        new_tokens = settings.new_tokens(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        built = build_prompt(
            tokenizer, self.passages, prompt, self.k, seed, context_length(model), new_tokens, self.instruction
        )
        texts = sample(model, tokenizer, built, prompt, n, settings, seed, streamer)
        return texts, {"k": self.k, "passages": built.passages, "prompt_text": built.text}
