"""Command-line plumbing shared by train.py and inference.py.

Kept free of heavy imports (torch, transformers) so that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class CliError(Exception):
    """A run that cannot go on: reported as one line on stderr, no traceback, exit code `exit_code`."""

    exit_code = 1


class UserError(CliError):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout and show every default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line usage errors, like every other bad-input error."""

    def __init__(self, **kwargs):
        kwargs.setdefault("epilog", "Every --flag-name can also be spelled --flag_name.")
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none: for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def str2bool(value: str | bool) -> bool:
    """Parse the seed's `--flag True/False` spelling (its `type=bool` made `--qlora False` true)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "on"}:
        return True
    if lowered in {"false", "0", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--some-flag` and a hidden `--some_flag` twin (the seed's README uses both spellings)."""
    dest = name[2:].replace("-", "_")
    parser.add_argument(name, dest=dest, **kwargs)
    twin = "--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
    if twin != name:
        parser.add_argument(twin, dest=dest, **{**kwargs, "help": argparse.SUPPRESS})


def add_bool_flag(parser: argparse.ArgumentParser, name: str, help: str, default: bool = False) -> None:
    """A switch that works as `--flag`, `--flag True` and `--flag False`."""
    add_flag(parser, name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def require(rules: list[tuple[object, str]]) -> None:
    """Raise the UserError of the first rule whose condition is false."""
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def quiet_libraries() -> None:
    """Keep the console to our own lines: no save progress bars, no optional-kernel notices."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "pip install kernels" hint on AVX512-BF16 CPUs
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    # peft's prepare_model_for_kbit_training asks transformers a deprecated question; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main`, turning a CliError into one line on stderr and its exit code (2 for bad input)."""
    try:
        code = main(argv)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code or 0)
