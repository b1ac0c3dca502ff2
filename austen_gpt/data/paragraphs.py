"""An author's paragraphs: novels split into paragraphs, austen_dataset.pkl built and read safely, other
formats (JSONL, JSON, CSV, text, columnar, Hub), and the seeded train/validation split.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from austen_gpt.cli import UserError
from austen_gpt.data import sources
from austen_gpt.data.sources import TEXT_FIELDS
from austen_gpt.flags import data_path
from austen_gpt.settings import DataSettings

DATA_SUFFIXES = (".pkl", ".txt", ".jsonl", ".json", ".csv", ".parquet", ".arrow")
COMPRESSED = (".gz", ".zst")  # around any of the formats above but .parquet and .arrow
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "owner/name" or "name"

# ----------------------------------------------------------------------------------------------
# Building the bundled dataset from plain-text novels


_HEADING = re.compile(r"(VOLUME|CHAPTER)\s+[IVXLC\d]+\.?", re.IGNORECASE)
_END_MARKERS = {"THE END", "FINIS", "A NOTE ON THE TEXT"}  # everything from here on is not the novel
_SMALL_WORDS = {"and", "of", "the"}


def novel_title(path: Path) -> str:
    """`pride_and_prejudice.txt` -> `Pride and Prejudice`."""
    words = path.stem.split("_")
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def blank_line_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, each with its lines joined by single spaces."""
    blocks = re.split(r"\n[ \t]*\n", text)
    return [p for p in (" ".join(block.split()) for block in blocks) if p]


def novel_paragraphs(text: str) -> list[str]:
    """The novel's own paragraphs: no title page, headings, closing matter, editors' notes or italics marks."""
    paragraphs = blank_line_paragraphs(text)
    # The title page is everything before the first VOLUME/CHAPTER heading.
    start = next((i for i, p in enumerate(paragraphs) if _HEADING.fullmatch(p)), 0)
    kept = []
    for paragraph in paragraphs[start:]:
        if paragraph.upper() in _END_MARKERS:
            break
        if _HEADING.fullmatch(paragraph):
            continue
        if paragraph.startswith("[") and paragraph.endswith("]"):  # an editor's bracketed note
            continue
        kept.append(paragraph.replace("_", ""))  # _italic_ -> italic
    return kept


def build_records(src: Path) -> list[dict[str, str]]:
    """One `{"sentence", "novel"}` record per paragraph of every `*.txt` novel in `src`, in name order."""
    files = sorted(src.glob("*.txt"))
    if not files:
        raise UserError(f"no .txt novels in {src}; point --src at a folder of plain-text novels")
    return [
        {"sentence": paragraph, "novel": novel_title(path)}
        for path in files
        for paragraph in novel_paragraphs(read_text(path))
    ]


def build_dataset(src: Path, out: Path) -> list[dict[str, str]]:
    """Write the records as a pickle of builtins only; the same novels always give the same bytes."""
    records = build_records(src)
    out.write_bytes(pickle.dumps(records, protocol=4))
    return records


# ----------------------------------------------------------------------------------------------
# Reading user data


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed if it ends in .gz or .zst."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    suffix = path.suffix.lower()
    if suffix not in COMPRESSED:
        return data
    try:
        if suffix == ".gz":
            return gzip.decompress(data)
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except Exception as err:  # truncated or damaged: gzip, zlib and zstandard raise different types
        raise UserError(f"{path} is not a readable {suffix[1:]} file ({err}); check or recompress it") from None


def read_text(path: Path) -> str:
    try:
        return read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); re-save it as UTF-8"
        ) from None


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples and strings; refuses every class or function reference.

    A pickle can name any importable callable and have it run on load (that is how pickle
    payloads work), so a dataset file must never get to import anything.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise UserError(
            f"refusing to unpickle {module}.{name} from {self.path}: pickled datasets may hold only "
            "lists of strings or of dicts (pickles can run code); convert it to .jsonl or .csv, "
            "e.g. pandas: df.to_json('data.jsonl', orient='records', lines=True)"
        )

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path


def record_text(record: Any, where: str, wanted: str | None) -> str:
    """The text of one record: a string, or a dict's `wanted` field (default: `text`, else `sentence`)."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for field in (wanted,) if wanted else TEXT_FIELDS:
            if isinstance(record.get(field), str):
                return record[field]
        raise UserError(
            f"{where} has no '{wanted or 'text'}' string field; its fields are {', '.join(record)}"
            + ("" if wanted else ": name one with --text-column")
        )
    raise UserError(f"{where} is a {type(record).__name__}, not a string or an object with a text field")


def _records_from_pickle(path: Path) -> list[Any]:
    data = read_bytes(path)
    try:
        records = _BuiltinsOnlyUnpickler(io.BytesIO(data), path).load()
    except UserError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; none of them runs code
        raise UserError(f"{path} is not a readable pickle ({err}); convert it to .jsonl or .csv") from None
    if not isinstance(records, (list, tuple)):
        raise UserError(f"{path} holds a {type(records).__name__}; expected a list of strings or dicts")
    return list(records)


def _records_from_jsonl(path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line") from None
    return records


def _records_from_json(path: Path) -> list[Any]:
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}; expected a list of strings or objects")
    return records


def _records_from_csv(path: Path) -> list[Any]:
    return list(csv.DictReader(io.StringIO(read_text(path)), restval=""))


_READERS = {
    ".pkl": _records_from_pickle,
    ".jsonl": _records_from_jsonl,
    ".json": _records_from_json,
    ".csv": _records_from_csv,
}


def load_paragraphs(
    path: str | Path, text_column: str | None = None, config: str | None = None, split: str | None = None
) -> list[str]:
    """Every non-empty paragraph of --data, which may be:

    a .pkl/.txt/.jsonl/.json/.csv file (also .gz- or .zst-compressed), a .parquet or .arrow file, a folder of
    .txt files (subfolders too, in path order), a `Dataset.save_to_disk` folder, or a Hugging Face Hub dataset id.
    Records and rows give their `text_column` (default: `text`, else `sentence`); `config` and `split` (default:
    train) pick a Hub dataset's configuration and split, `split` also a saved DatasetDict's.
    """

    split = split or "train"
    name, path = str(path), Path(path)
    suffix = path.suffix.lower()
    inner = Path(path.stem).suffix.lower() if suffix in COMPRESSED else suffix
    if path.is_dir():
        if sources.is_saved_dataset(path):
            texts = sources.texts_from_saved_dataset(path, split, text_column)
        else:
            texts = [p for _, work in folder_works(path) for p in work]
    elif path.is_file():
        if suffix in (".parquet", ".arrow"):
            texts = sources.texts_from_table_file(path, text_column)
        elif inner == ".txt":
            texts = blank_line_paragraphs(read_text(path))
        elif inner in _READERS:
            records = _READERS[inner](path)
            texts = [record_text(r, f"{path} record {i + 1}", text_column) for i, r in enumerate(records)]
        else:
            raise UserError(
                f"{path} has an unknown extension; --data accepts {', '.join(DATA_SUFFIXES)}, all but .parquet "
                f"and .arrow also as {' or '.join(COMPRESSED)}, a folder, or a Hub dataset id"
            )
    elif suffix not in DATA_SUFFIXES + COMPRESSED and HUB_ID.fullmatch(name):
        texts = sources.texts_from_hub(name, config, split, text_column)
    else:
        raise UserError(f"data file {path} does not exist; pass --data with a path to your dataset or a Hub dataset id")
    paragraphs = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not paragraphs:
        raise UserError(f"{name} holds no non-empty paragraph; check the data and its text field")
    return paragraphs


def folder_works(folder: Path) -> list[tuple[str, list[str]]]:
    """(name, paragraphs) of every .txt file under `folder`, subfolders too (an author's folder of works), in
    path order; a work's name is its path inside `folder`."""
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise UserError(
            f"folder {folder} holds no .txt files (subfolders included) and no saved dataset; --data takes a "
            "file, a folder of .txt files, a Dataset.save_to_disk folder or a Hub dataset id"
        )
    return [(file.relative_to(folder).as_posix(), blank_line_paragraphs(read_text(file))) for file in files]


def split_paragraphs(paragraphs: list[str], train_size: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/validation split by whole paragraph, before tokenization: no paragraph on both sides."""
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    n_train = round(len(paragraphs) * train_size)
    if not 0 < n_train < len(paragraphs):
        empty = "validation" if n_train else "training"
        raise UserError(
            f"--train-size {train_size} leaves the {empty} split empty for {len(paragraphs)} paragraphs; "
            "use a value further from 0/1 or more data"
        )
    return [paragraphs[i] for i in sorted(order[:n_train])], [paragraphs[i] for i in sorted(order[n_train:])]


def split_works(works: list[tuple[str, list[str]]], train_size: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) works' names, split by whole work: works drawn in a seeded order are held out
    until they hold 1 - train_size of the characters, so that validation is text never read, not paragraphs
    from the middle of books trained on."""
    order = list(range(len(works)))
    random.Random(seed).shuffle(order)
    sizes = [sum(len(p) for p in paragraphs) for _, paragraphs in works]
    wanted, held, held_chars = (1 - train_size) * sum(sizes), [], 0
    for index in order:
        if held_chars >= wanted:
            break
        held.append(index)
        held_chars += sizes[index]
    if not 0 < len(held) < len(works):
        raise UserError(
            f"--split-by work: --train-size {train_size} leaves the {'training' if held else 'validation'} side "
            f"without a work among {len(works)}; it needs two works or more and a --train-size further from 0/1"
        )
    val = {works[i][0] for i in held}
    return [name for name, _ in works if name not in val], [name for name, _ in works if name in val]


@dataclass
class Split:
    """The paragraphs each side trains on or validates (training: one text per work, with --whole-works), and
    each side's works where the split is by work."""

    train: list[str]
    val: list[str]
    train_works: list[str] = field(default_factory=list)
    val_works: list[str] = field(default_factory=list)
    whole_works: bool = False

    def describe(self) -> str:
        unit = "works" if self.whole_works else "paragraphs"
        line = f"{len(self.train):,} training {unit} / {len(self.val):,} validation paragraphs"
        if self.val_works:
            line += f" from {len(self.train_works):,} / {len(self.val_works):,} works (held out whole)"
        return line


def split_data(data: DataSettings) -> Split:
    """`data`'s paragraphs split as train.py splits them: by paragraph, or by work (data.split_by); refused if
    they hold data.keep_out's."""
    path = data_path(data.data)
    if data.whole_works and data.split_by != "work":
        raise UserError("--whole-works trains on the works of a --split-by work split: add --split-by work")
    if data.split_by == "paragraph":
        paragraphs = load_paragraphs(path, data.text_column, data.data_config, data.data_split)
        refuse_kept_out(paragraphs, data.keep_out)
        return Split(*split_paragraphs(paragraphs, data.train_size, data.seed))
    if not Path(path).is_dir() or sources.is_saved_dataset(Path(path)):
        raise UserError(
            f"--split-by work needs --data to be a folder of .txt files, one per work ({path} is not); "
            "use --split-by paragraph for other data"
        )
    works = folder_works(Path(path))
    refuse_kept_out([p for _, paragraphs in works for p in paragraphs], data.keep_out)
    train_works, val_works = split_works(works, data.train_size, data.seed)
    held, sides = set(val_works), ([], [])
    for name, paragraphs in works:
        if data.whole_works and name not in held:
            sides[0].append("\n\n".join(paragraphs))  # one document: end-of-text frames the work, not each paragraph
        else:
            sides[name in held].extend(paragraphs)
    return Split(sides[0], sides[1], train_works, val_works, data.whole_works)


def load_split(data: DataSettings) -> tuple[list[str], list[str]]:
    """(training, validation) paragraphs of `data`, split as train.py splits them."""
    split = split_data(data)
    return split.train, split.val


def refuse_kept_out(paragraphs: list[str], keep_out: list[str], shortest: int = 100) -> None:
    """Refuse `paragraphs` that hold any paragraph of `shortest` characters or more of the data in `keep_out`
    (an author a base must never read). Short ones ("CHAPTER I", "Yes.") recur between any two books."""
    for path in keep_out:
        kept = {p for p in load_paragraphs(data_path(path)) if len(p) >= shortest}
        shared = [p for p in paragraphs if len(p) >= shortest and p in kept]
        if shared:
            raise UserError(
                f"--data shares {len(shared):,} paragraphs with --keep-out {path} (one begins "
                f"{shared[0][:50]!r}): it must not read that data; remove it from --data"
            )


def text_chars(paragraphs: list[str]) -> int:
    """Characters of the paragraphs as trained on: +1 each, the closing end-of-text stands for the break."""
    return sum(len(p) + 1 for p in paragraphs)
