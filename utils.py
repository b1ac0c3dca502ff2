"""Model, tokenizer and checkpoint I/O: Hub ids or local folders, safe loading, atomic checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from cli import UserError, first_line

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
TRAINING_STATE = "training_state.pt"  # optimizer, scheduler, RNG: tensors only, loads with weights_only=True
TRAINER_STATE = "trainer_state.json"  # epoch, step, metrics, args; written last, so it marks a complete checkpoint


# ----------------------------------------------------------------------------------------------
# Models and tokenizers from the Hub or from local folders


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine gets an answer now, not after a minute of Hub retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_source(name: str) -> str:
    """A local folder for `name`: the folder itself, or the cached snapshot of a Hub id.

    Resolving the cache ourselves means a cached model loads with no network request at all (Hub
    lookups retry for about a minute when offline). An uncached Hub id is returned as is, to download.
    """
    from huggingface_hub import snapshot_download

    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if _looks_like_path(name):
        raise UserError(f"model folder {name} does not exist; check the path")
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (the exception type differs across huggingface_hub versions)
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(
            f"'{name}' is neither a local folder nor in the Hugging Face cache, and the Hub is unreachable; "
            "download it on a connected machine (hf download NAME --local-dir DIR) and pass that folder, "
            "or train the offline config: --model configs/gpt2-tiny --from-scratch"
        )
    return name


def from_hub_or_folder(load: Callable[..., Any], name: str, **kwargs) -> Any:
    """`load(source)` for a local folder, cached Hub id or Hub download; failures become one UserError line."""
    source = local_source(name)
    try:
        return load(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load '{name}' ({first_line(err)})") from None


def has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in WEIGHT_FILES)


def load_tokenizer(name: str):
    """The model's own tokenizer; GPT-2 has no pad token, so padding reuses end-of-text (masked by attention)."""
    from transformers import AutoTokenizer

    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        # transformers would quietly build an empty-vocabulary tokenizer from config.json alone
        raise UserError(
            f"{name} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); save the tokenizer beside the model"
        )
    tokenizer = from_hub_or_folder(AutoTokenizer.from_pretrained, name)
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"the tokenizer of {name} has no end-of-text token; this project needs one to mark paragraph ends"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, from_scratch: bool = False, **load_kwargs):
    """Pretrained weights from a Hub id or folder; random weights only when `from_scratch` is asked for.

    `load_kwargs` go to `from_pretrained` (e.g. a bitsandbytes quantization_config and device_map).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(name).expanduser()
    if from_scratch:
        config = from_hub_or_folder(AutoConfig.from_pretrained, name)
        return AutoModelForCausalLM.from_config(config)
    if folder.is_dir() and not (folder / "config.json").exists():
        raise UserError(f"{name} is not a model folder (no config.json); pass a Hub id or a saved model folder")
    if folder.is_dir() and not has_weights(folder):
        raise UserError(
            f"{name} has a config but no weights; add --from-scratch to train it from random weights, "
            "or pass a folder with model.safetensors"
        )
    return from_hub_or_folder(AutoModelForCausalLM.from_pretrained, name, **load_kwargs)


# ----------------------------------------------------------------------------------------------
# RNG state as plain tensors (so checkpoints load with torch.load(weights_only=True))


def rng_state() -> dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: Checkpoints/Epoch_N/ = model + tokenizer + training_state.pt + trainer_state.json


def is_checkpoint(folder: Path) -> bool:
    """Complete and in place: a `.tmp` folder (a save not yet renamed) never counts, even when full."""
    in_place = not folder.name.endswith((".tmp", ".old"))
    return in_place and (folder / TRAINER_STATE).is_file() and (folder / TRAINING_STATE).is_file()


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


def save_checkpoint(
    folder: Path,
    model,
    tokenizer,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model, tokenizer, tensor state and JSON state; the JSON goes last and marks the checkpoint complete.

    `state_dict`: the model's weights when they are not in `model` itself (gathered from FSDP shards).
    """

    def write(tmp: Path) -> None:
        save_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")

    write_folder_atomically(folder, write)


def save_model_folder(
    folder: Path,
    model,
    tokenizer,
    replace: bool = False,
    notes: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """A model (or adapter) folder that plain transformers/peft load, written atomically.

    `notes` maps file names to JSON-serializable content written beside the model; `state_dict` as in
    save_checkpoint.
    """

    def write(tmp: Path) -> None:
        save_weights(model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    write_folder_atomically(folder, write, replace=replace)


def find_checkpoint(check_dir: Path, restore_file: str) -> Path:
    """`--restore-file Epoch_2` names a folder in `--check-dir` (or any path to a checkpoint folder)."""
    for candidate in (check_dir / restore_file, Path(restore_file)):
        if is_checkpoint(candidate):
            return candidate
    if (check_dir / restore_file).exists() or Path(restore_file).exists():
        raise UserError(
            f"{restore_file} is not a complete checkpoint (no {TRAINER_STATE}); "
            f"pick one of: {list_checkpoints(check_dir)}"
        )
    raise UserError(f"checkpoint {restore_file} not found in {check_dir}; pick one of: {list_checkpoints(check_dir)}")


def list_checkpoints(check_dir: Path) -> list[str]:
    return [p.name for p in sorted_checkpoints(check_dir)]


def checkpoint_progress(folder: Path) -> tuple[int, int]:
    """(global step, completed epochs): an epoch checkpoint sorts after a step checkpoint of the same
    step, since it also holds that epoch's validation."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    return state["global_step"], state["epoch"]


def sorted_checkpoints(check_dir: Path, prefix: str = "") -> list[Path]:
    """Complete checkpoints, oldest first."""
    folders = [p for p in check_dir.glob(f"{prefix}*") if is_checkpoint(p)] if check_dir.is_dir() else []
    return sorted(folders, key=checkpoint_progress)


def incomplete_checkpoints(check_dir: Path) -> list[str]:
    """Checkpoint folders an interrupted save left behind (no completion marker): never resumed from."""
    if not check_dir.is_dir():
        return []
    pattern = re.compile(r"(Epoch|Step)_\d+(\.tmp|\.old)?")
    return sorted(p.name for p in check_dir.iterdir() if pattern.fullmatch(p.name) and not is_checkpoint(p))


def prune_step_checkpoints(check_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete Step_N checkpoints; incomplete folders are not touched."""
    doomed = sorted_checkpoints(check_dir, prefix="Step_")[:-keep]
    for folder in doomed:
        shutil.rmtree(folder)
    return [folder.name for folder in doomed]


def load_checkpoint_states(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training_state tensors, trainer_state JSON) of a checkpoint; no pickled objects are executed."""
    try:
        training_state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    except Exception as err:  # damaged or foreign files: say which, never execute them
        raise UserError(f"checkpoint {folder} cannot be read ({first_line(err)}); resume from another") from None
    return training_state, trainer_state
