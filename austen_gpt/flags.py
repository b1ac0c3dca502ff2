"""Flag groups every script shares, with their defaults in one place: where the paragraphs come from."""

from __future__ import annotations

import argparse
from pathlib import Path

from austen_gpt.cli import add_flag

REPO = Path(__file__).resolve().parents[1]  # the project folder: the default dataset, configs and novels


def add_source_flags(group) -> None:
    """--data-config, --data-split and --text-column: which part of --data holds the paragraphs."""
    add_flag(group, "--data-config", default=None, help="configuration (subset) of a Hub dataset --data")
    add_flag(
        group, "--data-split", default=None, help="split of a Hub dataset or a saved DatasetDict; none given: train"
    )
    add_flag(
        group, "--text-column", default=None, help="column or field with the text; none given: text, else sentence"
    )


def uses_adapters(args: argparse.Namespace) -> bool:
    return args.lora or args.qlora or args.load_in_8bit
