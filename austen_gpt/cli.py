"""Command-line plumbing every script shares: one-line errors, the parser (run files, the original spellings),
and flags made from the fields of typed settings.

Kept free of heavy imports (torch, transformers) so that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import sys
import textwrap
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CliError(Exception):
    """A run that cannot go on: reported as one line on stderr, no traceback, exit code `exit_code`."""

    exit_code = 1


class UserError(CliError):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout and show every default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help, one-line usage errors (like every other bad-input error), and
    the original project's underscore spellings read as the dashed ones (see the end of this file)."""

    def __init__(self, run_files: bool = False, **kwargs):
        kwargs.setdefault("epilog", "The original project's spellings (--flag_name, --flag True) work too.")
        super().__init__(formatter_class=_HelpFormatter, **kwargs)
        self.run_files = run_files
        if run_files:
            self.add_argument(
                "--config",
                metavar="FILE.yaml",
                default=None,
                help="a run file: YAML lines `flag: value` (lr: 3e-4, max-input-length: 256) setting any flag here; "
                "flags on the command line override it",
            )

    def parse_known_args(self, args=None, namespace=None):
        args = with_dashes(sys.argv[1:] if args is None else list(args), set(self._option_string_actions))
        if self.run_files and (path := config_path(args)):
            if not path.endswith((".yaml", ".yml")) and "--model-config" in self._option_string_actions:
                args = model_config_spelling(args)  # bench.py and `dataset.py tokenizer` took it as --config
            else:
                args = self.run_file_args(path) + args  # later flags win: the command line overrides the file
        return super().parse_known_args(args, namespace)

    def given_dests(self, argv: list[str] | None = None) -> set[str]:
        """The settings `argv` or its run file sets, as opposed to those left at their defaults."""
        args = with_dashes(sys.argv[1:] if argv is None else list(argv), set(self._option_string_actions))
        if self.run_files and (path := config_path(args)) and path.endswith((".yaml", ".yml")):
            args = self.run_file_args(path) + args
        names = {token.split("=")[0] for token in args if token.startswith("-")}
        return {action.dest for action in self._actions if names & set(action.option_strings)}

    def run_file_args(self, path: str) -> list[str]:
        """The run file's settings as flags, each key named and its value checked, with one-line errors."""
        args = []
        for key, value in read_run_file(path).items():
            flag = "--" + key.replace("_", "-")
            action = self._option_string_actions.get(flag)
            if action is None or flag in ("--config", "--help") or action.help == argparse.SUPPRESS:
                raise UserError(f"--config {path}: unknown key '{key}', not a flag of {self.prog} (see --help)")
            if value is not None:
                args += [flag, *value_tokens(path, key, value, action)]
        return args

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none: for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def str2bool(value: str | bool) -> bool:
    """Parse the original `--flag True/False` spelling (its `type=bool` made `--qlora False` true)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "on"}:
        return True
    if lowered in {"false", "0", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """`--some-flag`, stored as `some_flag`."""
    parser.add_argument(name, dest=name[2:].replace("-", "_"), **kwargs)


def add_setting(parser: argparse.ArgumentParser, name: str, settings: Any, help: str, **kwargs) -> None:
    """`--some-flag` for the field `some_flag` of the settings object `settings`, which gives its default and
    type: a bool field makes a switch, a list field takes one or more values, an `X | None` field an X."""
    dest = name[2:].replace("-", "_")
    kind, default = typing.get_type_hints(type(settings))[dest], getattr(settings, dest)
    if kind is bool:
        return add_bool_flag(parser, name, help, default)
    if typing.get_origin(kind) is list:
        kwargs.setdefault("nargs", "+")
    kind = next(arg for arg in typing.get_args(kind) or (kind,) if arg is not type(None))
    add_flag(parser, name, type=kind, default=default, help=help, **kwargs)


def add_settings(parser: argparse.ArgumentParser, settings: Any, *fields: str, **kwargs: dict[str, Any]) -> None:
    """A flag for each of `fields` of the settings object `settings` (add_setting), its help the field's
    docstring; `kwargs` maps a field to more add_argument options, e.g. report_to={"choices": [...]}."""
    docs = field_docs(type(settings))
    for dest in fields:
        add_setting(parser, flag_name(dest), settings, docs[dest].replace("%", "%%"), **kwargs.get(dest, {}))


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring}, the string under each field of a dataclass (as litgpt documents its settings)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:], strict=False)
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


def flag_name(dest: str) -> str:
    """`rank_lora` -> `--rank-lora`: the flag that sets an argument."""
    return "--" + dest.replace("_", "-")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, help: str, default: bool = False) -> None:
    """A switch that works as `--flag`, and also as the original project's `--flag True` and `--flag False`."""
    add_flag(parser, name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def require(rules: list[tuple[object, str]]) -> None:
    """Raise the UserError of the first rule whose condition is false."""
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def quiet_libraries() -> None:
    """Keep the console to our own lines: no save progress bars, no optional-kernel notices."""
    import transformers  # here, not at the top: every script imports cli before its flags are parsed

    # bitsandbytes on AVX512-BF16 CPUs tries to fetch an optional kernel from the Hub and says so twice
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
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


# ----------------------------------------------------------------------------------------------
# The original project's spellings: accepted here, documented once (docs/training.md), used nowhere else.
#
#   --rank_lora 8, --model_path X, ...              any flag with underscores: read as --rank-lora, --model-path
#   --qlora True, --lora False, ...                  any switch with a value (str2bool above)
#   --restore-file Epoch_2 --load-checkpoint True    train.py: read as --resume-from Epoch_2
#   --qlora True --base_model gpt2                   inference.py: read as --load-in-4bit --base-model gpt2

RESUME_FLAGS = {"--resume", "--resume-from", "--restore-file", "--load-checkpoint"}
RESUME_FLAGS |= {flag.replace("-", "_") for flag in RESUME_FLAGS}


def with_dashes(argv: list[str], known: set[str]) -> list[str]:
    """`--rank_lora 8` and `--rank_lora=8` read as `--rank-lora`, when the parser knows that flag."""
    spelled = []
    for token in argv:
        name, equals, value = token.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        spelled.append(dashed + equals + value if name.startswith("--") and dashed in known else token)
    return spelled


def add_original_resume_flags(parser: argparse.ArgumentParser) -> None:
    """train.py: the original `--restore-file NAME --load-checkpoint True` (hidden from --help)."""
    parser.add_argument("--restore-file", dest="restore_file", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--load-checkpoint",
        dest="load_checkpoint",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help=argparse.SUPPRESS,
    )


def read_original_resume_flags(args: argparse.Namespace) -> None:
    """Turn `--restore-file NAME --load-checkpoint True` into `--resume-from NAME`; each needs the other."""
    restore_file, load_checkpoint = vars(args).pop("restore_file"), vars(args).pop("load_checkpoint")
    require(
        [
            (restore_file or not load_checkpoint, "--load-checkpoint True needs --restore-file, e.g. Epoch_2"),
            (load_checkpoint or not restore_file, f"--restore-file {restore_file} needs --load-checkpoint True"),
            (not (restore_file and args.resume_from), "--restore-file and --resume-from name the same thing: use one"),
        ]
    )
    args.resume_from = args.resume_from or restore_file


def add_original_qlora_flag(parser: argparse.ArgumentParser) -> None:
    """inference.py: the original `--qlora True` (adapters on a 4-bit base), hidden from --help."""
    parser.add_argument(
        "--qlora", dest="qlora", type=str2bool, nargs="?", const=True, default=False, help=argparse.SUPPRESS
    )


def read_original_qlora_flag(args: argparse.Namespace) -> None:
    args.load_in_4bit = vars(args).pop("qlora") or args.load_in_4bit


# ----------------------------------------------------------------------------------------------
# Run files: `--config FILE.yaml` sets any flag; flags on the command line override the file.

RUN_FILE_RECORD = "resolved"  # a written run file's record of what the machine made of its settings; never read


def config_path(argv: list[str]) -> str | None:
    """The FILE of `--config FILE` or `--config=FILE` in `argv` (the last one given), if any."""
    found = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.partition("=")[2]
    return found


def model_config_spelling(argv: list[str]) -> list[str]:
    """`--config gpt2-tiny` (not a .yaml file): the earlier spelling of --model-config, read as that."""
    return [
        "--model-config" + token[len("--config") :] if token.split("=")[0] == "--config" else token for token in argv
    ]


def read_run_file(path: str) -> dict[str, Any]:
    """The settings of a YAML run file, as a mapping; one-line errors for a missing or malformed file."""
    import yaml  # here, not at the top: only a run with --config reads YAML

    try:
        settings = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"--config {path}: {err.strerror or first_line(err)}") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML: {first_line(err)}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"--config {path}: expected `flag: value` lines, found a {type(settings).__name__}")
    return {str(key): value for key, value in settings.items() if key != RUN_FILE_RECORD}


def value_tokens(path: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    """A run file's `key: value` as command-line values, each checked by the flag's own type and choices."""
    many = action.nargs in ("+", "*")
    if isinstance(value, dict) or (isinstance(value, list) and not many):
        raise UserError(f"--config {path}: {key} takes one value, not {type(value).__name__} {value!r}")
    values = value if isinstance(value, list) else [value]
    tokens = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    for token in tokens:
        try:
            converted = action.type(token) if callable(action.type) else token
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value").replace("str2bool", "boolean (true or false)")
            article = "an" if kind[0] in "aeiou" else "a"
            raise UserError(f"--config {path}: {key}: {token!r} is not {article} {kind}") from None
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UserError(f"--config {path}: {key}: {token!r} is not one of {choices}")
    return tokens
