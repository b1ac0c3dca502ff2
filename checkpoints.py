"""Checkpoints, one contract: what a checkpoint holds, how it is written, found, vetted and resumed from.

    Checkpoints/Epoch_N/ and Step_N/ = the model (or its adapters) + tokenizer
                                       + training_state.pt   optimizer, scheduler, RNG: tensors only
                                       + trainer_state.json  position, metrics, settings; written last

Every folder is written as `<name>.tmp` and renamed into place, so a crash leaves a `.tmp` folder that
is never resumed from. `trainer_state.json` carries a format version so that later versions can tell
old checkpoints from new ones. Resuming reloads weights, optimizer, schedule, every process's random
state and the position in the epoch: the rest of the run is bitwise the one an uninterrupted run makes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli import UserError, first_line, flag_name
from integrity import check_folder

TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, RNG: tensors only, loads with weights_only=True
TRAINER_STATE = "trainer_state.json"  # position, metrics, settings; written last, so it marks a complete checkpoint
FORMAT_VERSION = 2  # of trainer_state.json; checkpoints without one are version 1 (read the same way)
# Settings that decide the data split, the batches or the model: a resumed run must keep them.
MUST_MATCH_ON_RESUME = ("model", "from_scratch", "data", "train_size", "seed", "max_input_length", "packing")
MUST_MATCH_ON_RESUME += ("batch_size", "grad_accum_steps", "lora", "qlora", "load_in_8bit", "rank_lora", "alpha_lora")
MUST_MATCH_ON_RESUME += ("targets_lora", "data_config", "data_split", "text_column")
RESUME_ELSEWHERE = "move that checkpoint away, or resume from an earlier one with --resume-from NAME"


@dataclass
class TrainingState:
    """Where a run is, and what it has learnt about its best point. Saved in every checkpoint's
    trainer_state.json, so that a resumed run takes the same decisions (best model, early stop) as an
    uninterrupted one."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's
    last_validation_step: int | None = None
    best_val_loss: float = math.inf  # the best validation loss a candidate for best/ reached
    best_step: int | None = None  # where the model in <check-dir>/best/ comes from
    best_epoch: int | None = None  # the epoch (counted from 1) that step is in
    best_metrics: dict[str, float] = field(default_factory=dict)
    validations_without_improvement: int = 0  # early stopping's patience counter
    copy_guard_refusals: list[int] = field(default_factory=list)  # steps the copying guard kept from best/
    last_checkpoint: Path | None = None  # the newest checkpoint written or resumed from (not saved)

    @property
    def current_epoch(self) -> int:
        """The epoch (counted from 1) that the last optimizer step belongs to."""
        return self.epoch + (self.batches_in_epoch > 0)

    def to_json(self, args: argparse.Namespace, processes: int) -> dict[str, Any]:
        state = {key: value for key, value in asdict(self).items() if key != "last_checkpoint"}
        state["best_val_loss"] = self.best_val_loss if math.isfinite(self.best_val_loss) else None  # JSON has no inf
        return {"format_version": FORMAT_VERSION, **state, "processes": processes, "args": vars(args)}

    @classmethod
    def from_json(cls, saved: dict[str, Any], checkpoint: Path) -> TrainingState:
        """Checkpoints of format 1 hold only the position and the metrics (with the best loss among them)."""
        known = {f.name for f in fields(cls)} - {"last_checkpoint"}
        state = cls(**{key: value for key, value in saved.items() if key in known}, last_checkpoint=checkpoint)
        best = saved.get("best_val_loss", saved["metrics"].get("val_best_loss"))
        state.best_val_loss = math.inf if best is None else best
        return state


# ----------------------------------------------------------------------------------------------
# Writing folders atomically


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder_atomically(folder: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Let `write` fill `<folder>.tmp`, fsync it, then rename it to `folder` (replacing it only if asked).

    A crash mid-write leaves only a `.tmp` folder, which is never mistaken for a checkpoint or a model.
    """
    if folder.exists() and not replace:
        raise UserError(f"{folder} already exists; refusing to overwrite it")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier interrupted write, never a complete folder
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # replace=True: keep the old one until the new one is in place
        folder.rename(old)
    tmp.rename(folder)
    _fsync_tree(folder.parent)
    if old.exists():
        shutil.rmtree(old)


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
    extra_files: dict[str, Callable[[Path], None]] | None = None,
) -> None:
    """A model (or adapter) folder that plain transformers/peft load, written atomically.

    `notes` maps file names to JSON written beside the model; `extra_files` maps file names to
    functions that write them (last, in order); `state_dict`: the weights when they are not in
    `model` itself (gathered from FSDP shards or DeepSpeed).
    """

    def write(tmp: Path) -> None:
        save_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, write_file in (extra_files or {}).items():
            write_file(tmp / name)

    write_folder_atomically(folder, write, replace=replace)


def copy_model_folder(source: Path, folder: Path, leave_out: set[str], notes: dict[str, Any]) -> None:
    """`source`'s files (a saved model) in `folder`, bit for bit, without `leave_out`, plus `notes` (JSON
    files); written atomically, replacing what `folder` held."""

    def write(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=lambda _, names: [n for n in names if n in leave_out])
        for name, content in notes.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    write_folder_atomically(folder, write, replace=True)


def save_checkpoint(
    folder: Path,
    model,
    tokenizer,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model, tokenizer, tensor state and JSON state; the JSON goes last and marks the checkpoint complete."""
    save_model_folder(
        folder,
        model,
        tokenizer,
        state_dict=state_dict,
        extra_files={
            TRAINING_STATE: lambda path: torch.save(training_state, path),
            TRAINER_STATE: lambda path: path.write_text(json.dumps(trainer_state, indent=2) + "\n"),
        },
    )


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds besides the weights: optimizer, schedule, RNG (tensors and numbers only)


def rng_state() -> dict[str, torch.Tensor]:
    """Python's, NumPy's and torch's random states as tensors (so torch.load(weights_only=True) reads them)."""
    _, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(np_has_gauss), np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def capture_states(accelerator, optimizer, scheduler, include_optimizer: bool) -> dict[str, Any]:
    """All an exact resume needs besides the weights, as tensors and numbers (no pickled objects).

    Every process calls it (a collective call: each sends its random state, in process order, as
    their dropout masks differ). The optimizer state is left out where each process holds only its
    part of it (FSDP, DeepSpeed): such a checkpoint gives its weights to a new run and is never resumed.
    """
    from accelerate.utils import gather_object

    states = {"scheduler": scheduler.state_dict(), "rng": gather_object([rng_state()])}
    if include_optimizer:
        states["optimizer"] = optimizer.state_dict()
    if accelerator.scaler is not None:  # fp16 loss scaling
        states["scaler"] = accelerator.scaler.state_dict()
    return states


def check_optimizer_state_fits(optimizer) -> None:
    """Moments shaped like their parameters, or the first step would fail (an FSDP shard, say, is not)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in optimizer.state.get(parameter, {}).items():
                if value.dim() and value.shape != parameter.shape:
                    raise UserError(
                        f"the checkpoint's optimizer state does not fit this model ({name} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(parameter.shape)}); "
                        "start a new run from its weights"
                    )


def restore_states(states: dict[str, Any], accelerator, optimizer, scheduler) -> None:
    optimizer.load_state_dict(states["optimizer"])
    check_optimizer_state_fits(optimizer)
    scheduler.load_state_dict(states["scheduler"])
    rng = states["rng"]
    set_rng_state(rng[accelerator.process_index] if isinstance(rng, list) else rng)  # one per process
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(states["scaler"])


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def is_checkpoint(folder: Path) -> bool:
    """Complete and in place: a `.tmp` folder (a save not yet renamed) never counts, even when full."""
    in_place = not folder.name.endswith((".tmp", ".old"))
    return in_place and (folder / TRAINER_STATE).is_file() and (folder / TRAINING_STATE).is_file()


def checkpoint_progress(folder: Path) -> tuple[int, int]:
    """(global step, completed epochs): an epoch checkpoint sorts after a step checkpoint of the same
    step, since it also holds that epoch's validation."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{folder / TRAINER_STATE} is damaged (not valid JSON: {err}); {RESUME_ELSEWHERE}") from None
    return state["global_step"], state["epoch"]


def sorted_checkpoints(check_dir: Path, prefix: str = "") -> list[Path]:
    """Complete checkpoints, oldest first."""
    folders = [p for p in check_dir.glob(f"{prefix}*") if is_checkpoint(p)] if check_dir.is_dir() else []
    return sorted(folders, key=checkpoint_progress)


def list_checkpoints(check_dir: Path) -> list[str]:
    return [p.name for p in sorted_checkpoints(check_dir)]


def incomplete_checkpoints(check_dir: Path) -> list[str]:
    """Checkpoint folders an interrupted save left behind (no completion marker): never resumed from."""
    if not check_dir.is_dir():
        return []
    pattern = re.compile(r"(Epoch|Step)_\d+(\.tmp|\.old)?")
    return sorted(p.name for p in check_dir.iterdir() if pattern.fullmatch(p.name) and not is_checkpoint(p))


def find_checkpoint(check_dir: Path, name: str) -> Path:
    """`--resume-from Epoch_2` names a folder in `--check-dir` (or any path to a checkpoint folder)."""
    for candidate in (check_dir / name, Path(name)):
        if is_checkpoint(candidate):
            return candidate
    if (check_dir / name).exists() or Path(name).exists():
        raise UserError(
            f"{name} is not a complete checkpoint (no {TRAINER_STATE}); pick one of: {list_checkpoints(check_dir)}"
        )
    raise UserError(f"checkpoint {name} not found in {check_dir}; pick one of: {list_checkpoints(check_dir)}")


def prune_step_checkpoints(check_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete Step_N checkpoints; incomplete folders are not touched."""
    doomed = sorted_checkpoints(check_dir, prefix="Step_")[:-keep]
    for folder in doomed:
        shutil.rmtree(folder)
    return [folder.name for folder in doomed]


def load_checkpoint_states(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training_state tensors, trainer_state JSON) of a checkpoint, whose files are checked first (integrity.py);
    no pickled objects are executed."""
    check_folder(folder, RESUME_ELSEWHERE)
    try:
        training_state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    except Exception as err:  # damaged or foreign files: say which, never execute them
        raise UserError(f"checkpoint {folder} cannot be read ({first_line(err)}); resume from another") from None
    if trainer_state.get("format_version", 1) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {folder} was written by a newer version of this project (format "
            f"{trainer_state['format_version']}); update the code to resume it"
        )
    return training_state, trainer_state


# ----------------------------------------------------------------------------------------------
# Resuming: the plan, the settings that must match, the refusals


@dataclass
class Resume:
    """Where training starts: from nothing, or from a checkpoint's weights and states."""

    checkpoint: Path | None = None
    tensors: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, RNG
    state: TrainingState = field(default_factory=TrainingState)


def plan_resume(args: argparse.Namespace, processes: int, print_line: Callable[[str], None]) -> Resume:
    """Find, load and vet the checkpoint to resume from (--resume or --resume-from), if any, for a run of
    `processes` processes."""
    check_dir = Path(args.check_dir)
    if not (args.resume or args.resume_from):
        return Resume()
    skipped = incomplete_checkpoints(check_dir)
    if skipped:
        print_line(f"ignoring incomplete checkpoints (an interrupted save): {', '.join(skipped)}")
    if args.resume_from:
        checkpoint = find_checkpoint(check_dir, args.resume_from)
    elif complete := sorted_checkpoints(check_dir):
        checkpoint = complete[-1]
    else:
        print_line(f"--resume: no complete checkpoint in {check_dir} yet, starting from the beginning")
        return Resume()
    tensors, saved = load_checkpoint_states(checkpoint)
    if "optimizer" not in tensors:
        raise UserError(
            f"{checkpoint} holds no optimizer state (it was written under FSDP or DeepSpeed); "
            + continue_from_weights(checkpoint)
        )
    check_resume_settings(saved["args"], args, checkpoint, print_line)
    trained_by = saved.get("processes", 1)
    if trained_by != processes:
        raise UserError(
            f"{checkpoint} was trained by {trained_by} processes; resume it with {trained_by}, not {processes} "
            "(the data order and random states are per process)"
        )
    resume = Resume(checkpoint, tensors, TrainingState.from_json(saved, checkpoint))
    if resume.state.epoch >= args.epochs:
        raise UserError(f"{checkpoint} already completed {resume.state.epoch} epochs; raise --epochs to train further")
    return resume


def continue_from_weights(checkpoint: Path) -> str:
    """The way on from a checkpoint without optimizer state: a new run that starts from its weights."""
    new_run = "--check-dir <a new folder>"
    if (Path(checkpoint) / "adapter_config.json").exists():
        merge = f"python export.py --adapter {checkpoint} --out <merged>"
        return f"merge its adapters into a model ({merge}) and start a new run from it: --model <merged> {new_run}"
    return f"start a new run from its weights: --model {checkpoint} {new_run}"


def check_resume_settings(
    saved: dict[str, Any], args: argparse.Namespace, checkpoint: Path, print_line: Callable[[str], None]
) -> None:
    """Settings that shape the data or the model must match the checkpoint's; others may change, and are logged."""
    for key in MUST_MATCH_ON_RESUME:
        if key == "targets_lora" and args.targets_lora == ["auto"]:
            continue  # the checkpoint's own adapters are loaded, on the layers they were made for
        if saved.get(key) != getattr(args, key):
            raise UserError(
                f"cannot resume: {checkpoint} was trained with {flag_name(key)} {saved.get(key)}, "
                f"not {getattr(args, key)}"
            )
    ignored = {"resume", "resume_from", "overwrite_output_dir"}
    changed = [
        f"{flag_name(key)} {saved.get(key)} -> {value}"
        for key, value in vars(args).items()
        if key not in ignored and key in saved and saved[key] != value
    ]
    if changed:
        print_line(f"resuming with changed settings: {'; '.join(changed)}")


def refuse_overwrites(args: argparse.Namespace, resume: Resume, total_steps: int) -> None:
    """Stop before training if this run would overwrite, prune or mix up another run's checkpoints or logs."""
    check_dir = Path(args.check_dir)
    start = (resume.state.global_step, resume.state.epoch)
    later = [p.name for p in sorted_checkpoints(check_dir) if checkpoint_progress(p) > start]
    if later or (not resume.checkpoint and not args.resume and (check_dir / "logs").exists()):
        found = f"checkpoints ({', '.join(later[-3:])})" if later else "the logs of another run"
        where = f"beyond {resume.checkpoint.name}" if resume.checkpoint else "from another run"
        raise UserError(f"{check_dir} holds {found} {where}; continue with --resume, or use another --check-dir")
    epochs = range(resume.state.epoch + 1, args.epochs + 1)
    planned = [check_dir / f"Epoch_{e}" for e in epochs if e % args.save_interval == 0 or e == args.epochs]
    if args.save_steps:
        steps = range(resume.state.global_step + 1, total_steps + 1)
        planned += [check_dir / f"Step_{s}" for s in steps if s % args.save_steps == 0]
    clashes = [p.name for p in planned if p.exists()]
    if clashes:
        raise UserError(f"{check_dir} holds {', '.join(clashes[:3])}, which this run would write; move them away")


def resume_command(argv: list[str], script: str = "train.py") -> str:
    """This run's command line with --resume in place of any flag that names where to resume from."""
    from cli import RESUME_FLAGS

    kept, drop_value = [], False
    for token in argv:
        if drop_value and not token.startswith("--"):
            drop_value = False
            continue
        name = token.split("=", 1)[0]
        drop_value = name in RESUME_FLAGS and "=" not in token
        if name not in RESUME_FLAGS:
            kept.append(token)
    return shlex.join(["python", script, *kept, "--resume"])
