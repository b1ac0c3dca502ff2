"""The Markdown docs stay true: their links resolve, their command lines use real flags, the README stays short.

Flags are checked against each script's `--help` output only (run in a subprocess; the scripts import torch
lazily, so this takes a second or two per script), never against the scripts' internals.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "inference.py", "export.py", "style_report.py", "bench.py", "dataset.py", "serve.py")
README_MAX_LINES = 160
# The only page that may show the original project's spellings (underscored flags, --restore-file, ...).
ORIGINAL_SPELLINGS_PAGE = "docs/training.md"
# Original spellings that the scripts accept but may leave out of --help (train.py --restore-file X
# --load-checkpoint True means --resume-from X; inference.py --qlora True loads adapters on a 4-bit base).
# They are exercised by the CLI tests; here they are only allowed, and only on ORIGINAL_SPELLINGS_PAGE.
ORIGINAL_ONLY_FLAGS = {"train.py": {"--restore-file", "--load-checkpoint"}, "inference.py": {"--qlora"}}
SHELL_BREAKS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


def doc_files() -> list[Path]:
    docs = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "data" / "README.md"]
    return [path for path in docs if path.exists()] + sorted((REPO / "docs").glob("*.md"))


def doc_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)


def split_fences(text: str) -> tuple[str, list[str]]:
    """The text outside fenced code blocks (fences blanked, line numbers kept) and the blocks' contents."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return prose, blocks


def inline_code(prose: str) -> list[str]:
    """Contents of inline code spans (`...` or ``...``), which may run over a line break."""
    return [m.group(2).replace("\n", " ").strip() for m in re.finditer(r"(`+)(.+?)\1", prose, re.S)]


# ----------------------------------------------------------------------------------------------------
# (a) links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = unicodedata.normalize("NFC", text.strip().lower())
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", prose, re.M):
        base = github_anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    prose, _ = split_fences(text)
    prose = re.sub(r"(`+).+?\1", "", prose, flags=re.S)  # code spans hold no links
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)", prose)
    reference = re.findall(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose, re.M)
    return inline + reference


@pytest.mark.parametrize("doc", doc_files(), ids=doc_id)
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto: ...: not checked (the tests run offline)
        path_part, _, fragment = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.exists():
            broken.append(f"{target}: {resolved} does not exist")
        elif fragment and resolved.suffix == ".md" and fragment.lower() not in anchors(resolved):
            broken.append(f"{target}: {doc_id(resolved)} has no heading with the anchor #{fragment}")
    assert not broken, f"{doc_id(doc)}: broken links:\n" + "\n".join(broken)


# ----------------------------------------------------------------------------------------------------
# (b) flags in command lines


def command_lines(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined, comments dropped) and inline code spans."""
    prose, blocks = split_fences(text)
    lines = []
    for block in blocks:
        lines += block.replace("\\\n", " ").splitlines()
    return lines + inline_code(prose)


def words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: fall back to whitespace
        return line.split("#", 1)[0].split()


def script_invocations(line: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each of our scripts that `line` runs; launchers' own flags are not kept."""
    found = []
    tokens = words(line)
    i = 0
    while i < len(tokens):
        name = tokens[i]
        script = next((s for s in SCRIPTS if name == s or name == f"./{s}"), None)
        i += 1
        if script is None:
            continue
        args = []
        while i < len(tokens) and tokens[i] not in SHELL_BREAKS:
            args.append(tokens[i])
            i += 1
        found.append((script, args))
    return found


def normalize(flag: str) -> str:
    """Every --flag-name is also accepted as --flag_name: compare them as one."""
    return flag.split("=", 1)[0].replace("_", "-")


@functools.cache
def help_flags(script: str, subcommand: str | None = None) -> frozenset[str]:
    """The flags `python <script> [subcommand] --help` lists (usage line and option lines), normalized."""
    assert (REPO / script).exists(), f"{script} is named in the docs but does not exist"
    argv = [sys.executable, str(REPO / script), *([subcommand] if subcommand else []), "--help"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv[1:])} failed:\n{result.stderr[-2000:]}"
    text = result.stdout
    usage = text.split("\n\n", 1)[0]  # "usage: ..." up to the first blank line
    flags = set(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", usage))
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):  # an option line; its description starts after two spaces
            flags.update(re.findall(r"--[A-Za-z0-9][\w-]*", re.split(r"\s{2,}", line.strip())[0]))
    return frozenset(normalize(flag) for flag in flags)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in doc_files():
        for line in command_lines(doc.read_text(encoding="utf-8")):
            for script, args in script_invocations(line):
                found.append((doc_id(doc), script, args))
    return found


def test_docs_show_commands_of_every_script():
    shown = {script for _, script, _ in documented_commands()}
    assert shown == set(SCRIPTS), f"no documented command line for {sorted(set(SCRIPTS) - shown)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_documented_flags_exist(script: str):
    problems = []
    for doc, name, args in documented_commands():
        if name != script:
            continue
        subcommand = args[0] if args and not args[0].startswith("-") and script == "dataset.py" else None
        known = help_flags(script) | (help_flags(script, subcommand) if subcommand else frozenset())
        for arg in args:
            if not arg.startswith("--") or arg == "--":
                continue
            flag = arg.split("=", 1)[0]
            original_only = flag in ORIGINAL_ONLY_FLAGS.get(script, ())
            if (original_only or "_" in flag) and doc != ORIGINAL_SPELLINGS_PAGE:
                problems.append(f"{doc}: {flag} is an original spelling; only {ORIGINAL_SPELLINGS_PAGE} shows those")
            elif normalize(flag) not in known and not original_only:
                shown = f"{script} {subcommand} --help" if subcommand else f"{script} --help"
                problems.append(f"{doc}: {flag} is not in `python {shown}`")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------------
# (c) the README stays a front door


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details into docs/"


@pytest.mark.parametrize(
    "doc, limit", [("README.md", 10_240), ("CONTRIBUTING.md", 8_192), ("docs/training.md", 15_360)]
)
def test_front_doors_stay_short_enough_to_finish(doc: str, limit: int):
    size = len((REPO / doc).read_bytes())
    assert size <= limit, f"{doc} is {size:,} bytes, over {limit:,}; move details into a page of their own"
