"""Does the model write like the author, or is it copying her? A style report for models and texts.

  python style_report.py --models gpt2 models/austen-gpt2 --names base fine-tuned --out reports/gpt2
  python style_report.py --models configs/austen-tiny models/austen-tiny --from-scratch --names untrained trained  # CPU
  python style_report.py --texts chat=llama-samples.jsonl pastiche=pastiche.txt --out reports/others

Each model (a folder, a Hub id or an adapter folder) writes --n-samples continuations of the shipped
prompts (data/eval_prompts.txt, cycled in order, seeded), each exactly --max-new-tokens long (running on
past a paragraph's end, so every model is judged on the same length). Each --texts NAME=FILE adds a row
for text written anywhere else. Reported per row:
  1. distinguishability: the cross-validated ROC AUC of a classifier telling the texts from real held-out
     author passages of the same lengths, over --draws fresh draws (0.5: passes for the author, 1.0:
     always told apart), with its spread;
  2. P(author) from a classifier of held-out author text against contrast novels ("closer to the author
     than to the contrast authors"), with its accuracy on whole held-out novels;
  3. Burrows' Delta (cosine) from the texts to the author and to each contrast novel;
  4. copying: share of word 8-grams found verbatim in the training paragraphs, the longest verbatim
     run, character names per 1,000 words;
  5. distinct-1/2 and the within-sample repetition rate;
  6. for models only, held-out perplexity and bits per character on the validation paragraphs of --data.
Reference rows are measured the same way: real held-out author passages (the floor of distinguishability,
the ceiling of P(author)), held-out contrast passages, and the author's passages with their words shuffled.
The held-out author text is dealt three ways, disjoint: the classifier's, the two-sample test's, the author row's.
Output: <out>/report.md (table and verdict first, then samples), report.json and style.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from austen_gpt.cli import ArgumentParser, UserError, add_flag, quiet_libraries, require, run_cli
from austen_gpt.flags import REPO, add_sampling_flags, add_split_flags, data_path, sampling_rules
from austen_gpt.style.two_sample import TwoSampleTest

MIN_TEXTS = TwoSampleTest.MIN_TEXTS
N_SAMPLES = 48  # per model: the two-sample test's spread across draws stays under 0.05 (docs/style.md)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(p, "--models", nargs="+", default=[], help="model folders, Hub ids or adapter folders")
    add_flag(p, "--names", nargs="+", default=None, help="a label per model in the report; without it, the paths")
    add_flag(
        p,
        "--texts",
        nargs="+",
        default=[],
        metavar="NAME=FILE",
        help="a row for text written elsewhere (a prompted chat model, a human pastiche): FILE is a .jsonl with a "
        "'text' field or a .txt with samples separated by blank lines; measured like the models, bar perplexity",
    )
    add_flag(p, "--out", default="reports/style", help="report folder (report.md, report.json, style.png)")
    add_flag(p, "--overwrite", action="store_true", help="replace the files of an existing report in --out")
    add_flag(
        p,
        "--from-scratch",
        action="store_true",
        help="a config folder without weights gets the random weights train.py --from-scratch starts from "
        "(same --split-seed): the untrained baseline",
    )
    sampling = p.add_argument_group("sampling")
    add_flag(sampling, "--prompts", default=str(REPO / "data/eval_prompts.txt"), help="prompt file, one per line")
    add_flag(
        sampling,
        "--n-samples",
        type=int,
        default=N_SAMPLES,
        help="samples per model, cycling through the prompts (and passages per reference row)",
    )
    add_flag(sampling, "--max-new-tokens", type=int, default=200, help="tokens generated per sample")
    add_sampling_flags(sampling)
    add_flag(sampling, "--seed", type=int, default=42, help="sampling seed: the same seed gives the same report")
    add_flag(sampling, "--show-samples", type=int, default=3, help="samples per model printed in report.md")
    data = p.add_argument_group("data (as train.py)")
    add_split_flags(data, ("--split-seed",), "split_seed", "train.py's --split-seed of the fine-tuned model")
    add_flag(data, "--max-input-length", type=int, default=100, help="tokens per validation example, as trained")
    add_flag(data, "--batch-size", type=int, default=16, help="validation batch size")
    text = p.add_argument_group("style references")
    add_flag(text, "--author-novels", default=str(REPO / "data/austen"), help="folder of the author's novels (.txt)")
    add_flag(text, "--contrast-novels", default=str(REPO / "data/contrast"), help="folder of other authors' novels")
    add_flag(text, "--ngram", type=int, default=8, help="word n-gram length of the copying measure")
    add_flag(text, "--mfw", type=int, default=150, help="most frequent words in Burrows' Delta")
    add_flag(
        text,
        "--draws",
        type=int,
        default=5,
        help="fresh draws of real author passages for the two-sample test; its spread is across them",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Fail fast on bad input; returns the prompts."""
    require(
        [
            (args.models or args.texts, "give --models, --texts or both: the report needs something to measure"),
            (args.n_samples >= MIN_TEXTS, f"--n-samples must be at least {MIN_TEXTS} (five folds of two or more)"),
            (args.draws >= 1, "--draws must be at least 1"),
            (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (args.ngram >= 2 and args.mfw >= 10, "--ngram must be at least 2 and --mfw at least 10"),
            (0 < args.train_size < 1, "--train-size must be between 0 and 1, e.g. 0.9"),
            (args.names is None or len(args.names) == len(args.models), "give one --names label per --models entry"),
            *sampling_rules(args.top_k, args.top_p, args.temperature),
        ]
    )
    for model in args.models:  # a path-like name that does not exist is a typo, not a Hub id
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UserError(f"--models {model}: no such folder; give a model folder, adapter folder or Hub id")
    for spec in args.texts:
        name, _, file = spec.partition("=")
        if not name or not file:
            raise UserError(f"--texts {spec}: write NAME=FILE, e.g. --texts chat=samples.jsonl")
        if Path(file).suffix.lower() not in (".jsonl", ".txt") or not Path(file).is_file():
            raise UserError(f"--texts {spec}: {file} is not a .jsonl or .txt file; give an existing file of samples")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} already holds a report; choose another folder or pass --overwrite")
    from austen_gpt.sampling.generation import read_prompts

    return read_prompts(args.prompts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = check_args(args)
    # imported once the flags are good: torch and transformers take seconds, --help and a bad flag answer at once
    from austen_gpt.data.paragraphs import load_paragraphs, split_paragraphs
    from austen_gpt.style.report import (
        build_references,
        read_texts,
        reference_texts,
        sample_models,
        style_metrics,
        take_split_from_runs,
        write_report,
    )

    texts = read_texts(args.texts)
    for line in take_split_from_runs(args, parser.given_dests(argv)):
        print(line, flush=True)
    quiet_libraries()
    paragraphs = load_paragraphs(data_path(args.data), args.text_column, args.data_config, args.data_split)
    train, val = split_paragraphs(paragraphs, args.train_size, args.split_seed)
    sampled = sample_models(args, prompts, val)
    # the classifiers read passages as long as the first row's texts
    first = [s["text"] for s in sampled[0][1]] if sampled else next(iter(texts.values()))
    passage_words = max(20, round(sum(len(t.split()) for t in first) / len(first)))
    print(f"fitting the style classifiers on {passage_words}-word passages ...", flush=True)
    refs = build_references(args, train, val, passage_words)
    rows = []
    for row, samples in sampled:
        print(f"{row['name']}: measuring ...", flush=True)
        rows.append({**row, **style_metrics([s["text"] for s in samples], refs, [s["prompt"] for s in samples])})
    for spec, (name, row_texts) in zip(args.texts, texts.items(), strict=True):
        print(f"{name}: measuring ...", flush=True)
        rows.append({"name": name, "texts": spec.partition("=")[2], **style_metrics(row_texts, refs)})
    references = [
        {"name": name, **style_metrics(ref_texts, refs)}
        for name, ref_texts in reference_texts(refs, args.n_samples, passage_words, args.seed).items()
    ]
    samples = {row["name"]: row_samples for row, row_samples in sampled}
    write_report(Path(args.out), args, rows, references, refs, samples)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
