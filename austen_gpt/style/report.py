"""The style report's parts: the author's and contrast references, the measures of each row's texts, the
verdict against the references' ceilings, and report.md, report.json and style.png (style_report.py runs it;
docs/style.md explains each measure)."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from austen_gpt.cli import UserError, flag_name
from austen_gpt.data.batches import validation_loader
from austen_gpt.data.paragraphs import load_paragraphs, load_split, text_chars
from austen_gpt.models import lora
from austen_gpt.models.device import default_device, resolve_precision
from austen_gpt.models.evaluation import held_out_metrics
from austen_gpt.models.loading import has_weights, load_model, load_tokenizer
from austen_gpt.models.saving import run_settings
from austen_gpt.sampling import few_shot
from austen_gpt.sampling.generation import context_length, generate_samples, read_prompts
from austen_gpt.sampling.loading import load_for_sampling
from austen_gpt.settings import DataSettings
from austen_gpt.style import judge, text
from austen_gpt.style.settings import ReferenceSettings, ReportSettings
from austen_gpt.style.two_sample import FOLDS, ProseFeatures, TwoSampleTest

MIN_TEXTS = TwoSampleTest.MIN_TEXTS
PASSES = 0.6  # distinguishability at or below this passes for the author (the floor is about 0.5)

CONTRAST_HELD_OUT = 0.1  # the last tenth of each contrast novel is kept away from the classifier and Delta
AUTHOR_ROW = "author, held out"
# The held-out author text, dealt three ways by words: the P(author) classifier's fitting text (the most: with
# half, its accuracy on novels it never saw was 91%, with 60% 93%), the two-sample test's pool (48 samples of 200
# tokens take about half of a quarter) and the author row's passages (48 of 130 words take about half of the
# rest). Disjoint, and none of them the training text.
HELD_OUT_SHARES = {"classifier": 0.6, "two-sample pool": 0.25, "author row": 0.15}


def read_texts(specs: list[str]) -> dict[str, list[str]]:
    """NAME -> texts of each --texts NAME=FILE: .jsonl records' 'text' fields, or a .txt's blank-line blocks."""
    texts = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        try:
            texts[name] = load_paragraphs(file)
        except UserError as error:
            raise UserError(f"--texts {spec}: {error}") from None
        if len(texts[name]) < MIN_TEXTS:
            raise UserError(
                f"--texts {spec}: {len(texts[name])} texts; the two-sample test needs {MIN_TEXTS} or more "
                "(separate the samples of a .txt by blank lines)"
            )
    return texts


MAX_SHARED_WITH_UNSEEN = 0.05  # of the classifier's word 8-grams, found in the training text or the held-out parts


@dataclass
class References:
    """Everything the models are measured against, built once."""

    train_paragraphs: list[str]
    val_paragraphs: list[str]
    contrast_held_out: dict[str, list[str]]
    contrast_train: dict[str, list[str]]
    held_out: dict[str, list[str]]  # the validation paragraphs, less any the training text holds, dealt three ways
    classifier_novels: dict[str, list[str]]  # what the P(author) classifier was fit on, of the author
    classifier: object  # style.AuthorClassifier
    delta: object  # style.Delta
    copying: object  # style.Copying
    two_sample: TwoSampleTest
    overused: object  # style.OverusedPhrases


def classifier_text(
    novels: dict[str, list[str]], train: list[str], held_out: dict[str, list[str]], passage_words: int
) -> dict[str, list[str]]:
    """The author's novels less the training text and the held-out parts the classifier must not see.

    What is left is the classifier's share of the held-out paragraphs, and any of the novels' text that --data
    does not hold; never text a model trained on, the two-sample test draws from, or the author row reads.
    """
    kept_from_it = [p for part, ps in held_out.items() if part != "classifier" for p in ps]
    fitting = text.without(novels, train + kept_from_it)
    # Paragraphs are matched whole: where --data cuts the novels into other paragraphs, nothing matches and the
    # training text would stay in the classifier's. Its word 8-grams tell: ~0.2% shared as cut alike, ~93% not.
    shared = text.Copying(train + kept_from_it, set()).ngram_rate([p for ps in fitting.values() for p in ps])
    if shared > MAX_SHARED_WITH_UNSEEN:
        raise UserError(
            f"the novels in --author-novels hold the text of --data cut into other paragraphs ({shared:.0%} of the "
            "classifier's word 8-grams are in text it must not see); give --author-novels the novels that --data "
            "was built from with dataset.py build, or novels that --data does not hold"
        )
    fitted = {title: ps for title, ps in fitting.items() if text.passages(ps, passage_words)}
    if len(fitted) < min(2, len(novels)):  # an author of one novel is classified unvalidated (AuthorClassifier)
        words = sum(len(p.split()) for ps in fitting.values() for p in ps)
        raise UserError(
            f"the style classifier's share of the held-out author text ({words:,} words) covers {len(fitted)} of "
            f"the {len(novels)} novels in --author-novels with a {passage_words}-word passage; hold out more text "
            "(a lower --train-size) or check that --author-novels holds the novels of --data"
        )
    return fitting


def build_references(
    settings: ReferenceSettings, seed: int, train: list[str], val: list[str], passage_words: int
) -> References:
    """The classifiers, Delta, copying and the two-sample test, from the split of --data and the novels; `seed`
    deals the held-out text and draws the two-sample test's passages."""
    # a held-out paragraph whose words are also a training paragraph's ("Yes, sir.") is text the models trained on
    unseen = text.without({"held out": val}, train).get("held out", [])
    held_out = dict(zip(HELD_OUT_SHARES, text.deal(unseen, list(HELD_OUT_SHARES.values()), seed), strict=True))
    novels = text.load_novels(settings.author_novels)
    author = classifier_text(novels, train, held_out, passage_words)
    contrast = text.load_novels(settings.contrast_novels)
    cut = {title: round(len(ps) * (1 - CONTRAST_HELD_OUT)) for title, ps in contrast.items()}
    contrast_train = {title: ps[: cut[title]] for title, ps in contrast.items()}
    contrast_held_out = {title: ps[cut[title] :] for title, ps in contrast.items()}
    author_names, all_names = text.names_to_mask(train, contrast)
    # validating holds out whole novels: an author of one novel has none to spare, so hers goes unvalidated
    validate = len(author) >= 2
    classifier = text.AuthorClassifier.fit(author, contrast_train, passage_words, all_names, validate)
    prose = ProseFeatures([p for ps in contrast_train.values() for p in ps], classifier, all_names)
    return References(
        train_paragraphs=train,
        val_paragraphs=val,
        contrast_held_out=contrast_held_out,
        contrast_train=contrast_train,
        held_out=held_out,
        classifier_novels=author,
        classifier=classifier,
        # Delta's word frequencies are z-scored against the author's text less all of the held-out text
        delta=text.Delta(text.without(novels, val) | contrast_train, all_names, n_words=settings.mfw),
        copying=text.Copying(train, author_names, n=settings.ngram),
        two_sample=TwoSampleTest(held_out["two-sample pool"], prose, all_names, settings.draws, seed),
        overused=text.OverusedPhrases(train),
    )


def author_passages(refs: References, n: int, n_words: int) -> list[str]:
    """`n` passages of `n_words` words from the author row's share of the held-out text, evenly spread."""
    found = text.passages(refs.held_out["author row"], n_words, at_most=n)
    if len(found) < n:
        words = sum(len(p.split()) for p in refs.held_out["author row"])
        raise UserError(
            f"the author row's share of the held-out author text ({words:,} words) is too short for {n} passages of "
            f"{n_words} words; lower --n-samples or --max-new-tokens, or hold out more text (a lower --train-size)"
        )
    return found


def reference_texts(refs: References, n: int, n_words: int, seed: int) -> dict[str, list[str]]:
    """The reference rows' texts: `n` passages of `n_words` words each.

    Real held-out author passages (from the author row's share, which neither the classifier nor the two-sample
    test sees), the same passages with their words shuffled (her vocabulary without her sentences), and held-out
    contrast passages.
    """
    author = author_passages(refs, n, n_words)
    rng = random.Random(seed)
    contrast = [p for ps in refs.contrast_held_out.values() for p in ps]
    return {
        AUTHOR_ROW: author,
        "author, words shuffled": [" ".join(rng.sample(p.split(), len(p.split()))) for p in author],
        "contrast, held out": text.passages(contrast, n_words, at_most=n),
    }


def style_metrics(texts: list[str], refs: References, prompts: list[str] | None = None) -> dict:
    """Every text-only measure of one set of texts (samples, or real paragraphs cut to sample length).

    `prompts`, the prompt each sample continues, folds the two-sample test by prompt.
    """
    longest, passage = refs.copying.longest_run(texts)
    p_author = refs.classifier.p_author(texts)
    return {
        **refs.two_sample(texts, prompts).as_dict(),
        "p_author": statistics.mean(p_author),
        "p_author_standard_error": statistics.stdev(p_author) / len(p_author) ** 0.5,
        "delta_to_author": refs.delta.distance(texts, refs.train_paragraphs),
        "delta_to_contrast": {t: refs.delta.distance(texts, ps) for t, ps in refs.contrast_train.items()},
        "copied_ngram_share": refs.copying.ngram_rate(texts),
        "longest_copied_run": longest,
        "longest_copied_passage": passage,
        "names_per_1000_words": refs.copying.names_per_1000_words(texts),
        "distinct_1": text.distinct_n(texts, 1),
        "distinct_2": text.distinct_n(texts, 2),
        "repetition_rate": text.repetition_rate(texts),
        "overused_phrase_share": refs.overused.share(texts),
        "overused_phrases": dict(list(refs.overused.find(texts)[0].items())[:5]),
        "words": sum(len(text.words(t)) for t in texts),
    }


def load_scored_model(path: str, from_scratch: bool = False, seed: int = 42):
    """A model to evaluate and its tokenizer; with `from_scratch`, a weightless config folder gets the fresh
    weights train.py draws with this (split) `seed`."""

    weightless = Path(path).is_dir() and not has_weights(Path(path)) and not lora.is_adapter_folder(path)
    if from_scratch and weightless:
        set_seed(seed)  # as train.py does before drawing the weights
        model = load_model(path, from_scratch=True).to(default_device()).eval()
    else:
        model = load_for_sampling(path)
    return model, load_tokenizer(path)


def held_out_perplexity(model, tokenizer, val_paragraphs: list[str], max_input_length: int, batch_size: int) -> dict:
    """train.py's validation: one paragraph per example, loss per real token, bits per character."""

    # The precision train.py's --precision auto validates in (bf16 autocast where native), so the numbers match.
    accelerator = Accelerator(mixed_precision=resolve_precision("auto"))
    loader = validation_loader(tokenizer, val_paragraphs, max_input_length, batch_size)
    with accelerator.autocast():
        return held_out_metrics(model, loader, accelerator, text_chars(val_paragraphs))


COLUMNS = [  # (key, heading, format)
    ("distinguishability", "distinguishability (AUC)", "{:.2f}"),
    ("distinguishability_spread", "spread", "±{:.2f}"),
    ("copied_ngram_share", "copied word n-grams", "{:.2%}"),
    ("copied_from_prompt_share", "copied from its excerpts", "{:.2%}"),
    ("p_author", "P(author)", "{:.2f}"),
    ("val_perplexity", "held-out perplexity", "{:,.1f}"),
    ("val_bits_per_char", "bits/char", "{:.3f}"),
    ("delta_to_author", "Delta to author", "{:.3f}"),
    ("delta_to_nearest_contrast", "Delta to nearest contrast", "{:.3f}"),
    ("longest_copied_run", "longest copied run (words)", "{}"),
    ("names_per_1000_words", "names per 1,000 words", "{:.1f}"),
    ("distinct_1", "type-token ratio (distinct-1)", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("repetition_rate", "repetition", "{:.1%}"),
    ("overused_phrase_share", "over-used phrases", "{:.1%}"),
    ("sampling_seconds", "sampling (s)", "{:,.1f}"),
]


def table(rows: list[dict]) -> str:
    lines = ["| | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        row = {**row, "delta_to_nearest_contrast": min(row["delta_to_contrast"].values())}
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def above_ceiling(row: dict, author: dict) -> bool:
    """P(author) higher than real held-out author text, by more than twice the two means' standard error."""
    error = (row["p_author_standard_error"] ** 2 + author["p_author_standard_error"] ** 2) ** 0.5
    return row["p_author"] - author["p_author"] > 2 * error


def verdict(row: dict, author: dict) -> str:
    """One sentence reading distinguishability, copying and P(author) together."""
    auc, copied = row["distinguishability"], row["copied_ngram_share"]
    if auc <= PASSES:
        told = f"passes for the author (distinguishability {auc:.2f}, the floor is {author['distinguishability']:.2f})"
    elif auc <= 0.8:
        told = f"is often told apart from the author (distinguishability {auc:.2f})"
    else:
        told = f"is told apart from the author almost every time (distinguishability {auc:.2f})"
    # Copying makes text indistinguishable too: more than twice the author's own rate (and over 1%) is copying.
    copies = copied > max(2 * author["copied_ngram_share"], 0.01)
    if copies:
        copying = f"but {copied:.1%} of its word 8-grams are copied from the training text: that is memory, not style"
    else:
        copying = f"and copies {copied:.2%} of its word 8-grams (the author's own held-out text: "
        copying += f"{author['copied_ngram_share']:.2%})"
    sentence = f"**{row['name']}** {told}, {copying}."
    if above_ceiling(row, author):
        sentence += (
            f" Its P(author) {row['p_author']:.2f} is above the real author's {author['p_author']:.2f}: "
            "exaggerated vocabulary, not better style."
        )
    return sentence


def held_out_words(refs: References) -> dict[str, int]:
    """Words in each part of the held-out author text; the classifier's counts what it was fit on."""
    counts = {part: sum(len(p.split()) for p in ps) for part, ps in refs.held_out.items()}
    return counts | {"classifier": sum(len(p.split()) for ps in refs.classifier_novels.values() for p in ps)}


def markdown_report(settings: ReportSettings, rows: list[dict], references: list[dict], refs, samples) -> str:
    sampling, data, classifier, measures = settings.sampling, settings.data, refs.classifier, settings.references
    by_novel = ", ".join(f"{title} {acc:.0%}" for title, acc in classifier.heldout_by_novel.items())
    reliability = "reliable" if classifier.reliable else "UNRELIABLE (below 90%): read P(author) with care"
    accuracy = f"**{classifier.heldout_accuracy:.1%}** ({by_novel}): {reliability}"
    if not by_novel:
        accuracy = "not measured (--author-novels holds one novel, and this takes two): read P(author) with care"
    author = next(r for r in references if r["name"] == AUTHOR_ROW)
    pool = len(refs.two_sample.pool)
    held_out = ", ".join(f"{part} {words:,}" for part, words in held_out_words(refs).items())
    parts = [
        "# Style report",
        "",
        table(rows + references),
        "",
        "## Verdict",
        "",
        *(f"- {verdict(row, author)}" for row in rows + references if row is not author),
        "",
        f"Samples: {settings.n_samples} per model, {sampling.max_new_tokens} new tokens each, top-k {sampling.top_k}, "
        f"top-p {sampling.top_p}, temperature {sampling.temperature}, seed {settings.seed}, prompts from "
        f"{Path(settings.prompts).name} in order. Held-out text: the validation paragraphs of {Path(data.data).name} "
        f"(train-size {data.train_size}, seed {data.seed}), dealt three ways, disjoint and none of it trained on "
        f"(words: {held_out}). Reference rows: {settings.n_samples} passages of {classifier.passage_words} words "
        "(the samples' mean length); "
        f"the contrast row's come from the last {CONTRAST_HELD_OUT:.0%} of each novel.",
        "",
        f"- **Distinguishability**: can a classifier tell the row's texts from real author passages of the same "
        f"lengths? ROC AUC under {FOLDS}-fold cross-validation (a model's samples folded by prompt: each prompt's "
        f"continuations in one fold), the mean over {measures.draws} fresh draws of the "
        f"author's passages (from the {pool:,}-word two-sample pool), ± the standard deviation across draws. 0.5: "
        f"indistinguishable; 1.0: always told apart. The `{AUTHOR_ROW}` row is the floor: real author text against "
        "real author text. Features: word 1-2-grams and character 1-4-grams (TF-IDF), sentence and word lengths, "
        "punctuation per word, the share of word pairs and triples found in the contrast novels, and P(author).",
        f"- **Copying**: word {measures.ngram}-grams of the texts found verbatim in the training paragraphs; names are "
        "character names derived from the training text. Copied text is indistinguishable too, so read the two "
        "together.",
        f"- **P(author)**: closer to the author than to the contrast authors? TF-IDF word 1-2-grams and character "
        f"2-4-grams + logistic regression, the classifier's share of the held-out author text vs contrast novels, "
        f"names masked; it never saw the training text, so reciting that text earns nothing. Accuracy on whole "
        f"held-out novels: {accuracy}. The `{AUTHOR_ROW}` "
        "row is its ceiling; a row above it uses the author's favourite words more than she does.",
        f"- **Delta**: Burrows' Delta, cosine variant, over the {measures.mfw} most frequent words (names excluded); "
        "0 is the same profile, about 1 unrelated; lower to the author than to the contrast novels reads as her.",
        "- **Fluency**, per sample then averaged: distinct-n = distinct word n-grams over all n-grams (distinct-1 is "
        "the type-token ratio); repetition = share of a sample's word 4-grams that already occurred in it. "
        f"**Over-used phrases**: the share of the texts' word {refs.overused.n}-grams that occur "
        f"{refs.overused.min_count} times or more and at least {refs.overused.ratio:g} times as often as in the "
        "training text (add-one smoothed); report.json lists each row's most frequent ones.",
        "- **Sampling (s)**: the wall-clock seconds of the row's sampling (a reranked row's judging included), in "
        "this one run: the cost of --rerank N read against its plain row.",
        *([rerank_note(settings)] if settings.rerank else []),
        *([few_shot_note(settings)] if settings.few_shot_models else []),
        "",
        "![style](style.png)",
        "",
        "## Longest copied passages",
        "",
    ]
    parts += [f'- {row["name"]}: {row["longest_copied_run"]} words: "{row["longest_copied_passage"]}"' for row in rows]
    for name, model_samples in samples.items():
        parts += ["", f"## Samples: {name}", ""]
        for sample in model_samples[: settings.show_samples]:
            parts += [f"**{sample['prompt']}** {sample['text']}", "", "---", ""]
    return "\n".join(parts).rstrip("-\n ") + "\n"


def rerank_note(settings: ReportSettings) -> str:
    return (
        "- **Rerank rows** (`NAME, rerank N`): each sample is one of N candidates, kept by the model's judge as "
        "`inference.py --rerank N` keeps it (a logistic regression on the model's own hidden states and token "
        "log-probabilities, fit on openings of the training split); `best` takes the judge's likeliest, otherwise "
        f"one is drawn in proportion to its odds (temperature {settings.rerank_temperature:g}). The judge shares "
        "neither features nor text with the distinguishability's classifier, which reads n-grams and prose shape and "
        "is fit on held-out text only."
    )


def few_shot_note(settings: ReportSettings) -> str:
    return (
        "- **Few-shot rows** (`NAME, K-shot`): the model prompted with K excerpts of the training split before each "
        "prompt, as `inference.py --few-shot K` builds them (each prompt its own excerpts, drawn with the seed + the "
        "prompt's number); a chat model gets its template and instruction, and its answer ends at the end of its "
        "turn, so its samples can be shorter. Their held-out perplexity is the model's own, **without** the excerpts "
        "(the same for every K). **Copied from its excerpts**: the share of a sample's word "
        f"{settings.references.ngram}-grams found in the excerpts of its own prompt; the excerpts are training text, "
        "so the copied word n-grams count them too."
    )


def plot(path: Path, rows: list[dict]) -> None:
    """One bar chart per measure, one bar per row: models blue, other texts green, references grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("distinguishability", "distinguishability (AUC): 0.5 passes, 1.0 told apart", 1),
        ("copied_ngram_share", "copied word n-grams (%)", 100),
        ("p_author", "P(author): closer to the author than the contrast", 1),
        ("delta_to_author", "Delta to the author: lower is closer", 1),
        ("names_per_1000_words", "character names per 1,000 words", 1),
    ]
    author = next(row for row in rows if row["name"] == AUTHOR_ROW)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    colors = ["tab:blue" if "model" in r else "tab:green" if "texts" in r else "tab:gray" for r in rows]
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        errors = [row.get(f"{key}_spread", 0) * scale for row in rows]
        ax.bar(range(len(rows)), [row[key] * scale for row in rows], yerr=errors, color=colors, capsize=3)
        ax.axhline(author[key] * scale, color="black", linestyle=":", linewidth=1)  # the real author's level
        ax.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same seed, same bytes
    plt.close(fig)


def write_report(settings: ReportSettings, rows: list[dict], references: list[dict], refs, samples) -> Path:
    """report.json, report.md and style.png in the report's folder; returns report.md's path."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {key: value for key, value in asdict(settings).items() if key != "overwrite"}
    classifier = refs.classifier
    classifier_summary = {
        "passage_words": classifier.passage_words,
        "held_out_words": held_out_words(refs),
        "heldout_novel_accuracy": classifier.heldout_accuracy if classifier.heldout_by_novel else None,
        "heldout_accuracy_by_novel": classifier.heldout_by_novel,
        "reliable": classifier.reliable,
    }
    report = {
        "settings": recorded,
        "classifier": classifier_summary,
        "models": rows,
        "references": references,
        "samples": samples,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(settings, rows, references, refs, samples))
    plot(out / "style.png", rows + references)
    return out / "report.md"


def sample_models(
    settings: ReportSettings, prompts: list[str], train: list[str], val_paragraphs: list[str]
) -> list[tuple[dict, list]]:
    """(row with the held-out perplexity, samples) for every --models entry (and its --rerank rows), one model in
    memory at a time."""

    sampled, data = [], settings.data
    for name, path in zip(settings.names or settings.models, settings.models, strict=True):
        print(f"{name}: sampling {settings.n_samples} x {settings.sampling.max_new_tokens} tokens ...", flush=True)
        model, tokenizer = load_scored_model(path, settings.from_scratch, data.seed)
        started = time.perf_counter()
        samples = generate_samples(model, tokenizer, prompts, settings.n_samples, settings.sampling, settings.seed)
        seconds = time.perf_counter() - started
        perplexity = held_out_perplexity(model, tokenizer, val_paragraphs, data.max_input_length, settings.batch_size)
        sampled.append(({"name": name, "model": path, **perplexity, "sampling_seconds": seconds}, samples))
        sampled += reranked_rows(settings, name, path, model, tokenizer, prompts, train, perplexity)
        del model
    return sampled


def reranked_rows(settings: ReportSettings, name: str, path: str, model, tokenizer, prompts, train, perplexity):
    """(row, samples) of the model for each --rerank N and --rerank-choice: its judge loaded or fit (on `train`)."""
    if not settings.rerank:
        return []
    data = settings.data
    fitting = replace(settings.sampling, paragraphs=1)  # the judge's fitting samples are one paragraph, as inference's
    found = judge.judge_for(path, model, tokenizer, train, str(data.data), fitting, data.seed)
    rows = []
    for n in settings.rerank:
        for how in settings.rerank_choice:
            label = f"{name}, rerank {n}" + ("" if settings.rerank_choice == ["sample"] else f" ({how})")
            print(f"{label}: sampling {settings.n_samples} x {n} candidates ...", flush=True)
            started = time.perf_counter()
            samples = judge.reranked_samples(
                model,
                tokenizer,
                prompts,
                settings.n_samples,
                settings.sampling,
                settings.seed,
                judge.Rerank(found, n, how, settings.rerank_temperature),
            )
            row = {"name": label, "model": path, **perplexity, "rerank": n, "rerank_choice": how}
            rows.append((row | {"sampling_seconds": time.perf_counter() - started}, samples))
    return rows


def few_shot_samples(
    model, tokenizer, prompts: list[str], train: list[str], k: int, instruction: str | None, settings: ReportSettings
) -> tuple[list[dict], float]:
    """The samples of one few-shot row (as generate_samples draws a model row's: sample i continues prompt
    i % len(prompts), drawn with the report's seed) and the share of their word n-grams found in the excerpts
    of their own prompt. Each prompt gets its own K excerpts, drawn with the report's seed + its number, so that
    the row is shown more of the author than one draw of K passages."""
    n, context, new_tokens = settings.n_samples, context_length(model), settings.sampling.max_new_tokens
    samples, found, total = [], 0, 0
    for number, prompt in enumerate(prompts[:n]):
        count = len(range(number, n, len(prompts)))
        built = few_shot.build_prompt(
            tokenizer, train, prompt, k, settings.seed + number, context, new_tokens, instruction
        )
        texts = few_shot.sample(
            model, tokenizer, built, prompt, count, settings.sampling, settings.seed, continuation_only=True
        )
        samples += [{"prompt": prompt, "text": t, "passages": built.passages} for t in texts]
        hits, ngrams = text.Copying(built.excerpts, set(), n=settings.references.ngram).ngram_hits(texts)
        found, total = found + hits, total + ngrams
    return samples, found / total if total else 0.0


def check_few_shot(settings: ReportSettings, train: list[str]) -> None:
    """Refuse few-shot rows that cannot be drawn before any model samples: more excerpts than the training
    split has, or a chat model without an author to ask for (its tokenizer tells)."""
    if settings.few_shot_models and max(settings.few_shot) > len(train):
        raise UserError(
            f"--few-shot {max(settings.few_shot)}: the training split has only {len(train)} passages; ask for fewer"
        )
    for path in settings.few_shot_models:
        few_shot.chat_instruction(load_tokenizer(path), settings.author, settings.instruction, settings.data.data)


def sample_few_shot_models(settings: ReportSettings, prompts: list[str], train: list[str], val: list[str]):
    """(row, samples) for every --few-shot-models entry and K, one model in memory at a time. A row's held-out
    perplexity is the model's own, without excerpts: the same for each K."""
    sampled, data = [], settings.data
    for label, path in zip(settings.few_shot_names or settings.few_shot_models, settings.few_shot_models, strict=True):
        model, tokenizer = load_scored_model(path)
        instruction = few_shot.chat_instruction(tokenizer, settings.author, settings.instruction, data.data)
        perplexity = held_out_perplexity(model, tokenizer, val, data.max_input_length, settings.batch_size)
        for k in settings.few_shot:
            print(f"{label}, {k}-shot: sampling {settings.n_samples} x {settings.sampling.max_new_tokens} tokens ...")
            samples, copied = few_shot_samples(model, tokenizer, prompts, train, k, instruction, settings)
            row = {"name": f"{label}, {k}-shot", "model": path, "few_shot": k, "chat": instruction is not None}
            row |= {**perplexity, "perplexity_with_excerpts": False, "copied_from_prompt_share": copied}
            sampled.append((row, samples))
        del model
    return sampled


SPLIT_SETTINGS = ("data", "data_config", "data_split", "text_column", "train_size", "seed", "max_input_length")


def describe_split(settings: dict[str, Any]) -> str:
    """The split settings as the report's flags spell them (train.py's --seed is its --split-seed)."""
    flags = {key: "--split-seed" if key == "seed" else flag_name(key) for key in SPLIT_SETTINGS}
    return " ".join(f"{flags[key]} {settings[key]}" for key in SPLIT_SETTINGS if settings.get(key) is not None)


def take_split_from_runs(data: DataSettings, models: list[str], given: set[str]) -> tuple[DataSettings, list[str]]:
    """The split settings with those not `given` on the command line (DataSettings' names) taken from what the
    first of `models`' runs recorded, so that its held-out text is the text it never trained on; and the lines
    that say where the split comes from, and which models trained on another one."""
    recorded = {path: run_settings(path) for path in models}
    runs = {path: {k: s[k] for k in SPLIT_SETTINGS if k in s} for path, s in recorded.items() if s}
    if not runs:
        return data, [
            f"split: {describe_split(asdict(data))} (from the flags: no --models folder records its run's settings)"
        ]
    source, split = next(iter(runs.items()))
    # (an older run may not record them all: the flags fill the gaps)
    data = replace(data, **{key: value for key, value in split.items() if key not in given})
    lines = [f"split: {describe_split(asdict(data))} (the run of {source}; flags given here override it)"]
    lines += [
        f"warning: {path} trained on another split ({describe_split(other)}); its perplexity and copying are "
        "measured against this one"
        for path, other in runs.items()
        if any(getattr(data, key) != value for key, value in other.items())
    ]
    return data, lines


def run_report(settings: ReportSettings) -> Path:
    """The whole report: sample and score every model, measure every text and the reference rows, write the
    files; returns report.md's path. The split in `settings.data` is the one the models' held-out text comes from
    (take_split_from_runs)."""
    prompts, texts = read_prompts(settings.prompts), read_texts(settings.texts)
    train, val = load_split(settings.data)
    check_few_shot(settings, train)
    sampled = sample_models(settings, prompts, train, val) + sample_few_shot_models(settings, prompts, train, val)
    # the classifiers read passages as long as the first row's texts
    first = [s["text"] for s in sampled[0][1]] if sampled else next(iter(texts.values()))
    passage_words = max(20, round(sum(len(t.split()) for t in first) / len(first)))
    print(f"fitting the style classifiers on {passage_words}-word passages ...", flush=True)
    refs = build_references(settings.references, settings.seed, train, val, passage_words)
    rows = []
    for row, samples in sampled:
        print(f"{row['name']}: measuring ...", flush=True)
        rows.append({**row, **style_metrics([s["text"] for s in samples], refs, [s["prompt"] for s in samples])})
    for spec, (name, row_texts) in zip(settings.texts, texts.items(), strict=True):
        print(f"{name}: measuring ...", flush=True)
        rows.append({"name": name, "texts": spec.partition("=")[2], **style_metrics(row_texts, refs)})
    references = [
        {"name": name, **style_metrics(ref_texts, refs)}
        for name, ref_texts in reference_texts(refs, settings.n_samples, passage_words, settings.seed).items()
    ]
    samples = {row["name"]: row_samples for row, row_samples in sampled}
    return write_report(settings, rows, references, refs, samples)
