"""Paragraphs from columnar data: parquet and Arrow files, a `Dataset.save_to_disk` folder, a Hub dataset.

    python train.py --data my_author.parquet --text-column body
    python train.py --data saved_dataset/ --data-split train            # Dataset.save_to_disk output
    python train.py --data some-user/gothic-novels --data-config en --data-split train

Each becomes a list of texts, one per row of the text column: --text-column, else the first of `text` and
`sentence` present. pyarrow reads files; 🤗 datasets reads saved folders and the Hub (its own cache first;
offline, an uncached dataset is named in one line with the way to get it). Imports are lazy, so the
bundled Austen pickle never pays for them.
"""

from __future__ import annotations

from pathlib import Path

from austen_gpt.cli import UserError, first_line

TEXT_FIELDS = ("text", "sentence")  # "sentence" is the original project's key
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def text_column(columns: list[str], wanted: str | None, where: str) -> str:
    """The column that holds the text: `wanted` if given, else the first of TEXT_FIELDS present."""
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{where} has no column '{wanted}'; its columns are {', '.join(columns)}")
        return wanted
    for field in TEXT_FIELDS:
        if field in columns:
            return field
    raise UserError(
        f"{where} has no 'text' or 'sentence' column; its columns are {', '.join(columns)}: name one with --text-column"
    )


def texts_from_table_file(path: Path, wanted: str | None) -> list:
    """The text column of a .parquet file or an .arrow file (IPC stream or file format, as datasets writes)."""
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".parquet":
            column = text_column(pyarrow.parquet.read_schema(path).names, wanted, str(path))
            return pyarrow.parquet.read_table(path, columns=[column]).column(column).to_pylist()
        with pa.memory_map(str(path)) as source:
            try:
                table = pyarrow.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pyarrow.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable {path.suffix[1:]} file ({first_line(err)}); check it") from None
    return table.column(text_column(table.column_names, wanted, str(path))).to_pylist()


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SAVED_DATASET_FILES)


def texts_from_saved_dataset(folder: Path, split: str, wanted: str | None) -> list:
    """The text column of a `Dataset.save_to_disk` folder (a DatasetDict's `split`)."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except Exception as err:  # damaged or from an incompatible datasets release: the types vary
        raise UserError(f"{folder} is not a readable saved dataset ({first_line(err)}); save it again") from None
    if isinstance(dataset, DatasetDict):
        dataset = pick_split(dataset, split, str(folder))
    return dataset[text_column(dataset.column_names, wanted, str(folder))]


def texts_from_hub(name: str, config: str | None, split: str, wanted: str | None) -> list:
    """The text column of a Hub dataset's `split`, through datasets.load_dataset (cached copies first)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as err:  # not found, offline, no such config or split: the types vary by release
        raise UserError(hub_error(name, err)) from None
    return dataset[text_column(dataset.column_names, wanted, name)]


def hub_error(name: str, err: Exception) -> str:
    reason = first_line(err)
    if "offline" in reason.lower() or "connect" in reason.lower() or "resolve" in reason.lower():
        return (
            f"--data '{name}' is neither a local path nor a dataset in the Hugging Face cache, and the Hub is "
            f"unreachable ({reason}); on a connected machine run `hf download --repo-type dataset {name}` or "
            "save it with Dataset.save_to_disk, and pass that folder"
        )
    return f"--data '{name}': the Hub dataset cannot be loaded ({reason}); check it, --data-config and --data-split"


def pick_split(splits, split: str, where: str):
    if split not in splits:
        raise UserError(f"{where} has no split '{split}'; its splits are {', '.join(splits)}: pass --data-split")
    return splits[split]
