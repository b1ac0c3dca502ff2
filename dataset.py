"""Loading, splitting and tokenizing an author's paragraphs; building austen_dataset.pkl.

    python dataset.py build                      # data/austen/*.txt -> austen_dataset.pkl
    python dataset.py build --src novels/ --out my_author.pkl
    python dataset.py tokenizer                  # configs/austen-tiny: a 4K BPE and the quickstart model (bpe.py)

A training example is one paragraph framed by the tokenizer's own special tokens: its begin-of-text token
before it (Llama's `<|begin_of_text|>`), or its end-of-text token where it has no separate one (GPT-2's
`<|endoftext|>`, Qwen's), and end-of-text after it: `<|endoftext|> paragraph <|endoftext|>` for GPT-2.
The leading token tells the model "a new text starts here", as between documents in pre-training; the
closing one is a real target, so the model learns where a paragraph ends. No tokens are added to the
vocabulary, so the embedding matrix (and a LoRA adapter) keeps its size.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

from cli import ArgumentParser, UserError, run_cli
from sources import TEXT_FIELDS, add_source_flags

REPO = Path(__file__).resolve().parent
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

    a .pkl/.txt/.jsonl/.json/.csv file (also .gz- or .zst-compressed), a .parquet or .arrow
    file, a folder of .txt files, a `Dataset.save_to_disk` folder, or a Hugging Face Hub dataset id. Records
    and rows give their `text_column` (default: `text`, else `sentence`); `config` and `split` (default:
    train) pick a Hub dataset's configuration and split, `split` also a saved DatasetDict's.
    """
    import sources

    split = split or "train"
    name, path = str(path), Path(path)
    suffix = path.suffix.lower()
    inner = Path(path.stem).suffix.lower() if suffix in COMPRESSED else suffix
    if path.is_dir():
        if sources.is_saved_dataset(path):
            texts = sources.texts_from_saved_dataset(path, split, text_column)
        else:
            files = sorted(path.glob("*.txt"))
            if not files:
                raise UserError(
                    f"folder {path} holds no .txt files and no saved dataset; --data takes a file, a folder of "
                    ".txt files, a Dataset.save_to_disk folder or a Hub dataset id"
                )
            texts = [p for file in files for p in blank_line_paragraphs(read_text(file))]
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


def text_chars(paragraphs: list[str]) -> int:
    """Characters of the paragraphs as trained on: +1 each, the closing end-of-text stands for the break."""
    return sum(len(p) + 1 for p in paragraphs)


# ----------------------------------------------------------------------------------------------
# Tokenization and batching


def chunk_with_overlap(tokens: list[int], block_size: int) -> list[list[int]]:
    """Cut a token sequence into blocks of at most `block_size` that overlap by one token.

    The first token of a block is context only (a causal LM predicts token i from tokens < i), so
    the one-token overlap makes every token after the very first a prediction target exactly once.
    """
    stride = block_size - 1
    return [tokens[start : start + block_size] for start in range(0, max(len(tokens) - 1, 1), stride)]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, from one call into the Rust tokenizer, parallel over all cores.

    Calling the backend directly skips the Python wrapper's per-text bookkeeping (a quarter of the
    time on the Austen corpus); the ids are the same. The wrapper stays in charge when the tokenizer
    is not a fast one or its tokenizer.json asks for truncation or padding, which the wrapper turns off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def paragraph_frame(tokenizer) -> tuple[int, int]:
    """(start, end): the token ids before and after a paragraph, begin-of-text (end-of-text where the
    tokenizer has no begin-of-text token) and end-of-text."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return start, tokenizer.eos_token_id


def tokenize_paragraphs(tokenizer, paragraphs: list[str], block_size: int, pack: bool = False) -> list[list[int]]:
    """Token blocks of at most `block_size`, tokenized in one batched call of the fast tokenizer.

    pack=False: one `<start> paragraph <end>` per example (long ones cut in several), padded per batch.
    pack=True: `<start> p1 <end> <start> p2 <end> ...` in corpus order (one token between paragraphs where
    start and end are the same, as in GPT-2), cut into full blocks, so no compute is spent on padding; a
    paragraph is read after the one before it in `paragraphs` (not its neighbour in the novel across a
    held-out paragraph or between novels).
    """
    start, end = paragraph_frame(tokenizer)
    encoded = encode_batch(tokenizer, paragraphs)
    if pack:
        stream = [start]
        for ids in encoded:
            if stream[-1] != start:
                stream.append(start)
            stream.extend(ids)
            stream.append(end)
        return chunk_with_overlap(stream, block_size)
    return [block for ids in encoded for block in chunk_with_overlap([start, *ids, end], block_size)]


def cache_key(tokenizer, paragraphs: list[str], block_size: int, pack: bool) -> str:
    """A hash of everything that decides the token blocks: the text, the tokenizer and the settings."""
    digest = hashlib.sha256(json.dumps({"format": 1, "block_size": block_size, "pack": pack}).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())  # vocabulary, merges, normalization
    digest.update(str(paragraph_frame(tokenizer)).encode())
    for paragraph in paragraphs:
        digest.update(paragraph.encode() + b"\0")
    return digest.hexdigest()[:32]


def tokenize_cached(tokenizer, paragraphs: list[str], block_size: int, pack: bool, cache_dir: Path | None):
    """tokenize_paragraphs, remembered in `cache_dir` under a hash of its inputs (None: no cache).

    The blocks are stored as two integer tensors (torch.load(weights_only=True) reads them back); a
    damaged entry is rebuilt, and entries are written to a temporary file and renamed into place.
    """
    import torch

    if cache_dir is None:
        return tokenize_paragraphs(tokenizer, paragraphs, block_size, pack)
    path = Path(cache_dir).expanduser() / f"blocks-{cache_key(tokenizer, paragraphs, block_size, pack)}.pt"
    try:
        cached = torch.load(path, weights_only=True)
        return [chunk.tolist() for chunk in cached["tokens"].split(cached["lengths"].tolist())]
    except Exception:  # missing or damaged: (re)build it
        pass
    blocks = tokenize_paragraphs(tokenizer, paragraphs, block_size, pack)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = torch.tensor([t for block in blocks for t in block], dtype=torch.int32)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"tokens": tokens, "lengths": torch.tensor([len(b) for b in blocks])}, tmp)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk costs speed, not the run
        pass
    return blocks


def collate(examples: list[list[int]], pad_id: int, unpredicted: int | None = None) -> dict[str, Any]:
    """Right-pad a batch; padding gets label -100 by the attention mask (pad may equal end-of-text).

    `unpredicted` (a begin-of-text token distinct from end-of-text, see paragraph_frame) gets -100 too: it
    always follows end-of-text in packed blocks, so predicting it teaches nothing and would flatter the loss.
    """
    import torch

    if not examples:  # a process's empty share of a last batch: one token, which has no target
        examples = [[pad_id]]
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example)
        attention_mask[row, : len(example)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if unpredicted is not None:
        labels = labels.masked_fill(input_ids == unpredicted, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def unpredicted_token(tokenizer) -> int | None:
    """The framing token that is never a target: begin-of-text where it differs from end-of-text, else none
    (GPT-2's one end-of-text token is both the end of a paragraph, a real target, and the next one's start)."""
    start, end = paragraph_frame(tokenizer)
    return start if start != end else None


def example_targets(example: list[int], unpredicted: int | None = None) -> int:
    """The prediction targets in one example, as collate labels them: every token after the first, but
    `unpredicted` ones."""
    targets = example[1:]
    return len(targets) - (targets.count(unpredicted) if unpredicted is not None else 0)


class EpochBatches:
    """One process's batches of an epoch, a pure function of (seed, epoch, process, number of processes).

    The epoch's order is a fresh permutation drawn from seed + epoch (seed None: corpus order, for
    validation), cut into global batches of batch_size x processes examples; process r takes the r-th
    slice of each. The last, short global batch is shared out as evenly as possible. So every example
    is read exactly once per epoch, whatever the number of processes, and every process runs the
    same number of steps (a process whose share is empty gets an empty batch: see collate). Resuming
    at epoch N replays epoch N's order exactly; `skip` leaves out the batches already trained on.
    `targets`: each example's prediction targets (example_targets), for window_targets.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int | None,
        rank: int = 0,
        processes: int = 1,
        targets: list[int] | None = None,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.processes, self.targets = rank, processes, targets
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[list[int]]:
        """Every process's examples of each batch of the epoch, skipped ones included."""
        import torch

        if self.seed is None:
            order = list(range(self.size))
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        step = self.batch_size * self.processes
        return [order[start : start + step] for start in range(0, self.size, step)]

    def window_targets(self, accumulate: int) -> list[int]:
        """For each batch of the epoch, the prediction targets of its whole accumulation window of `accumulate`
        batches, every process's examples counted.

        Host integers, known before any forward: every process knows the whole epoch's order, so none waits
        for a device, or for another process, to learn them.
        """
        per_batch = [sum(self.targets[i] for i in chunk) for chunk in self.global_batches()]
        windows = [max(1, sum(per_batch[i : i + accumulate])) for i in range(0, len(per_batch), accumulate)]
        return [windows[i // accumulate] for i in range(len(per_batch))]

    def __iter__(self):
        for chunk in self.global_batches()[self.skip :]:
            n = len(chunk)  # = batch_size x processes except in the last global batch
            yield chunk[self.rank * n // self.processes : (self.rank + 1) * n // self.processes]

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size * self.processes))


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,tokenizer}")
    build = commands.add_parser("build", help="turn a folder of plain-text novels into a paragraph pickle")
    build.add_argument("--src", type=Path, default=Path("data/austen"), help="folder of .txt novels")
    build.add_argument("--out", type=Path, default=Path("austen_dataset.pkl"), help="output pickle")
    tokenizer = commands.add_parser(
        "tokenizer", help="train a small byte-level BPE on the training split, with a model config beside it"
    )
    tokenizer.add_argument(
        "--data", default=str(REPO / "austen_dataset.pkl"), help="the paragraphs, as train.py's --data"
    )
    add_source_flags(tokenizer)
    tokenizer.add_argument(
        "--train-size", type=float, default=0.9, help="train.py's --train-size: fit on that split only"
    )
    tokenizer.add_argument("--seed", type=int, default=42, help="train.py's --seed, which draws the split")
    tokenizer.add_argument("--vocab-size", type=int, default=4096, help="tokens in all: 256 bytes, end-of-text, merges")
    tokenizer.add_argument(
        "--config", type=Path, default=REPO / "configs/gpt2-tiny/config.json", help="the model config to adapt"
    )
    tokenizer.add_argument("--layers", type=int, default=2, help="transformer blocks in the written config")
    tokenizer.add_argument("--dropout", type=float, default=0.0, help="dropout in the written config")
    tokenizer.add_argument("--out", type=Path, default=REPO / "configs/austen-tiny", help="output folder")
    args = parser.parse_args(argv)
    return build_command(args) if args.command == "build" else tokenizer_command(args)


def build_command(args) -> int:
    records = build_dataset(args.src, args.out)
    words = sum(len(r["sentence"].split()) for r in records)
    novels = len({r["novel"] for r in records})
    print(f"wrote {args.out}: {len(records):,} paragraphs, {words:,} words from {novels} novels")
    return 0


def tokenizer_command(args) -> int:
    from bpe import save_tokenizer_and_config, train_bpe

    if args.vocab_size < 257 + 1 or not 0 < args.train_size < 1:
        raise UserError("--vocab-size must exceed 257 (bytes and end-of-text) and --train-size lie in (0, 1)")
    if args.layers < 1 or not 0 <= args.dropout < 1:
        raise UserError("--layers must be at least 1 and --dropout lie in [0, 1)")
    if not args.config.is_file():
        raise UserError(f"--config {args.config}: no such file; give a model's config.json as the architecture")
    paragraphs = load_paragraphs(args.data, args.text_column, args.data_config, args.data_split)
    train, _ = split_paragraphs(paragraphs, args.train_size, args.seed)
    tokenizer = train_bpe(train, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_and_config(tokenizer, args.config, args.out, args.layers, args.dropout)
    chars = sum(len(p) for p in train)
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(train))
    print(
        f"wrote {args.out}: {tokenizer.get_vocab_size():,} tokens, "
        f"{chars / tokens:.2f} characters per token on the training split"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
