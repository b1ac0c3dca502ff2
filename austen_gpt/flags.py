"""Flag groups every script shares, with their defaults in one place: which paragraphs, and which of them train."""

from __future__ import annotations

from pathlib import Path

from austen_gpt.cli import add_flag, add_setting
from austen_gpt.settings import DEFAULT_DATA, DEFAULT_PRECISION, PRECISIONS, DataSettings, SamplingSettings

REPO = Path(__file__).resolve().parents[1]  # the project folder: the default dataset, configs and novels
DATA, SAMPLING = DataSettings(), SamplingSettings()  # the defaults
SPLIT_BY = ("paragraph", "work")
SPLIT_BY_HELP = (
    "what validation holds out whole: paragraphs, or works (each .txt file of a --data folder, subfolders "
    "included), so that validation is text never read, as a pretraining corpus needs"
)
WHOLE_WORKS_HELP = (
    "with --split-by work, train on each work as one document (paragraphs joined by blank lines, end-of-text "
    "between works), as pretraining reads a corpus; validation stays one paragraph per example"
)
KEEP_OUT_HELP = (
    "data that --data must not hold (the author a base is later fine-tuned on): refused if any of its paragraphs "
    "of 100 characters or more is in --data, on either side of the split"
)
DATA_HELP = (
    "paragraphs: .pkl, .txt, .jsonl, .json, .csv (also .gz or .zst), .parquet, .arrow, a folder of .txt, "
    "a Dataset.save_to_disk folder or a Hub dataset id"
)


def add_split_flags(group, seed_flags: tuple[str, ...], seed_dest: str, seed_help: str) -> None:
    """--data, its source flags, --train-size and the seed of the split: the same paragraphs and the same split
    in train.py, the style report and the tokenizer, from the same defaults."""
    add_setting(group, "--data", DATA, DATA_HELP)
    add_source_flags(group)
    add_setting(group, "--train-size", DATA, "share of paragraphs for training; the rest validate")
    add_setting(group, "--split-by", DATA, SPLIT_BY_HELP, choices=SPLIT_BY)
    group.add_argument(*seed_flags, dest=seed_dest, type=int, default=DATA.seed, metavar="N", help=seed_help)


def data_path(data: str) -> Path | str:
    """--data as given; the default, the bundled dataset, is found from any working folder."""
    if data == DEFAULT_DATA and not Path(DEFAULT_DATA).exists():
        return REPO / DEFAULT_DATA
    return data


def add_corpus_flags(group) -> None:
    """--whole-works and --keep-out: how a pretraining corpus is read, in train.py and the tokenizer's fit alike."""
    add_setting(group, "--whole-works", DATA, WHOLE_WORKS_HELP)
    add_setting(group, "--keep-out", DATA, KEEP_OUT_HELP, metavar="DATA", nargs="*")  # a run file's [] is none


def add_source_flags(group) -> None:
    """--data-config, --data-split and --text-column: which part of --data holds the paragraphs."""
    add_setting(group, "--data-config", DATA, "configuration (subset) of a Hub dataset --data")
    add_setting(group, "--data-split", DATA, "split of a Hub dataset or a saved DatasetDict; none given: train")
    add_setting(group, "--text-column", DATA, "column or field with the text; none given: text, else sentence")


def add_precision_flag(group, what: str = "") -> None:
    """--precision, the same choices and default in train.py and bench.py; `what` says what it sets, if not all."""
    add_flag(
        group,
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help=f"{what}auto: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32",
    )


def add_sampling_flags(group, temperature: bool = True) -> None:
    """--top-k, --top-p and --temperature: how each token is drawn, with the same defaults in every script.
    (How long a sample runs differs on purpose: inference.py's --max-length 300 and one paragraph, the style
    report's --max-new-tokens 200 running past paragraph ends, train.py's --max-output-length 200.)"""
    add_setting(group, "--top-k", SAMPLING, "sample from the k likeliest tokens; 0 disables")
    add_setting(group, "--top-p", SAMPLING, "nucleus sampling probability mass")
    if temperature:
        add_setting(group, "--temperature", SAMPLING, "softmax temperature; lower is more conservative")


def sampling_rules(top_k: int, top_p: float, temperature: float = 1.0, prefix: str = "--") -> list[tuple[bool, str]]:
    """The checks of add_sampling_flags' settings, for `require`; `prefix` names them as flags or session
    commands (':')."""
    return [
        (top_k >= 0, f"{prefix}top-k must be 0 (off) or more"),
        (0 < top_p <= 1, f"{prefix}top-p must be in (0, 1], e.g. 0.95"),
        (temperature > 0, f"{prefix}temperature must be positive, e.g. 0.8"),
    ]
