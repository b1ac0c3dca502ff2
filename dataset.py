"""Loading, splitting and tokenizing an author's paragraphs; building austen_dataset.pkl.

    python dataset.py build                      # data/austen/*.txt -> austen_dataset.pkl
    python dataset.py build --src novels/ --out my_author.pkl
    python dataset.py tokenizer                  # configs/austen-tiny: a 4K BPE of Austen and a small model
    python dataset.py tokenizer --config configs/base-tiny-tokenizer.yaml   # the offline base's, on gutenberg/

How a paragraph becomes a training example: austen_gpt/data/tokens.py and data/README.md.
"""

from __future__ import annotations

from pathlib import Path

from austen_gpt.cli import ArgumentParser, UserError, run_cli
from austen_gpt.data.paragraphs import build_dataset, split_data
from austen_gpt.flags import REPO, add_corpus_flags, add_split_flags
from austen_gpt.settings import DataSettings, from_flags

# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,tokenizer}")
    build = commands.add_parser(
        "build", run_files=True, help="turn a folder of plain-text novels into a paragraph pickle"
    )
    build.add_argument("--src", type=Path, default=Path("data/austen"), help="folder of .txt novels")
    build.add_argument("--out", type=Path, default=Path("austen_dataset.pkl"), help="output pickle")
    tokenizer = commands.add_parser(
        "tokenizer",
        run_files=True,
        help="train a small byte-level BPE on the training split, with a model config beside it",
    )
    add_split_flags(tokenizer, ("--split-seed", "--seed"), "seed", "train.py's --split-seed: fit on its split only")
    add_corpus_flags(tokenizer)
    tokenizer.add_argument("--vocab-size", type=int, default=4096, help="tokens in all: 256 bytes, end-of-text, merges")
    tokenizer.add_argument(
        "--model-config",
        type=Path,
        default=REPO / "configs/gpt2-tiny/config.json",
        help="the model config to adapt (--config FILE.json reads as this)",
    )
    tokenizer.add_argument("--layers", type=int, default=2, help="transformer blocks in the written config")
    tokenizer.add_argument(
        "--positions",
        type=int,
        default=None,
        help="positions (context) in the written config (default: --model-config's)",
    )
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
    from austen_gpt.data.bpe import save_tokenizer_and_config, train_bpe

    if args.vocab_size < 257 + 1 or not 0 < args.train_size < 1:
        raise UserError("--vocab-size must exceed 257 (bytes and end-of-text) and --train-size lie in (0, 1)")
    if args.layers < 1 or not 0 <= args.dropout < 1 or (args.positions is not None and args.positions < 2):
        raise UserError("--layers must be at least 1, --positions at least 2 and --dropout lie in [0, 1)")
    if not args.model_config.is_file():
        raise UserError(
            f"--model-config {args.model_config}: no such file; give a model's config.json as the architecture"
        )
    train = split_data(from_flags(DataSettings, args)).train
    tokenizer = train_bpe(train, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_and_config(tokenizer, args.model_config, args.out, args.layers, args.dropout, args.positions)
    chars = sum(len(p) for p in train)
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(train))
    print(
        f"wrote {args.out}: {tokenizer.get_vocab_size():,} tokens, "
        f"{chars / tokens:.2f} characters per token on the training split"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
