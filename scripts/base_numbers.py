"""Bits per character of a model on the held-out text configs/base-tiny/README.md reports, train.py's way
(one paragraph per example, from end-of-text, 128 tokens at most):

    python scripts/base_numbers.py configs/base-tiny                       # step 4 of scripts/pretrain_base.sh
    python scripts/base_numbers.py models/austen-tiny --corpus ""          # any model; no corpus at hand

1. the corpus's held-out works (configs/pretrain-base.yaml's split; skipped where the corpus is absent);
2. tests/fixtures/held-out-works: excerpts of three of them, in the repository (tests/test_base.py checks it);
3. Austen: the 1,000 held-out paragraphs of austen_dataset.pkl (train.py's default split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, importable from any folder
from austen_gpt.cli import quiet_libraries  # noqa: E402
from austen_gpt.data.paragraphs import load_paragraphs, load_split
from austen_gpt.flags import REPO
from austen_gpt.settings import DataSettings
from austen_gpt.style.report import held_out_perplexity, load_scored_model

HELD_OUT_EXCERPTS = REPO / "tests/fixtures/held-out-works"
CORPUS = REPO.parent / "shared/data/gutenberg"


def held_out_sets(corpus: str) -> dict[str, list[str]]:
    """{name: paragraphs} of the held-out text, in the README's order."""
    sets = {}
    if corpus and Path(corpus).is_dir():
        recipe = DataSettings(data=corpus, split_by="work", train_size=0.99)
        sets["held-out works of the corpus"] = load_split(recipe)[1]
    sets["tests/fixtures/held-out-works"] = load_paragraphs(HELD_OUT_EXCERPTS)
    sets["Austen, 1,000 held-out paragraphs"] = load_split(DataSettings())[1]
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder")
    parser.add_argument("--corpus", default=str(CORPUS), help="the pretraining corpus; '' leaves it out")
    args = parser.parse_args()
    quiet_libraries()
    model, tokenizer = load_scored_model(args.model)
    for name, paragraphs in held_out_sets(args.corpus).items():
        metrics = held_out_perplexity(model, tokenizer, paragraphs, 128, 32)
        print(f"{name}: {metrics['val_bits_per_char']:.3f} bits/char ({sum(map(len, paragraphs)):,} characters)")


if __name__ == "__main__":
    main()
