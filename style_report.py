"""Does the model write like the author, or is it copying her? A style report for models and texts.

  python style_report.py --models gpt2 models/austen-gpt2 --names base fine-tuned --out reports/gpt2
  python style_report.py --models configs/austen-tiny models/austen-tiny-scratch --from-scratch --names random trained
  python style_report.py --texts chat=llama-samples.jsonl pastiche=pastiche.txt --out reports/others
  python style_report.py --models models/austen-gpt2 --few-shot-models gpt2 Qwen/Qwen2.5-0.5B-Instruct --few-shot 0 3 10

Each model (a folder, a Hub id or an adapter folder) writes --n-samples continuations of the shipped
prompts (data/eval_prompts.txt, cycled in order, seeded), each exactly --max-new-tokens long (running on
past a paragraph's end, so every model is judged on the same length). Each --few-shot-models entry adds a
row per --few-shot K: the same prompts, each after K excerpts of the training split (a chat model in its
template, its answer ending at the end of its turn; docs/prompting.md). Each --texts NAME=FILE adds a row
for text written anywhere else. Reported per row:
  1. distinguishability: the cross-validated ROC AUC of a classifier telling the texts from real held-out
     author passages of the same lengths, over --draws fresh draws (0.5: passes for the author, 1.0:
     always told apart), with its spread;
  2. P(author) from a classifier of held-out author text against contrast novels ("closer to the author
     than to the contrast authors"), with its accuracy on whole held-out novels;
  3. Burrows' Delta (cosine) from the texts to the author and to each contrast novel;
  4. copying: share of word 8-grams found verbatim in the training paragraphs, the longest verbatim
     run, character names per 1,000 words; for few-shot rows also the share found in the sample's own excerpts;
  5. distinct-1/2 and the within-sample repetition rate;
  6. for models only, held-out perplexity and bits per character on the validation paragraphs of --data
     (few-shot rows: the model's own, without excerpts).
Reference rows are measured the same way: real held-out author passages (the floor of distinguishability,
the ceiling of P(author)), held-out contrast passages, and the author's passages with their words shuffled.
The held-out author text is dealt three ways, disjoint: the classifier's, the two-sample test's, the author row's.
Output: <out>/report.md (table and verdict first, then samples), report.json and style.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from austen_gpt.cli import ArgumentParser, add_flag, quiet_libraries, run_cli
from austen_gpt.flags import add_sampling_flags, add_split_flags
from austen_gpt.settings import DataSettings, SamplingSettings, from_flags
from austen_gpt.style.settings import ReferenceSettings, ReportSettings, check_report_settings

DEFAULTS = ReportSettings()  # the flags' defaults are the settings' own


def build_parser() -> ArgumentParser:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(p, "--models", nargs="+", default=DEFAULTS.models, help="model folders, Hub ids or adapter folders")
    add_flag(p, "--names", nargs="+", default=None, help="a label per model in the report; without it, the paths")
    add_flag(
        p,
        "--texts",
        nargs="+",
        default=DEFAULTS.texts,
        metavar="NAME=FILE",
        help="a row for text written elsewhere (a prompted chat model, a human pastiche): FILE is a .jsonl with a "
        "'text' field or a .txt with samples separated by blank lines; measured like the models, bar perplexity",
    )
    add_flag(p, "--out", default=DEFAULTS.out, help="report folder (report.md, report.json, style.png)")
    add_flag(p, "--overwrite", action="store_true", help="replace the files of an existing report in --out")
    add_flag(
        p,
        "--from-scratch",
        action="store_true",
        help="a config folder without weights gets the random weights train.py --from-scratch starts from "
        "(same --split-seed): the untrained baseline",
    )
    few = p.add_argument_group("few-shot rows: models prompted with the author's excerpts (docs/prompting.md)")
    add_flag(
        few, "--few-shot-models", nargs="+", default=DEFAULTS.few_shot_models, help="model folders, Hub ids or adapters"
    )
    add_flag(few, "--few-shot-names", nargs="+", default=None, help="a label per few-shot model; without it, the paths")
    add_flag(
        few,
        "--few-shot",
        nargs="+",
        type=int,
        default=DEFAULTS.few_shot,
        metavar="K",
        help="numbers of excerpts: a row for each K and model",
    )
    add_flag(
        few, "--author", default=None, help="the author a chat model is asked to write as (bundled data: Jane Austen)"
    )
    add_flag(few, "--instruction", default=None, help="a chat model's instruction (default: continue as --author)")
    rerank = p.add_argument_group("rerank rows: samples kept by the model's judge (docs/inference.md)")
    add_flag(
        rerank,
        "--rerank",
        nargs="+",
        type=int,
        default=DEFAULTS.rerank,
        metavar="N",
        help="candidates per sample: a row for each --models entry and N, each sample one of N kept by the judge, "
        "as inference.py --rerank N",
    )
    add_flag(
        rerank,
        "--rerank-choice",
        nargs="+",
        choices=["sample", "best"],
        default=DEFAULTS.rerank_choice,
        help="sample: a candidate drawn in proportion to the judge's odds; best: its likeliest; a row for each",
    )
    add_flag(
        rerank,
        "--rerank-temperature",
        type=float,
        default=DEFAULTS.rerank_temperature,
        help="the temperature on the judge's odds of --rerank-choice sample",
    )
    sampling = p.add_argument_group("sampling")
    add_flag(sampling, "--prompts", default=DEFAULTS.prompts, help="prompt file, one per line")
    add_flag(
        sampling,
        "--n-samples",
        type=int,
        default=DEFAULTS.n_samples,
        help="samples per model, cycling through the prompts (and passages per reference row)",
    )
    tokens = DEFAULTS.sampling.max_new_tokens
    add_flag(sampling, "--max-new-tokens", type=int, default=tokens, help="tokens generated per sample")
    add_sampling_flags(sampling)
    add_flag(
        sampling, "--seed", type=int, default=DEFAULTS.seed, help="sampling seed: the same seed gives the same report"
    )
    add_flag(
        sampling,
        "--show-samples",
        type=int,
        default=DEFAULTS.show_samples,
        help="samples per model printed in report.md",
    )
    data = p.add_argument_group("data (as train.py)")
    add_split_flags(data, ("--split-seed",), "split_seed", "train.py's --split-seed of the fine-tuned model")
    length = DEFAULTS.data.max_input_length
    add_flag(data, "--max-input-length", type=int, default=length, help="tokens per validation example, as trained")
    add_flag(data, "--batch-size", type=int, default=DEFAULTS.batch_size, help="validation batch size")
    text, refs = p.add_argument_group("style references"), DEFAULTS.references
    add_flag(text, "--author-novels", default=refs.author_novels, help="folder of the author's novels (.txt)")
    add_flag(text, "--contrast-novels", default=refs.contrast_novels, help="folder of other authors' novels")
    add_flag(text, "--ngram", type=int, default=refs.ngram, help="word n-gram length of the copying measure")
    add_flag(text, "--mfw", type=int, default=refs.mfw, help="most frequent words in Burrows' Delta")
    add_flag(
        text,
        "--draws",
        type=int,
        default=refs.draws,
        help="fresh draws of real author passages for the two-sample test; its spread is across them",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def report_settings(args: argparse.Namespace) -> ReportSettings:
    """The parsed flags as the report's settings (the report's --split-seed is train.py's seed of the split)."""
    return ReportSettings(
        **{name: getattr(args, name) for name in ("models", "names", "texts", "out", "overwrite", "from_scratch")},
        **{name: getattr(args, name) for name in ("few_shot_models", "few_shot_names", "few_shot", "author")},
        instruction=args.instruction,
        **{name: getattr(args, name) for name in ("rerank", "rerank_choice", "rerank_temperature")},
        prompts=args.prompts,
        n_samples=args.n_samples,
        sampling=replace(from_flags(SamplingSettings, args), paragraphs=DEFAULTS.sampling.paragraphs),
        seed=args.seed,
        show_samples=args.show_samples,
        data=from_flags(DataSettings, argparse.Namespace(**{**vars(args), "seed": args.split_seed})),
        batch_size=args.batch_size,
        references=from_flags(ReferenceSettings, args),
    )


def given_split_settings(given_dests: set[str]) -> set[str]:
    """The split settings the command line gives, by DataSettings' names."""
    return {"seed" if dest == "split_seed" else dest for dest in given_dests}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    settings = report_settings(parser.parse_args(argv))
    check_report_settings(settings)
    quiet_libraries()
    # imported once the flags are good: torch and transformers take seconds, --help and a bad flag answer at once
    from austen_gpt.style.report import run_report, take_split_from_runs

    given = given_split_settings(parser.given_dests(argv))
    settings.data, lines = take_split_from_runs(settings.data, settings.models + settings.few_shot_models, given)
    print("\n".join(lines), flush=True)
    print(f"report: {run_report(settings)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
