"""Writing model folders whole or not at all: atomic folder writes, sizes, and the disk-full check."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from austen_gpt.cli import CliError, UserError
from austen_gpt.models.integrity import MANIFEST_FILE

# ----------------------------------------------------------------------------------------------
# Writing folders atomically


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DiskFull(CliError):
    """A save that did not fit on its disk: its partial folder is gone, all that was saved before is intact."""


def write_folder_atomically(
    folder: Path, write: Callable[[Path], None], replace: bool = False, expected_bytes: int = 0
) -> None:
    """Let `write` fill `<folder>.tmp`, fsync it, then rename it to `folder` (replacing it only if asked).

    A crash mid-write leaves only a `.tmp` folder, which is never mistaken for a checkpoint or a model.
    A full disk raises DiskFull, saying how much the save needs (`expected_bytes`, an estimate) and what
    is free, once the `.tmp` folder is removed; a folder being replaced is untouched until the very end.
    """
    if folder.exists() and not replace:
        raise UserError(f"{folder} already exists; refusing to overwrite it")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier interrupted write, never a complete folder
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except Exception as err:
        written = folder_bytes(tmp)
        if not disk_is_full(err, shutil.disk_usage(tmp).free, expected_bytes - written):
            raise
        shutil.rmtree(tmp)
        needs = f"about {size_text(expected_bytes)}" if expected_bytes > written else f"over {size_text(written)}"
        raise DiskFull(
            f"the disk is full: saving {folder} needs {needs} and {size_text(shutil.disk_usage(folder.parent).free)} "
            f"is free there; the partial {tmp.name} is removed and everything saved before is intact"
        ) from None
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # replace=True: keep the old one until the new one is in place
        folder.rename(old)
    tmp.rename(folder)
    _fsync_tree(folder.parent)
    if old.exists():
        shutil.rmtree(old)


def disk_is_full(err: Exception, free: int, still_to_write: int) -> bool:
    """Whether a failed write ran out of space. Each writer says so its own way (OSError ENOSPC, a
    SafetensorError naming os error 28, torch.save's "unexpected pos"), so the disk is asked as well."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
        return True
    return free < max(still_to_write, 2**20)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def size_text(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def tensor_bytes(*objects: Any) -> int:
    """The bytes of the tensors in nested dicts, lists and tuples, each storage counted once."""
    seen, total, stack = set(), 0, list(objects)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor) and (item.data_ptr(), item.nbytes) not in seen:
            seen.add((item.data_ptr(), item.nbytes))
            total += item.nbytes
    return total


def weights_bytes(model, state_dict: dict[str, torch.Tensor] | None) -> int:
    """About what save_weights writes: the model's tensors, or a PEFT model's adapters only."""
    weights = model.state_dict() if state_dict is None else state_dict
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict  # a PEFT model: peft is loaded already (models/lora.py)

        weights = get_peft_model_state_dict(model, state_dict=weights)
    return tensor_bytes(weights)


def save_weights(model, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    """model.save_pretrained, with tied parameters (GPT-2's lm_head is wte) written once.

    A state dict gathered from DeepSpeed holds a copy of each tied tensor, and save_pretrained drops
    tied duplicates only when they share memory: point the tied names at one tensor again.
    """
    if state_dict is not None:
        state_dict, first_name = dict(state_dict), {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in state_dict:
                state_dict[name] = state_dict[first_name.setdefault(id(parameter), name)]
    model.save_pretrained(folder, state_dict=state_dict)


def save_model_folder(
    folder: Path,
    model,
    tokenizer,
    replace: bool = False,
    notes: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """A model (or adapter) folder that plain transformers/peft load, written atomically.

    `notes` maps file names to JSON written beside the model; `state_dict`: the weights when they are
    not in `model` itself (gathered from FSDP shards or DeepSpeed).
    """

    def write(tmp: Path) -> None:
        save_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    write_folder_atomically(folder, write, replace=replace, expected_bytes=weights_bytes(model, state_dict))


def copy_model_folder(source: Path, folder: Path, leave_out: set[str], notes: dict[str, Any]) -> None:
    """`source`'s files (a saved model) in `folder`, bit for bit, without `leave_out`, plus `notes` (JSON
    files); written atomically, replacing what `folder` held."""

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=lambda _, names: [n for n in names if n in leave_out])
        for name, content in notes.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    write_folder_atomically(folder, write, replace=True, expected_bytes=folder_bytes(source))


EXPORT_NOTE = "training_metrics.json"  # beside a final model: where it comes from, its numbers, its run's settings


def run_settings(folder: str | Path) -> dict[str, Any] | None:
    """The settings of the run that wrote a model folder (train.py's flags by their dest names): from an export's
    note or a checkpoint's state; None for a folder no run of ours wrote (a Hub model, an older export)."""
    for name, key in ((EXPORT_NOTE, "settings"), (MANIFEST_FILE, "args")):  # MANIFEST_FILE: trainer_state.json
        try:
            settings = json.loads((Path(folder) / name).read_text())[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(settings, dict):
            return settings
    return None
