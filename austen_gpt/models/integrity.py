"""Is a model, adapter or checkpoint folder whole? Every file it will load, checked before anything loads it.

A checkpoint cut short by an interrupted copy, a full disk or a dying volume would otherwise end in a
library traceback deep inside the load, or worse, load quietly with damaged weights.

- A checkpoint carries a manifest: each file's size and CRC-32, in its trainer_state.json. The checksums
  are computed from the bytes as they are written (`Manifest`), so a save never reads its files back;
  a check reads every listed file once and compares.
- Any other folder (a Hugging Face model, an adapter, an export) is checked for what can be told without
  a manifest: each weights file's safetensors header must cover the file exactly (a truncated, empty or
  garbage file fails) and each JSON file must parse.
The first damaged file is named in one line, with the problem and what to do.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
import transformers.modeling_utils
from safetensors import safe_open
from safetensors.torch import save_file

from austen_gpt.cli import UserError, first_line

MANIFEST_FILE = "trainer_state.json"  # the checkpoint file that carries the manifest, written last
MANIFEST_KEY = "files"  # in it: {file name: {"size": bytes, "crc32": "8 hex digits"}}
CHUNK = 16 * 2**20
_intact: set[tuple] = set()  # folders checked in this process, with each file's size and mtime at the time


def check_folder(folder: Path, fix: str) -> None:
    """Raise a one-line UserError for the first damaged file in `folder`; `fix` says what to do about it
    (copy the folder again, resume from another checkpoint, ...)."""
    problem = folder_problem(folder)
    if problem:
        raise UserError(f"{problem}; {fix}")


def folder_problem(folder: Path) -> str | None:
    """'<file> is damaged (<why>)' for the first damaged file in `folder`, or None. Checked against the
    manifest when the folder has one. A folder whose files have not changed since it checked out in this
    process is not read again (loading a checkpoint asks three times: state, model, tokenizer)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    seen = (folder.resolve(), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if seen in _intact:
        return None
    manifest = recorded_manifest(folder)
    if manifest is not None:
        problem = manifest_problem(folder, manifest)
    else:
        problem = next(filter(None, map(file_problem, files)), None)
    if problem is None:
        _intact.add(seen)
    return problem


def file_problem(path: Path) -> str | None:
    """What a file that no manifest describes can be caught at: a safetensors file that its header does
    not cover, or JSON that does not parse."""
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
    elif path.suffix == ".json":
        problem = json_problem(path)
    else:
        return None
    return f"{path} is damaged ({problem})" if problem else None


def safetensors_problem(path: Path) -> str | None:
    """Why the file is not a complete safetensors file, or None. Reads the header only."""

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


# ---- the manifest: written with a checkpoint, checked before it is used ------------------------------


def recorded_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest in the folder's trainer_state.json, if it has one that parses (checkpoints of this
    project; older checkpoints and other folders have none)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_bytes()).get(MANIFEST_KEY)
    except (OSError, ValueError, AttributeError):  # none, unreadable, not JSON, not a JSON object
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_problem(folder: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} is damaged ({size:,} bytes, {expected['size']:,} when saved)"
        if file_crc32(path) != expected["crc32"]:
            return f"{path} is damaged (its checksum differs from the one saved with it)"
    return None


def file_crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class Manifest:
    """Sizes and CRC-32s of the files of a folder being written, from the bytes on their way to disk.

    CRC-32 (zlib, about 4 GB/s on one core) catches truncation, zeroed blocks and bit rot; it is not a
    defence against deliberate tampering, which is not what it is for.
    """

    def __init__(self):
        self.files: dict[str, dict[str, Any]] = {}

    def _add(self, path: Path, size: int, crc: int) -> None:
        self.files[path.name] = {"size": size, "crc32": f"{crc:08x}"}

    def write(self, path: Path, write: Callable[[BinaryIO], Any]) -> None:
        """`write(file)` fills `path` (torch.save, say), through a file object that checksums what passes."""
        with path.open("wb") as f:
            tee = _ChecksummingWriter(f)
            write(tee)
        self._add(path, tee.size, tee.crc)

    @contextmanager
    def safetensors_writes(self) -> Iterator[None]:
        """Checksum each safetensors file that transformers or peft saves meanwhile.

        Both write weights with safetensors' save_file, which writes from Rust, out of reach of a Python
        file object. It is wrapped here (where the two libraries bound it) by one that checksums the
        8-byte length, the header (read back: a few KB) and then the tensors in memory in the header's
        order, which is the file's byte stream. Anything a later release writes some other way is read
        back by `complete` instead: never a wrong checksum, at worst a slower one.
        """

        def checksummed_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
            save_file(tensors, filename, metadata=metadata)
            self._add_safetensors(Path(filename), tensors)

        # peft saves only once something imported it (it is imported lazily: models/lora.py)
        peft_model = sys.modules.get("peft.peft_model")
        modules = [m for m in (transformers.modeling_utils, peft_model) if hasattr(m, "safe_save_file")]
        saved = [m.safe_save_file for m in modules]
        for module in modules:
            module.safe_save_file = checksummed_save_file
        try:
            yield
        finally:
            for module, original in zip(modules, saved, strict=True):
                module.safe_save_file = original

    def _add_safetensors(self, path: Path, tensors: dict) -> None:

        with path.open("rb") as f:
            length = f.read(8)
            header = f.read(int.from_bytes(length, "little"))
        crc, size = zlib.crc32(header, zlib.crc32(length)), len(length) + len(header)
        layout = {name: entry for name, entry in json.loads(header).items() if name != "__metadata__"}
        for name in sorted(layout, key=lambda name: layout[name]["data_offsets"][0]):
            data = tensors[name].detach().reshape(-1).view(torch.uint8).cpu().numpy()
            crc, size = zlib.crc32(data, crc), size + data.nbytes
        if size == path.stat().st_size:  # else leave it to `complete`, which reads the file
            self._add(path, size, crc)

    def complete(self, folder: Path) -> dict[str, dict[str, Any]]:
        """The manifest of every file in `folder`; the few that other code wrote (config, tokenizer files:
        kilobytes to a few megabytes) are checksummed by reading them."""
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.name not in self.files:
                self.files[path.name] = {"size": path.stat().st_size, "crc32": file_crc32(path)}
        return self.files


class _ChecksummingWriter:
    """A write-only file object that checksums and counts what passes through it."""

    def __init__(self, file: BinaryIO):
        self.file, self.crc, self.size = file, 0, 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc, self.size = zlib.crc32(view, self.crc), self.size + view.nbytes
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()
