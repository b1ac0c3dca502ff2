"""The style report's settings: what it measures, how the samples are drawn, which split holds the author's
unseen text, and the references the texts are measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from austen_gpt.cli import UserError, require
from austen_gpt.flags import REPO, sampling_rules
from austen_gpt.settings import DataSettings, SamplingSettings
from austen_gpt.style.two_sample import TwoSampleTest

MAX_RERANK = 64  # candidates per sample: each is a whole sample, drawn, held and scored

N_SAMPLES = 48  # per model: the two-sample test's spread across draws stays under 0.05 (docs/style.md)


@dataclass
class ReferenceSettings:
    """The author's and the contrast novels, and the measures' own parameters."""

    author_novels: str = str(REPO / "data/austen")
    """a folder of the author's novels (.txt), or her one novel's file"""
    contrast_novels: str = str(REPO / "data/contrast")
    """a folder of other authors' novels (.txt), two or more"""
    ngram: int = 8
    """the word n-gram length of the copying measure"""
    mfw: int = 150
    """the most frequent words in Burrows' Delta"""
    draws: int = 5
    """fresh draws of real author passages for the two-sample test; its spread is across them"""


@dataclass
class ReportSettings:
    """One style report: its rows (models and texts), their samples, the split and the references."""

    models: list[str] = field(default_factory=list)
    """model folders, Hub ids or adapter folders: a row each"""
    names: list[str] | None = None
    """a label per model; None: the paths"""
    texts: list[str] = field(default_factory=list)
    """NAME=FILE rows of text written elsewhere (.jsonl with a 'text' field, or .txt blocks)"""
    out: str = "reports/style"
    """the report folder (report.md, report.json, style.png)"""
    overwrite: bool = False
    """replace the files of an existing report in out"""
    from_scratch: bool = False
    """a config folder without weights gets the random weights train.py --from-scratch starts from"""
    few_shot_models: list[str] = field(default_factory=list)
    """models prompted with the author's excerpts (a row per model and K), as inference.py --few-shot K"""
    few_shot_names: list[str] | None = None
    """a label per few-shot model; None: the paths"""
    few_shot: list[int] = field(default_factory=lambda: [0, 3, 10])
    """the numbers of excerpts K of the few-shot rows"""
    author: str | None = None
    """the author a chat model is asked to write as (the bundled data: Jane Austen)"""
    instruction: str | None = None
    """a chat model's instruction (default: continue as the author)"""
    rerank: list[int] = field(default_factory=list)
    """candidates per sample of the rerank rows: a row for each --models entry and N, as inference.py --rerank N"""
    rerank_choice: list[str] = field(default_factory=lambda: ["sample"])
    """how the rerank rows keep a candidate: sample (in proportion to the judge's odds) or best; a row for each"""
    rerank_temperature: float = 1.0
    """the temperature on the judge's odds of --rerank-choice sample"""
    prompts: str = str(REPO / "data/eval_prompts.txt")
    """the prompt file, one per line, cycled in order"""
    n_samples: int = N_SAMPLES
    """samples per model (and passages per reference row)"""
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_new_tokens=200, paragraphs=None))
    """how the samples are drawn: every one exactly max_new_tokens long, running on past paragraph ends"""
    seed: int = 42
    """the sampling seed (and the references' draws): the same seed gives the same report"""
    show_samples: int = 3
    """samples per model printed in report.md"""
    data: DataSettings = field(default_factory=DataSettings)
    """train.py's data and split: its validation paragraphs are the author's unseen text"""
    batch_size: int = 16
    """the validation batch size of the held-out perplexity"""
    references: ReferenceSettings = field(default_factory=ReferenceSettings)


def check_report_settings(settings: ReportSettings) -> None:
    """Fail fast on bad input, before any model loads (named by the report's flags)."""
    s, sampling, refs, min_texts = settings, settings.sampling, settings.references, TwoSampleTest.MIN_TEXTS
    require(
        [
            (
                s.models or s.texts or s.few_shot_models,
                "give --models, --few-shot-models or --texts: the report needs something to measure",
            ),
            (s.n_samples >= min_texts, f"--n-samples must be at least {min_texts} (five folds of two or more)"),
            (refs.draws >= 1, "--draws must be at least 1"),
            (sampling.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (refs.ngram >= 2 and refs.mfw >= 10, "--ngram must be at least 2 and --mfw at least 10"),
            (0 < s.data.train_size < 1, "--train-size must be between 0 and 1, e.g. 0.9"),
            (s.names is None or len(s.names) == len(s.models), "give one --names label per --models entry"),
            (
                s.few_shot_names is None or len(s.few_shot_names) == len(s.few_shot_models),
                "give one --few-shot-names label per --few-shot-models entry",
            ),
            (s.few_shot and min(s.few_shot) >= 0, "--few-shot takes numbers of excerpts, 0 or more, e.g. 0 3 10"),
            (
                all(2 <= n <= MAX_RERANK for n in s.rerank),
                f"--rerank takes candidates per sample, 2 to {MAX_RERANK}, e.g. 4 16",
            ),
            (not s.rerank or s.models, "--rerank reranks the --models rows: give --models"),
            (s.rerank_temperature > 0, "--rerank-temperature must be positive, e.g. 1.0"),
            *sampling_rules(sampling.top_k, sampling.top_p, sampling.temperature),
        ]
    )
    for model in s.models + s.few_shot_models:  # a path-like name that does not exist is a typo, not a Hub id
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise UserError(f"--models {model}: no such folder; give a model folder, adapter folder or Hub id")
    for spec in s.texts:
        name, _, file = spec.partition("=")
        if not name or not file:
            raise UserError(f"--texts {spec}: write NAME=FILE, e.g. --texts chat=samples.jsonl")
        if Path(file).suffix.lower() not in (".jsonl", ".txt") or not Path(file).is_file():
            raise UserError(f"--texts {spec}: {file} is not a .jsonl or .txt file; give an existing file of samples")
    out = Path(s.out)
    if out.exists() and any(out.iterdir()) and not s.overwrite:
        raise UserError(f"--out {out} already holds a report; choose another folder or pass --overwrite")
