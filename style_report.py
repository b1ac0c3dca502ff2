"""Does the model write like the author, or is it copying her? A style report for one or more models.

  python style_report.py --models gpt2 models/austen-gpt2 --names base fine-tuned --out reports/gpt2
  python style_report.py --models configs/gpt2-tiny models/austen-tiny --from-scratch --names untrained trained  # CPU

Each model (a folder, a Hub id or an adapter folder) writes --n-samples continuations of the shipped
prompts (data/eval_prompts.txt, cycled in order, seeded), each exactly --max-new-tokens long (running on
past a paragraph's end, so every model is judged on the same length). Reported per model:
  1. held-out perplexity and bits per character on the validation paragraphs of --data (the split
     train.py makes with the same --train-size and --split-seed), per real token, pads excluded;
  2. P(author) from a classifier of the author's novels against contrast novels, with its accuracy on
     whole held-out novels (flagged unreliable below 90%);
  3. Burrows' Delta (cosine) from the samples to the author and to each contrast novel;
  4. copying: share of word 8-grams found verbatim in the training paragraphs, the longest verbatim
     run, character names per 1,000 words;
  5. distinct-1/2 and the within-sample repetition rate.
Real held-out author paragraphs (the ceiling) and held-out contrast paragraphs (the floor) are scored
the same way. Output: <out>/report.md (table first, then samples), report.json and style.png.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cli import ArgumentParser, UserError, add_flag, quiet_libraries, require, run_cli

REPO = Path(__file__).resolve().parent
CONTRAST_HELD_OUT = 0.1  # the last tenth of each contrast novel is kept away from the classifier and Delta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_flag(p, "--models", nargs="+", required=True, help="model folders, Hub ids or adapter folders")
    add_flag(p, "--names", nargs="+", default=None, help="a label per model in the report; without it, the paths")
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
    add_flag(sampling, "--n-samples", type=int, default=24, help="samples per model, cycling through the prompts")
    add_flag(sampling, "--max-new-tokens", type=int, default=200, help="tokens generated per sample")
    add_flag(sampling, "--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    add_flag(sampling, "--top-p", type=float, default=0.95, help="nucleus sampling probability mass")
    add_flag(sampling, "--temperature", type=float, default=1.0, help="softmax temperature")
    add_flag(sampling, "--seed", type=int, default=42, help="sampling seed: the same seed gives the same report")
    add_flag(sampling, "--show-samples", type=int, default=3, help="samples per model printed in report.md")
    data = p.add_argument_group("data (as train.py)")
    add_flag(data, "--data", default=str(REPO / "austen_dataset.pkl"), help="the paragraphs the models trained on")
    add_flag(data, "--train-size", type=float, default=0.9, help="train.py's --train-size of the fine-tuned model")
    add_flag(data, "--split-seed", type=int, default=42, help="train.py's --seed of the fine-tuned model")
    add_flag(data, "--max-input-length", type=int, default=100, help="tokens per validation example, as trained")
    add_flag(data, "--batch-size", type=int, default=16, help="validation batch size")
    style = p.add_argument_group("style references")
    add_flag(style, "--author-novels", default=str(REPO / "data/austen"), help="folder of the author's novels (.txt)")
    add_flag(style, "--contrast-novels", default=str(REPO / "data/contrast"), help="folder of other authors' novels")
    add_flag(style, "--ngram", type=int, default=8, help="word n-gram length of the copying measure")
    add_flag(style, "--mfw", type=int, default=150, help="most frequent words in Burrows' Delta")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Fail fast on bad input; returns the prompts."""
    require(
        [
            (args.n_samples >= 1, "--n-samples must be at least 1"),
            (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (args.ngram >= 2 and args.mfw >= 10, "--ngram must be at least 2 and --mfw at least 10"),
            (0 < args.train_size < 1, "--train-size must be between 0 and 1, e.g. 0.9"),
            (args.names is None or len(args.names) == len(args.models), "give one --names label per --models entry"),
            (0 <= args.top_p <= 1 and args.temperature > 0, "--top-p must be in [0, 1] and --temperature positive"),
        ]
    )
    for model in args.models:  # a path-like name that does not exist is a typo, not a Hub id
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UserError(f"--models {model}: no such folder; give a model folder, adapter folder or Hub id")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} already holds a report; choose another folder or pass --overwrite")
    from generation import read_prompts

    return read_prompts(args.prompts)


@dataclass
class References:
    """Everything the models are measured against, built once."""

    train_paragraphs: list[str]
    val_paragraphs: list[str]
    contrast_held_out: dict[str, list[str]]
    contrast_train: dict[str, list[str]]
    classifier: object  # style.AuthorClassifier
    delta: object  # style.Delta
    copying: object  # style.Copying


def build_references(args: argparse.Namespace, passage_words: int) -> References:
    import style
    from dataset import load_paragraphs, split_paragraphs

    train, val = split_paragraphs(load_paragraphs(args.data), args.train_size, args.split_seed)
    held_out = set(val)
    author = {t: [p for p in ps if p not in held_out] for t, ps in style.load_novels(args.author_novels).items()}
    contrast = style.load_novels(args.contrast_novels)
    cut = {title: round(len(ps) * (1 - CONTRAST_HELD_OUT)) for title, ps in contrast.items()}
    contrast_train = {title: ps[: cut[title]] for title, ps in contrast.items()}
    contrast_held_out = {title: ps[cut[title] :] for title, ps in contrast.items()}
    author_names, all_names = style.names_to_mask(train, contrast)
    return References(
        train_paragraphs=train,
        val_paragraphs=val,
        contrast_held_out=contrast_held_out,
        contrast_train=contrast_train,
        classifier=style.AuthorClassifier.fit(author, contrast_train, passage_words, all_names),
        delta=style.Delta(author | contrast_train, all_names, n_words=args.mfw),
        copying=style.Copying(train, author_names, n=args.ngram),
    )


def style_metrics(texts: list[str], refs: References) -> dict:
    """Every text-only measure of one set of texts (samples, or real paragraphs cut to sample length)."""
    import statistics

    import style

    longest, passage = refs.copying.longest_run(texts)
    return {
        "p_author": statistics.mean(refs.classifier.p_author(texts)),
        "delta_to_author": refs.delta.distance(texts, refs.train_paragraphs),
        "delta_to_contrast": {t: refs.delta.distance(texts, ps) for t, ps in refs.contrast_train.items()},
        "copied_ngram_share": refs.copying.ngram_rate(texts),
        "longest_copied_run": longest,
        "longest_copied_passage": passage,
        "names_per_1000_words": refs.copying.names_per_1000_words(texts),
        "distinct_1": style.distinct_n(texts, 1),
        "distinct_2": style.distinct_n(texts, 2),
        "repetition_rate": style.repetition_rate(texts),
        "words": sum(len(style.words(t)) for t in texts),
    }


def load_model(path: str, args: argparse.Namespace):
    """A model to evaluate and its tokenizer; with --from-scratch, a weightless config folder gets fresh weights."""
    from accelerate.utils import set_seed

    import lora
    import utils
    from training import default_device

    weightless = Path(path).is_dir() and not utils.has_weights(Path(path)) and not lora.is_adapter_folder(path)
    if args.from_scratch and weightless:
        set_seed(args.split_seed)  # as train.py does before drawing the weights
        model = utils.load_model(path, from_scratch=True).to(default_device()).eval()
    else:
        model = utils.load_for_sampling(path)
    return model, utils.load_tokenizer(path)


def held_out_perplexity(model, tokenizer, val_paragraphs: list[str], args: argparse.Namespace) -> dict:
    """train.py's validation: one paragraph per example, loss per real token, bits per character."""
    from accelerate import Accelerator

    from dataset import text_chars
    from training import resolve_precision, validate, validation_loader

    # The precision train.py's --precision auto validates in (bf16 autocast where native), so the numbers match.
    accelerator = Accelerator(mixed_precision=resolve_precision("auto"))
    loader = validation_loader(tokenizer, val_paragraphs, args.max_input_length, args.batch_size)
    with accelerator.autocast():
        return validate(model, loader, accelerator, text_chars(val_paragraphs))


COLUMNS = [  # (key, heading, format)
    ("val_perplexity", "held-out perplexity", "{:,.1f}"),
    ("val_bits_per_char", "bits/char", "{:.3f}"),
    ("p_author", "P(author)", "{:.2f}"),
    ("delta_to_author", "Delta to author", "{:.3f}"),
    ("delta_to_nearest_contrast", "Delta to nearest contrast", "{:.3f}"),
    ("copied_ngram_share", "copied word n-grams", "{:.2%}"),
    ("longest_copied_run", "longest copied run (words)", "{}"),
    ("names_per_1000_words", "names per 1,000 words", "{:.1f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("repetition_rate", "repetition", "{:.1%}"),
]


def table(rows: list[dict]) -> str:
    lines = ["| | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        row = {**row, "delta_to_nearest_contrast": min(row["delta_to_contrast"].values())}
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(args: argparse.Namespace, rows: list[dict], references: list[dict], classifier, samples) -> str:
    accuracy = ", ".join(f"{title} {acc:.0%}" for title, acc in classifier.heldout_by_novel.items())
    verdict = "reliable" if classifier.reliable else "UNRELIABLE (below 90%): read P(author) with care"
    parts = [
        "# Style report",
        "",
        table(rows + references),
        "",
        f"Samples: {args.n_samples} per model, {args.max_new_tokens} new tokens each, top-k {args.top_k}, "
        f"top-p {args.top_p}, temperature {args.temperature}, seed {args.seed}, prompts from {Path(args.prompts).name} "
        f"in order. Held-out text: the validation paragraphs of {Path(args.data).name} (train-size {args.train_size}, "
        f"seed {args.split_seed}); the contrast rows are the last {CONTRAST_HELD_OUT:.0%} of each contrast novel. "
        f"References are cut into passages of {classifier.passage_words} words, the samples' mean length.",
        "",
        f"- **P(author)**: TF-IDF word 1-2-grams and character 2-4-grams + logistic regression, author novels vs "
        f"contrast novels, names masked. Accuracy on whole held-out novels: **{classifier.heldout_accuracy:.1%}** "
        f"({accuracy}): {verdict}.",
        f"- **Delta**: Burrows' Delta, cosine variant, over the {args.mfw} most frequent words (names excluded); "
        "0 is the same profile, about 1 unrelated; lower to the author than to the contrast novels reads as her.",
        f"- **Copying**: word {args.ngram}-grams of the samples found verbatim in the training paragraphs; names are "
        "character names derived from the training text.",
        "- **Fluency**, per sample then averaged: distinct-n = distinct word n-grams over all n-grams; repetition = "
        "share of a sample's word 4-grams that already occurred in it.",
        "",
        "![style](style.png)",
        "",
        "## Longest copied passages",
        "",
    ]
    parts += [f'- {row["name"]}: {row["longest_copied_run"]} words: "{row["longest_copied_passage"]}"' for row in rows]
    for name, model_samples in samples.items():
        parts += ["", f"## Samples: {name}", ""]
        for sample in model_samples[: args.show_samples]:
            parts += [f"**{sample['prompt']}** {sample['text']}", "", "---", ""]
    return "\n".join(parts).rstrip("-\n ") + "\n"


def plot(path: Path, rows: list[dict]) -> None:
    """Four bar charts, one bar per model and reference, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("p_author", "P(author): higher reads as the author", 1),
        ("delta_to_author", "Delta to the author: lower is closer", 1),
        ("copied_ngram_share", "copied word n-grams (%)", 100),
        ("names_per_1000_words", "character names per 1,000 words", 1),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    colors = ["tab:blue" if "val_perplexity" in row else "tab:gray" for row in rows]
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        ax.bar(range(len(rows)), [row[key] * scale for row in rows], color=colors)
        ax.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same seed, same bytes
    plt.close(fig)


def write_report(out: Path, args: argparse.Namespace, rows: list[dict], references: list[dict], classifier, samples):
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "overwrite"}
    classifier_summary = {
        "passage_words": classifier.passage_words,
        "heldout_novel_accuracy": classifier.heldout_accuracy,
        "heldout_accuracy_by_novel": classifier.heldout_by_novel,
        "reliable": classifier.reliable,
    }
    report = {
        "settings": settings,
        "classifier": classifier_summary,
        "models": rows,
        "references": references,
        "samples": samples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(args, rows, references, classifier, samples))
    plot(out / "style.png", rows + references)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = check_args(args)
    quiet_libraries()

    import style
    from generation import SamplingSettings, generate_samples

    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        stop_at_end_of_text=False,  # every sample as long as every other, for every model
    )
    names = args.names or args.models
    rows, samples_by_model = [], {}
    refs = None
    for name, path in zip(names, args.models, strict=True):
        print(f"{name}: sampling {args.n_samples} x {args.max_new_tokens} tokens ...", flush=True)
        model, tokenizer = load_model(path, args)
        samples = generate_samples(model, tokenizer, prompts, args.n_samples, settings, args.seed)
        if refs is None:  # the classifier reads passages as long as the samples
            passage_words = max(20, round(sum(len(s["text"].split()) for s in samples) / len(samples)))
            print(f"fitting the style classifier on {passage_words}-word passages ...", flush=True)
            refs = build_references(args, passage_words)
        texts = [s["text"] for s in samples]
        rows.append({"name": name, "model": path, **held_out_perplexity(model, tokenizer, refs.val_paragraphs, args)})
        rows[-1].update(style_metrics(texts, refs))
        samples_by_model[name] = samples
    words = refs.classifier.passage_words
    references = [
        {"name": "author, held out (ceiling)", **style_metrics(style.passages(refs.val_paragraphs, words), refs)},
        {
            "name": "contrast, held out (floor)",
            **style_metrics(style.passages([p for ps in refs.contrast_held_out.values() for p in ps], words), refs),
        },
    ]
    write_report(Path(args.out), args, rows, references, refs.classifier, samples_by_model)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
