"""inference.py --interactive: the model loaded once, then prompt after prompt.

A line is a prompt (an empty one starts a fresh paragraph), or a command that changes a setting for the
prompts after it, e.g. `:temperature 0.8`, `:n 1`, `:max-new-tokens 2000`, `:seed 7` (`:seed none` draws a
new one each time), `:settings`, `:help`, `:quit`. One sample is streamed as it is written; several are
drawn in one batched call and printed together. Ctrl-C stops the sample being written, not the session;
Ctrl-D (end of input) or `:quit` ends it. Prompts may also be piped in, one per line. With --few-shot K,
each prompt comes after K excerpts of the author, drawn for it with its seed.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TextIO

from austen_gpt.cli import UserError
from austen_gpt.sampling.few_shot import FewShot, has_chat_template
from austen_gpt.sampling.generation import TextStream, fresh_seed, generate_paragraphs
from austen_gpt.settings import SamplingSettings

HELP = """commands (a setting holds for the prompts after it):
  :temperature X  :top-k N  :top-p X  :repetition-penalty X
  :n N                  samples per prompt (one is streamed as it is written)
  :max-new-tokens N     tokens per sample; more than the context slides the window
  :paragraphs N         stop after N paragraphs
  :seed N | none        a fixed seed, or a new one for every prompt
  :settings  :help  :quit (or Ctrl-D)
Ctrl-C stops a sample; any other line is a prompt, an empty one starts a fresh paragraph."""

# command -> (setting, type); hyphens and underscores both accepted
SETTINGS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top-k": ("top_k", int),
    "top-p": ("top_p", float),
    "repetition-penalty": ("repetition_penalty", float),
    "n": ("n", int),
    "n-return-seqs": ("n", int),
    "max-new-tokens": ("max_new_tokens", int),
    "paragraphs": ("paragraphs", int),
    "seed": ("seed", int),
}


def check_stdin(stdin: TextIO) -> bool:
    """True for a terminal, False for prompts piped in or redirected from a file; anything else is refused."""
    if stdin.isatty():
        return True
    mode = os.fstat(stdin.fileno()).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
        return False
    raise UserError(
        "--interactive needs a terminal, or prompts piped in one per line (e.g. `cat prompts.txt | python "
        "inference.py --interactive`); for a file of prompts you can also use --prompts-file"
    )


def terminal_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed at the terminal; Ctrl-C on an empty line is ignored, Ctrl-D ends."""
    while True:
        try:
            yield input(prompt)
        except KeyboardInterrupt:
            print()
        except EOFError:
            print()
            return


def piped_lines(stdin: TextIO) -> Iterator[str]:
    for line in stdin:
        yield line.rstrip("\n")


@dataclass
class Session:
    model: object
    tokenizer: object
    settings: SamplingSettings
    n: int
    seed: int | None
    check: Callable[[SamplingSettings, int], None]  # raises UserError for settings that cannot sample
    # called with every finished prompt's samples (prompt, texts, settings, seed, prompts file, few-shot record)
    keep: Callable[[str, list[str], SamplingSettings, int, None, dict | None], None]
    few_shot: FewShot | None = None  # each prompt after its own excerpts (inference.py --few-shot K)
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the stdout of the moment, not of the import
    candidates: int = 1  # inference.py --rerank N: each sample kept of N candidates by `pick`
    # (prompt, the n x N candidates, seed) -> the n kept
    pick: Callable[[str, list[str], int], list[str]] | None = None

    def run(self, lines: Iterator[str]) -> int:
        for line in lines:
            if line.strip().startswith(":"):
                if not self.command(line.strip()[1:]):
                    return 0
            else:
                self.sample(line)
        return 0

    def command(self, text: str) -> bool:
        """Carry out a command; False ends the session."""
        name, _, value = text.partition(" ")
        name, value = name.replace("_", "-").lower(), value.strip()
        if name in ("quit", "q", "exit"):
            return False
        if name == "help":
            self.say(HELP)
        elif name == "settings":
            self.say(" · ".join([f"n {self.n}", f"seed {self.seed}", *self.shown_settings()]))
        elif name not in SETTINGS:
            self.say(f"error: unknown command :{name}; :help lists them")
        else:
            self.set(name, value)
        return True

    def set(self, name: str, value: str) -> None:
        field, kind = SETTINGS[name]
        try:
            parsed = None if field == "seed" and value.lower() == "none" else kind(value)
        except ValueError:
            self.say(f"error: :{name} takes {'an integer' if kind is int else 'a number'}, e.g. :{name} 1")
            return
        n = parsed if field == "n" else self.n
        settings = self.settings
        if field not in ("n", "seed"):
            settings = replace(settings, **{field: parsed})
        try:
            self.check(settings, n)
        except UserError as problem:
            self.say(f"error: {problem}")
            return
        self.settings, self.n = settings, n
        if field == "seed":
            self.seed = parsed
        self.say(f"{name} {parsed}")

    def shown_settings(self) -> list[str]:
        return [f"{k} {v}" for k, v in self.settings.as_dict().items() if v is not None]

    def sample(self, prompt: str) -> None:
        seed = self.seed if self.seed is not None else fresh_seed()
        stream, record, drawn = None, None, self.n * self.candidates
        if drawn == 1:  # streamed as drawn; candidates are shown once one is kept
            self.out.write(prompt)
            stream = TextStream(
                self.tokenizer, self.out, chat=self.few_shot is not None and has_chat_template(self.tokenizer)
            )
        try:
            if self.few_shot:
                texts, record = self.few_shot.write(
                    self.model, self.tokenizer, prompt, drawn, self.settings, seed, stream
                )
            else:
                texts = generate_paragraphs(self.model, self.tokenizer, prompt, drawn, self.settings, seed, stream)
            if self.pick:
                texts = self.pick(prompt, texts, seed)
        except KeyboardInterrupt:
            self.say("\n[stopped]")
            return
        except UserError as problem:  # a few-shot prompt that cannot fit: the session goes on
            self.say(f"\nerror: {problem}")
            return
        if stream:
            stream.finish()
        else:
            self.say("\n\n".join(f"{number}. {text}" for number, text in enumerate(texts, 1)))
        self.say("")
        self.keep(prompt, texts, self.settings, seed, None, record)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
