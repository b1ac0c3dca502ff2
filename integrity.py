"""Is a model, adapter or checkpoint folder whole? Every file it will load, checked before anything loads it.

A checkpoint cut short by an interrupted copy, a full disk or a dying volume would otherwise end in a
library traceback deep inside the load. Here each weights file's safetensors header is read and must
cover the file exactly (a truncated, empty or garbage file fails), and each JSON file must parse; the
first damaged file stops the run with one line naming it, the problem and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli import UserError, first_line


def check_folder(folder: Path, fix: str) -> None:
    """Raise a one-line UserError for the first damaged .safetensors or .json file in `folder`; `fix` says
    what to do about it (copy the folder again, resume from another checkpoint, ...)."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix == ".json":
            problem = json_problem(path)
        else:
            continue
        if problem:
            raise UserError(f"{path} is damaged ({problem}); {fix}")


def safetensors_problem(path: Path) -> str | None:
    """Why the file is not a complete safetensors file, or None. Reads the header only."""
    from safetensors import safe_open

    if path.stat().st_size == 0:
        return "an empty file"
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as err:  # SafetensorError and OSError, by release
        return first_line(err)
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return f"not valid JSON: {first_line(err)}"
    except OSError as err:
        return f"unreadable: {err.strerror}"
    return None
