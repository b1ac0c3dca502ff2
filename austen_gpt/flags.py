"""Flag groups every script shares, with their defaults in one place: which paragraphs, and which of them train."""

from __future__ import annotations

from pathlib import Path

from austen_gpt.cli import add_flag
from austen_gpt.settings import DEFAULT_DATA, DataSettings, SamplingSettings

REPO = Path(__file__).resolve().parents[1]  # the project folder: the default dataset, configs and novels
DATA, SAMPLING = DataSettings(), SamplingSettings()  # the defaults
DATA_HELP = (
    "paragraphs: .pkl, .txt, .jsonl, .json, .csv (also .gz or .zst), .parquet, .arrow, a folder of .txt, "
    "a Dataset.save_to_disk folder or a Hub dataset id"
)


def add_split_flags(group, seed_flags: tuple[str, ...], seed_dest: str, seed_help: str) -> None:
    """--data, its source flags, --train-size and the seed of the split: the same paragraphs and the same split
    in train.py, the style report and the tokenizer, from the same defaults."""
    add_flag(group, "--data", default=DEFAULT_DATA, help=DATA_HELP)
    add_source_flags(group)
    add_flag(
        group,
        "--train-size",
        type=float,
        default=DATA.train_size,
        help="share of paragraphs for training; the rest validate",
    )
    group.add_argument(*seed_flags, dest=seed_dest, type=int, default=DATA.seed, metavar="N", help=seed_help)


def data_path(data: str) -> Path | str:
    """--data as given; the default, the bundled dataset, is found from any working folder."""
    if data == DEFAULT_DATA and not Path(DEFAULT_DATA).exists():
        return REPO / DEFAULT_DATA
    return data


def add_source_flags(group) -> None:
    """--data-config, --data-split and --text-column: which part of --data holds the paragraphs."""
    add_flag(group, "--data-config", default=DATA.data_config, help="configuration (subset) of a Hub dataset --data")
    add_flag(
        group,
        "--data-split",
        default=DATA.data_split,
        help="split of a Hub dataset or a saved DatasetDict; none given: train",
    )
    add_flag(
        group,
        "--text-column",
        default=DATA.text_column,
        help="column or field with the text; none given: text, else sentence",
    )


def add_sampling_flags(group, temperature: bool = True) -> None:
    """--top-k, --top-p and --temperature: how each token is drawn, with the same defaults in every script.
    (How long a sample runs differs on purpose: inference.py's --max-length 300 and one paragraph, the style
    report's --max-new-tokens 200 running past paragraph ends, train.py's --max-output-length 200.)"""
    add_flag(group, "--top-k", type=int, default=SAMPLING.top_k, help="sample from the k likeliest tokens; 0 disables")
    add_flag(group, "--top-p", type=float, default=SAMPLING.top_p, help="nucleus sampling probability mass")
    if temperature:
        add_flag(
            group,
            "--temperature",
            type=float,
            default=SAMPLING.temperature,
            help="softmax temperature; lower is more conservative",
        )


def sampling_rules(top_k: int, top_p: float, temperature: float = 1.0, prefix: str = "--") -> list[tuple[bool, str]]:
    """The checks of add_sampling_flags' settings, for `require`; `prefix` names them as flags or session
    commands (':')."""
    return [
        (top_k >= 0, f"{prefix}top-k must be 0 (off) or more"),
        (0 < top_p <= 1, f"{prefix}top-p must be in (0, 1], e.g. 0.95"),
        (temperature > 0, f"{prefix}temperature must be positive, e.g. 0.8"),
    ]
