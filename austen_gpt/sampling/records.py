"""Samples kept in a file with everything that made them (inference.py --output FILE).

FILE.jsonl gets one JSON record per sample, for programs; FILE.md a section per prompt, for reading. Both are
appended to, never overwritten. Every record holds the model, the prompt, the text, every sampling setting,
the seed, the date, and the command that draws the same samples again.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from austen_gpt.cli import UserError
from austen_gpt.settings import SamplingSettings

SUFFIXES = (".jsonl", ".md")


def check_output(path: str | Path) -> Path:
    """The --output path, refused (before any model is loaded) if samples could not be appended to it."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"--output {path}: give a .jsonl file (a record per sample) or a .md file (for reading)")
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name ending in .jsonl or .md")
    if not path.parent.is_dir():
        raise UserError(f"--output {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(f"--output {path} cannot be written (no permission); choose another path")
    return path


@dataclass
class Source:
    """The model the samples come from, as inference.py was told to load it."""

    model: str
    base_model: str | None = None
    load_in_4bit: bool = False
    prompt_flags: tuple[str, ...] = ()  # how the prompts were built (--few-shot and its split), as flags


def command(
    source: Source, prompt: str, n: int, settings: SamplingSettings, seed: int, prompts_file: str | None = None
) -> str:
    """The inference.py command that draws these samples again (with `prompts_file`: that file's samples)."""
    words = ["python", "inference.py", "--model-path", source.model]
    words += ["--base-model", source.base_model] if source.base_model else []
    words += ["--load-in-4bit"] if source.load_in_4bit else []
    words += list(source.prompt_flags)
    words += ["--prompts-file", prompts_file] if prompts_file else ["--prompt", prompt]
    words += ["--n-return-seqs", str(n)]
    if settings.max_new_tokens:
        words += ["--max-new-tokens", str(settings.max_new_tokens)]
    else:
        words += ["--max-length", str(settings.max_length)]
    words += ["--static-cache"] if settings.static_cache else []
    for flag, value in [
        ("--paragraphs", settings.paragraphs),
        ("--top-k", settings.top_k),
        ("--top-p", settings.top_p),
        ("--temperature", settings.temperature),
        ("--repetition-penalty", settings.repetition_penalty),
        ("--seed", seed),
    ]:
        words += [flag, str(value)]
    return shlex.join(words)


def records(
    source: Source,
    prompt: str,
    texts: list[str],
    settings: SamplingSettings,
    seed: int,
    prompts_file: str | None = None,
    few_shot: dict | None = None,
) -> list[dict]:
    """One record per sample; `prompts_file`: the prompt came from this file, with the others in it;
    `few_shot`: the excerpts placed before the prompt (their passages' indices in the training split) and
    the whole prompt the model was given."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    again = command(source, prompt, len(texts), settings, seed, prompts_file)
    return [
        {
            "date": date,
            "model": source.model,
            "base_model": source.base_model,
            "load_in_4bit": source.load_in_4bit,
            "prompt": prompt,
            "sample": number,
            "of": len(texts),
            "text": text,
            "seed": seed,
            "settings": settings.as_dict(),
            "command": again,
            **({"few_shot": few_shot} if few_shot else {}),
        }
        for number, text in enumerate(texts, 1)
    ]


def append(path: Path, new: list[dict]) -> None:
    """Add the records of one prompt's samples to the file (created if missing)."""
    with path.open("a", encoding="utf-8") as file:
        if path.suffix == ".jsonl":
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in new)
        else:
            file.write(markdown(new))


def markdown(new: list[dict]) -> str:
    """One prompt's samples: a heading, what made them, and the numbered texts (later paragraphs indented,
    so that they stay in their item)."""
    first = new[0]
    settings = " · ".join(f"{k} {v}" for k, v in first["settings"].items() if v is not None)
    lines = [
        f"## {first['prompt'] or '(a new paragraph)'}",
        "",
        f"{first['date']} · model `{first['model']}` · seed {first['seed']} · {settings}",
        "",
        f"`{first['command']}`",
        "",
    ]
    for record in new:
        paragraphs = record["text"].split("\n\n")
        lines += [f"{record['sample']}. {paragraphs[0]}", *(f"\n   {p}" for p in paragraphs[1:]), ""]
    return "\n".join(lines) + "\n"


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a .jsonl file written by append."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
