"""Checkpoints, one contract: what a checkpoint holds, how it is written, found, vetted and resumed from.

    Checkpoints/Epoch_N/ and Step_N/ = the model (or its adapters) + tokenizer
                                       + training_state.pt   optimizer, scheduler, RNG: tensors only
                                       + trainer_state.json  position, metrics, settings; written last

Every folder is written as `<name>.tmp` and renamed into place, so a crash leaves a `.tmp` folder that
is never resumed from; a save that fills the disk removes its `.tmp` folder and says how much space it
needs. `trainer_state.json` carries a format version so that later versions can tell old checkpoints from
new ones, and a manifest of the other files (integrity.py): a checkpoint damaged after it was written is
told apart from an intact one, and `--resume` falls back to the newest intact one.

Resuming reloads weights, optimizer, schedule, every process's random state and the position in the
epoch: the rest of the run is bitwise the one an uninterrupted run makes.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from austen_gpt.cli import RESUME_FLAGS, CliError, UserError, first_line, flag_name
from austen_gpt.models.integrity import MANIFEST_FILE, MANIFEST_KEY, Manifest, check_folder, folder_problem
from austen_gpt.models.saving import EXPORT_NOTE, save_weights, tensor_bytes, weights_bytes, write_folder_atomically
from austen_gpt.settings import flat_settings
from austen_gpt.training.settings import TrainSettings
from austen_gpt.training.state import FORMAT_VERSION, TrainingState

TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, RNG: tensors only, loads with weights_only=True
TRAINER_STATE = MANIFEST_FILE  # position, metrics, settings, manifest; written last: it marks a complete checkpoint
# Settings that decide the data split, the batches or the model: a resumed run must keep them.
MUST_MATCH_ON_RESUME = ("model", "from_scratch", "data", "train_size", "seed", "max_input_length", "packing")
MUST_MATCH_ON_RESUME += ("batch_size", "grad_accum_steps", "lora", "qlora", "load_in_8bit", "rank_lora", "alpha_lora")
MUST_MATCH_ON_RESUME += ("targets_lora", "lora_dropout", "data_config", "data_split", "text_column", "split_by")
MUST_MATCH_ON_RESUME += ("whole_works", "self_play_rounds", "self_play_pairs", "self_play_prompt_tokens")
MUST_MATCH_ON_RESUME += ("self_play_new_tokens",)
SINCE = {
    "split_by": "paragraph",
    "whole_works": False,
    "self_play_rounds": 0,
    "self_play_pairs": 512,
    "self_play_prompt_tokens": 16,
    "self_play_new_tokens": 112,
}  # settings newer than some checkpoints: what those were trained with
RESUME_ELSEWHERE = "move that checkpoint away, or resume from an earlier one with --resume-from NAME"
DAMAGED = ".damaged"  # the suffix --resume gives a damaged checkpoint, so that it is never chosen again


def save_checkpoint(
    folder: Path,
    model,
    tokenizer,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model, tokenizer and tensor state, then the JSON state with the manifest of them all: written last,
    it marks the checkpoint complete."""

    def write(tmp: Path) -> None:
        manifest = Manifest()
        with manifest.safetensors_writes():
            save_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        manifest.write(tmp / TRAINING_STATE, lambda file: torch.save(training_state, file))
        state = {**trainer_state, MANIFEST_KEY: manifest.complete(tmp)}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")

    expected = weights_bytes(model, state_dict) + tensor_bytes(training_state)
    write_folder_atomically(folder, write, expected_bytes=expected)


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


def restore_states(states: dict[str, Any], accelerator, optimizer) -> None:
    """The optimizer's moments and step counts, the random states and the loss scale. Not the schedule: a
    step's rate is a function of the step and the flags (training.linear_schedule), and the resumed run's
    flags decide it; the saved schedule state only tells the resume line the rate it replaces."""
    optimizer.load_state_dict(states["optimizer"])
    check_optimizer_state_fits(optimizer)
    rng = states["rng"]
    set_rng_state(rng[accelerator.process_index] if isinstance(rng, list) else rng)  # one per process
    if accelerator.scaler is not None and "scaler" in states:  # fp16 now, fp16 then: else a fresh loss scale
        accelerator.scaler.load_state_dict(states["scaler"])


# ----------------------------------------------------------------------------------------------
# Finding checkpoints


def is_checkpoint(folder: Path) -> bool:
    """Complete and in place: a `.tmp` folder (a save not yet renamed) never counts, even when full."""
    in_place = not folder.name.endswith((".tmp", ".old", DAMAGED))
    return in_place and (folder / TRAINER_STATE).is_file() and (folder / TRAINING_STATE).is_file()


def checkpoint_progress(folder: Path) -> tuple[int, int] | None:
    """(global step, completed epochs): an epoch checkpoint sorts after a step checkpoint of the same
    step, since it also holds that epoch's validation. None when trainer_state.json cannot say."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_bytes().decode("utf-8"))
        return int(state["global_step"]), int(state["epoch"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def sorted_checkpoints(check_dir: Path, prefix: str = "") -> list[Path]:
    """Complete checkpoints, oldest first; one whose trainer_state.json is damaged has no place in the
    order and is left out (--resume sets it aside, pruning never touches it)."""
    folders = [p for p in check_dir.glob(f"{prefix}*") if is_checkpoint(p)] if check_dir.is_dir() else []
    return sorted((p for p in folders if checkpoint_progress(p)), key=checkpoint_progress)


def newest_intact_checkpoint(check_dir: Path, print_line: Callable[[str], None]) -> Path | None:
    """--resume's choice: the newest checkpoint whose files check out. A damaged one met on the way, and
    one whose trainer_state.json cannot be read, is renamed <name>.damaged, so that it is never chosen
    again and stays for inspection; a line names each one and the reason."""
    found = [p for p in check_dir.iterdir() if is_checkpoint(p)] if check_dir.is_dir() else []
    unordered = [p for p in found if checkpoint_progress(p) is None]
    for folder in [*unordered, *reversed(sorted_checkpoints(check_dir))]:
        problem = folder_problem(folder) or (f"{folder / TRAINER_STATE} holds no step" if folder in unordered else None)
        if problem is None:
            return folder
        print_line(f"{problem}: renamed it {set_aside(folder).name}, and looking for an older checkpoint")
    return None


def set_aside(folder: Path) -> Path:
    """`Step_300` becomes `Step_300.damaged` (or `.damaged-2`, ...): never resumed from, never deleted."""
    target, n = folder.with_name(folder.name + DAMAGED), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{DAMAGED}-{n}")
    folder.rename(target)
    return target


def list_checkpoints(check_dir: Path) -> list[str]:
    return [p.name for p in sorted_checkpoints(check_dir)]


def incomplete_checkpoints(check_dir: Path) -> list[str]:
    """Checkpoint folders an interrupted save left behind (no completion marker): never resumed from."""
    if not check_dir.is_dir():
        return []
    pattern = re.compile(r"(Epoch|Step|Round)_\d+(\.tmp|\.old)?")
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


def prune_step_checkpoints(check_dir: Path, keep: int, newest: Path) -> list[str]:
    """Delete all but the newest `keep` complete Step_N checkpoints, once `newest` (just saved) checks out
    against its manifest; incomplete and damaged folders are never touched. A `newest` that does not check
    out is set aside, and nothing is deleted: the previous checkpoint is then the last good one."""
    problem = folder_problem(newest)
    if problem:
        raise CliError(
            f"{problem} right after it was saved (a failing disk?); renamed it {set_aside(newest).name} and "
            "deleted no older checkpoint. Check the disk, then resume with --resume"
        )
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


def plan_resume(settings: TrainSettings, processes: int, print_line: Callable[[str], None]) -> Resume:
    """Find, load and vet the checkpoint to resume from (--resume or --resume-from), if any, for a run of
    `processes` processes."""
    out = settings.checkpoints
    check_dir = Path(out.check_dir)
    if not (out.resume or out.resume_from):
        return Resume()
    skipped = incomplete_checkpoints(check_dir)
    if skipped:
        print_line(f"ignoring incomplete checkpoints (an interrupted save): {', '.join(skipped)}")
    if out.resume_from:
        checkpoint = find_checkpoint(check_dir, out.resume_from)
    elif intact := newest_intact_checkpoint(check_dir, print_line):
        checkpoint = intact
    elif damaged := sorted(p.name for p in check_dir.glob(f"*{DAMAGED}*")):
        raise UserError(
            f"--resume: no intact checkpoint left in {check_dir} (damaged: {', '.join(damaged)}); "
            "start again with another --check-dir"
        )
    else:
        print_line(f"--resume: no complete checkpoint in {check_dir} yet, starting from the beginning")
        return Resume()
    tensors, saved = load_checkpoint_states(checkpoint)
    if "optimizer" not in tensors:
        raise UserError(
            f"{checkpoint} holds no optimizer state (it was written under FSDP or DeepSpeed); "
            + continue_from_weights(checkpoint)
        )
    check_resume_settings(saved["args"], flat_settings(settings), checkpoint, print_line)
    trained_by = saved.get("processes", 1)
    if trained_by != processes:
        raise UserError(
            f"{checkpoint} was trained by {trained_by} processes; resume it with {trained_by}, not {processes} "
            "(the data order and random states are per process)"
        )
    resume = Resume(checkpoint, tensors, TrainingState.from_json(saved, checkpoint))
    if resume.state.epoch >= planned_epochs(settings):
        if exported(Path(out.output_dir), resume.state):
            done = settings.self_play.self_play_rounds and f"{resume.state.epoch} self-play rounds"
            raise UserError(
                f"{checkpoint} already completed {done or f'{resume.state.epoch} epochs'}; "
                f"{'start a new self-play run from its final model' if done else 'raise --epochs'} to train further"
            )
        print_line(f"{checkpoint} completed the run, but its final model is not in {out.output_dir}: writing it")
    return resume


def planned_epochs(settings: TrainSettings) -> int:
    """The run's passes: --epochs over the training paragraphs, or --self-play-rounds (a round is self-play's epoch)."""
    return settings.self_play.self_play_rounds or settings.optimization.epochs


def exported(output_dir: Path, state: TrainingState) -> bool:
    """Whether `output_dir` holds the final model of the run that ended in `state` (its last step, epoch
    and validation numbers, as recorded beside the model)."""
    try:
        return json.loads((output_dir / EXPORT_NOTE).read_text())["last_step"] == state.last_point()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def continue_from_weights(checkpoint: Path) -> str:
    """The way on from a checkpoint without optimizer state: a new run that starts from its weights."""
    new_run = "--check-dir <a new folder>"
    if (Path(checkpoint) / "adapter_config.json").exists():
        merge = f"python export.py --adapter {checkpoint} --out <merged>"
        return f"merge its adapters into a model ({merge}) and start a new run from it: --model <merged> {new_run}"
    return f"start a new run from its weights: --model {checkpoint} {new_run}"


def check_resume_settings(
    saved: dict[str, Any], settings: dict[str, Any], checkpoint: Path, print_line: Callable[[str], None]
) -> None:
    """Settings (by flag name) that shape the data or the model must match the checkpoint's; others may change,
    and are logged."""
    for key in MUST_MATCH_ON_RESUME:
        if key == "targets_lora" and settings["targets_lora"] == ["auto"]:
            continue  # the checkpoint's own adapters are loaded, on the layers they were made for
        if saved.get(key, SINCE.get(key)) != settings[key]:
            raise UserError(
                f"cannot resume: {checkpoint} was trained with {flag_name(key)} {saved.get(key)}, not {settings[key]}"
            )
    ignored = {"resume", "resume_from", "overwrite_output_dir"}
    changed = [
        f"{flag_name(key)} {saved.get(key)} -> {value}"
        for key, value in settings.items()
        if key not in ignored and key in saved and saved[key] != value
    ]
    if changed:
        print_line(f"resuming with changed settings: {'; '.join(changed)}")


def refuse_overwrites(settings: TrainSettings, resume: Resume, total_steps: int) -> None:
    """Stop before training if this run would overwrite, prune or mix up another run's checkpoints or logs."""
    out, epochs = settings.checkpoints, planned_epochs(settings)
    check_dir = Path(out.check_dir)
    start = (resume.state.global_step, resume.state.epoch)
    later = [p.name for p in sorted_checkpoints(check_dir) if checkpoint_progress(p) > start]
    if later or (not resume.checkpoint and not out.resume and (check_dir / "logs").exists()):
        found = f"checkpoints ({', '.join(later[-3:])})" if later else "the logs of another run"
        where = f"beyond {resume.checkpoint.name}" if resume.checkpoint else "from another run"
        raise UserError(f"{check_dir} holds {found} {where}; continue with --resume, or use another --check-dir")
    to_come = range(resume.state.epoch + 1, epochs + 1)
    if settings.self_play.self_play_rounds:  # every round ends in a checkpoint
        planned = [check_dir / f"Round_{e}" for e in to_come]
    else:
        planned = [check_dir / f"Epoch_{e}" for e in to_come if e % out.save_interval == 0 or e == epochs]
    if out.save_steps:
        steps = range(resume.state.global_step + 1, total_steps + 1)
        planned += [check_dir / f"Step_{s}" for s in steps if s % out.save_steps == 0]
    clashes = [p.name for p in planned if p.exists()]
    if clashes:
        raise UserError(f"{check_dir} holds {', '.join(clashes[:3])}, which this run would write; move them away")


def resume_command(argv: list[str], script: str = "train.py") -> str:
    """This run's command line with --resume in place of any flag that names where to resume from."""

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
