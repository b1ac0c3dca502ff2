"""Style evaluation: the classifier, Delta, copying and fluency measures, style_report.py and --eval-style."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import assert_user_error, run_script, train_args

import style
import style_report
from cli import UserError

pytestmark = pytest.mark.xdist_group("style")  # one worker builds the references (half a minute) for all

PASSAGE_WORDS = 130  # about what 200 sampled tokens come to


@pytest.fixture(scope="module")
def refs():
    """style_report.py's references on the real data: the split, the classifier (validated), Delta, copying."""
    from dataset import load_paragraphs, split_paragraphs

    args = style_report.parse_args(["--models", "unused"])
    train, val = split_paragraphs(load_paragraphs(args.data), args.train_size, args.split_seed)
    return style_report.build_references(args, train, val, PASSAGE_WORDS)


def held_out(refs) -> tuple[list[str], list[str]]:
    """Passages of held-out Austen (validation paragraphs) and of held-out contrast (novel endings)."""
    contrast = [p for ps in refs.contrast_held_out.values() for p in ps]
    return style.passages(refs.val_paragraphs, PASSAGE_WORDS), style.passages(contrast, PASSAGE_WORDS)


def test_the_classifier_recognizes_austen_in_novels_it_never_saw(refs):
    classifier = refs.classifier
    assert classifier.heldout_accuracy >= 0.9 and classifier.reliable, classifier.heldout_by_novel
    assert len(classifier.heldout_by_novel) == 9  # every novel was held out once


def test_held_out_austen_scores_high_and_held_out_contrast_low(refs):
    austen, contrast = held_out(refs)
    assert sum(refs.classifier.p_author(austen)) / len(austen) > 0.8
    assert sum(refs.classifier.p_author(contrast)) / len(contrast) < 0.2


def test_delta_puts_held_out_austen_closer_to_austen_than_the_contrast_novels(refs):
    austen, contrast = held_out(refs)
    assert refs.delta.distance(austen, refs.train_paragraphs) < refs.delta.distance(contrast, refs.train_paragraphs)
    for contrast_novel in refs.contrast_train.values():
        assert refs.delta.distance(austen, refs.train_paragraphs) < refs.delta.distance(austen, contrast_novel)


def test_character_names_come_from_the_text(refs):
    names = refs.copying.names
    assert {"elizabeth", "darcy", "emma", "knightley", "elinor", "marianne", "wentworth"} <= names
    assert not names & {"she", "he", "the", "ah", "oh", "mr", "miss", "i"}
    # a name is never written in lower case in the novels ("rose", "hope", "grant" are words too)
    assert not names & {"rose", "hope", "will"}


def test_a_copied_sample_scores_full_copying_and_a_shuffled_one_none(refs):
    copied = " ".join(refs.train_paragraphs[100:103])
    n_words = len(style.words(copied))
    assert refs.copying.ngram_rate([copied]) == 1.0
    assert refs.copying.longest_run([copied])[0] == n_words
    shuffled = style.words(copied)
    random.Random(0).shuffle(shuffled)
    assert refs.copying.ngram_rate([" ".join(shuffled)]) < 0.02
    assert refs.copying.longest_run(["no such words anywhere in her novels at all today"]) == (0, "")


def test_names_rate_counts_names_per_thousand_words(refs):
    assert refs.copying.names_per_1000_words(["Elizabeth said to Darcy that the weather was very fine"]) == 200
    assert refs.copying.names_per_1000_words(["the weather was fine"]) == 0


def test_normalize_makes_editions_typography_alike():
    curly = "\u201cWell,\u201d said Pip\u2014\u2018I don\u2019t know.\u2019 _Really_ 1801"
    straight = "\"Well,\" said Pip -- 'I don't know.' Really 1802"
    assert (
        style.normalize(curly, {"pip"})
        == style.normalize(straight, {"pip"})
        == ("well, said name - i don't know. really 0")
    )


@pytest.fixture(scope="module")
def two_sample_test(refs):
    """The report's two-sample test with fewer draws: cross-validated AUC against held-out Austen."""
    from two_sample import TwoSampleTest

    prose = refs.two_sample.prose_features
    return TwoSampleTest(refs.val_paragraphs, prose, refs.classifier.names, draws=3, seed=0, reserve=1 / 3)


def test_the_two_sample_test_passes_real_austen_and_tells_contrast_and_shuffled_words_apart(refs, two_sample_test):
    austen = two_sample_test.reference_passages(24, PASSAGE_WORDS)  # never among the passages drawn to compare
    shuffled = [" ".join(random.Random(i).sample(p.split(), len(p.split()))) for i, p in enumerate(austen)]
    contrast = style.passages([p for ps in refs.contrast_held_out.values() for p in ps], PASSAGE_WORDS, at_most=24)
    floor = two_sample_test(austen)
    assert floor.mean <= 0.6 and len(floor.draws) == 3, floor.draws
    assert two_sample_test(contrast).mean >= 0.9
    told_apart = two_sample_test(shuffled)
    assert told_apart.mean >= 0.9 and told_apart.spread <= 0.05, told_apart.draws
    # the same bag of words fools the author classifier: shuffled Austen still reads as Austen to it
    assert sum(refs.classifier.p_author(shuffled)) / len(shuffled) > 0.7


def test_the_two_sample_test_is_reproducible_and_refuses_what_it_cannot_test(refs, two_sample_test):
    from two_sample import TwoSampleTest

    texts = style.passages(refs.train_paragraphs[:400], 60, at_most=12)
    again = TwoSampleTest(refs.val_paragraphs, two_sample_test.prose_features, two_sample_test.names, 3, 0, 1 / 3)
    assert two_sample_test(texts).draws == again(texts).draws  # the same seed, the same numbers
    reseeded = TwoSampleTest(refs.val_paragraphs, two_sample_test.prose_features, two_sample_test.names, 3, 1)
    assert reseeded(texts).draws != again(texts).draws  # fresh draws of the author's passages
    with pytest.raises(UserError, match="at least 10 texts"):
        two_sample_test(texts[:9])
    with pytest.raises(UserError, match="give fewer or shorter texts"):
        two_sample_test(texts[:10] + [" ".join(["word"] * 20_000)])


def test_fluency_measures():
    assert style.distinct_n(["one two three four"], 1) == 1.0
    assert style.repetition_rate(["the cat sat down " * 10]) > 0.8
    assert style.repetition_rate(["every word in this sample is different from the others"]) == 0.0


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir, tokenizer) -> Path:
    """A fresh LoRA adapter folder on the tiny model (B = 0: it samples exactly as its base)."""
    from transformers import AutoModelForCausalLM

    import lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = lora.add_lora(base, 4, 8, 0.0, ["c_attn"], quantized=False, base_name=str(tiny_model_dir))
    adapted.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.slow
def test_an_adapter_folder_is_measured_as_its_base_model(adapter_dir, tiny_model_dir, austen_paragraphs):
    """An untrained adapter (B = 0) changes nothing: the report samples and scores it exactly as its base."""
    from generation import SamplingSettings, generate_samples

    args = style_report.parse_args(["--models", str(adapter_dir), "--max-input-length", "64"])
    settings = SamplingSettings(max_new_tokens=12, paragraphs=None)
    measured = []
    for path in (adapter_dir, tiny_model_dir):
        model, tokenizer = style_report.load_model(str(path), args)
        samples = generate_samples(model, tokenizer, ["Emma", "Mr Darcy"], 4, settings, seed=3)
        measured.append((samples, style_report.held_out_perplexity(model, tokenizer, austen_paragraphs[:20], args)))
    (adapter_samples, adapter_loss), (base_samples, base_loss) = measured
    assert adapter_samples == base_samples
    assert adapter_loss["val_perplexity"] == pytest.approx(base_loss["val_perplexity"], rel=1e-4)


@pytest.mark.slow
def test_eval_style_measures_distinguishability_from_the_held_out_paragraphs(refs, tiny_model_dir):
    """--eval-style's probe: a random tiny model's samples are told apart from held-out Austen at once."""
    from transformers import AutoModelForCausalLM

    import utils

    probe = style.StyleProbe(refs.train_paragraphs, refs.val_paragraphs, 10, 50, 0.95, style_report.REPO)
    assert probe.two_sample is not None and probe.two_sample.draws == 3
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), utils.load_tokenizer(str(tiny_model_dir))
    measures = probe(model, tokenizer, seed=0)
    assert measures["style_distinguishability"] >= 0.9 and model.training, measures
    assert probe(model, tokenizer, seed=0) == measures  # seeded: a resumed run measures the same
    assert (
        style.StyleProbe(refs.train_paragraphs, refs.val_paragraphs[:20], 10, 50, 0.95, style_report.REPO).two_sample
        is None
    )


@pytest.fixture(scope="module")
def quickstart_style_model(tmp_path_factory, tiny_config_dir, small_data) -> Path:
    """The tiny config trained from scratch for one short epoch on Austen: word salad, as the quickstart's."""
    folder = tmp_path_factory.mktemp("quickstart")
    settings = "--from-scratch --epochs 1 --max-input-length 64 --lr 2e-3 --sample-every 0 --precision fp32"
    result = run_script("train.py", *train_args(folder, tiny_config_dir, small_data, *settings.split()), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def texts_for_the_report(folder: Path, austen_paragraphs: list[str]) -> tuple[list[str], list[str]]:
    """Flags for Austen without 300 paragraphs set aside (the data and the novels the classifiers read), and
    two --texts files: passages of those paragraphs (real Austen that no model, classifier or reference
    saw), and a bag of the words Austen uses far more than the contrast authors do."""
    from collections import Counter

    aside = set(random.Random(0).sample(range(len(austen_paragraphs)), 300))
    data = folder / "data.jsonl"
    kept = [p for i, p in enumerate(austen_paragraphs) if i not in aside]
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in kept))
    (folder / "novels").mkdir()
    set_aside = {austen_paragraphs[i] for i in aside}
    for title, paragraphs in style.load_novels(style_report.REPO / "data/austen").items():
        novel = "CHAPTER I\n\n" + "\n\n".join(p for p in paragraphs if p not in set_aside)
        (folder / "novels" / f"{title.lower().replace(' ', '_')}.txt").write_text(novel)
    real = style.passages([austen_paragraphs[i] for i in sorted(aside)], 80, at_most=60)
    (folder / "real.txt").write_text("\n\n".join(real))  # a .txt: samples between blank lines
    contrast = [p for ps in style.load_novels(style_report.REPO / "data/contrast").values() for p in ps]
    hers, theirs = Counter(style.words(" ".join(kept))), Counter(style.words(" ".join(contrast)))
    favourites = sorted((w for w in hers if hers[w] >= 100), key=lambda w: theirs[w] / hers[w])[:150]
    rng = random.Random(1)
    bags = [" ".join(rng.choices(favourites, k=80)) + "." for _ in range(20)]
    (folder / "favourites.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in bags))
    texts = [f"real={folder / 'real.txt'}", f"favourite-words={folder / 'favourites.jsonl'}"]
    return ["--data", str(data), "--author-novels", str(folder / "novels")], texts


@pytest.mark.slow
def test_style_report_tells_models_and_texts_from_the_author(
    tmp_path, tiny_config_dir, quickstart_style_model, austen_paragraphs
):
    """One report with both kinds of rows. Held-out Austen set aside from the data passes as --texts; shuffled
    and contrast text (the reference rows), an untrained and a briefly trained model do not; a bag of her
    favourite words is flagged above the P(author) ceiling."""
    data, texts = texts_for_the_report(tmp_path, austen_paragraphs)
    arguments = ["--models", str(tiny_config_dir), str(quickstart_style_model), "--from-scratch", *data]
    arguments += ["--names", "untrained", "quickstart-style", "--texts", *texts]
    arguments += "--n-samples 16 --max-new-tokens 100 --draws 2 --train-size 0.97 --max-input-length 64".split()
    result = run_script("style_report.py", *arguments, "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report_dir = tmp_path / "report"
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.json", "report.md", "style.png"]
    report = json.loads((report_dir / "report.json").read_text())
    rows = {row["name"]: row for row in report["models"] + report["references"]}
    assert list(rows) == [
        "untrained",
        "quickstart-style",
        "real",
        "favourite-words",
        "author, held out",
        "author, words shuffled",
        "contrast, held out",
    ]
    assert all(len(samples) == 16 for samples in report["samples"].values())
    told_apart = {name: row["distinguishability"] for name, row in rows.items()}
    floor = told_apart["author, held out"]
    assert floor <= 0.6 and told_apart["real"] <= 0.6, told_apart  # real Austen passes, as --texts too
    assert told_apart["author, words shuffled"] >= 0.9 and told_apart["contrast, held out"] >= 0.9, told_apart
    assert told_apart["quickstart-style"] >= floor + 0.3 and told_apart["untrained"] >= 0.9, told_apart
    assert all(len(row["auc_by_draw"]) == 2 and row["distinguishability_spread"] >= 0 for row in rows.values())
    assert "val_perplexity" in rows["quickstart-style"] and "val_perplexity" not in rows["real"]
    assert rows["quickstart-style"]["val_perplexity"] < rows["untrained"]["val_perplexity"]

    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# Style report\n\n| | distinguishability (AUC) | spread |")
    verdicts = dict(line[4:].split("**", 1) for line in markdown.splitlines() if line.startswith("- **"))
    assert "exaggerated vocabulary, not better style" in verdicts["favourite-words"]
    assert "exaggerated vocabulary" not in verdicts["real"] and "passes for the author" in verdicts["real"]
    assert "told apart from the author almost every time" in verdicts["quickstart-style"]


def test_style_report_refuses_bad_input_and_keeps_an_existing_report(tmp_path, tiny_model_dir, small_data):
    base = ["--models", str(tiny_model_dir), "--data", str(small_data)]
    assert_user_error(run_script("style_report.py", *base, "--n-samples", "5", cwd=tmp_path), "--n-samples", "10")
    assert_user_error(run_script("style_report.py", "--texts", "samples.jsonl", cwd=tmp_path), "NAME=FILE")
    assert_user_error(run_script("style_report.py", "--texts", "chat=nope.jsonl", cwd=tmp_path), "chat=nope.jsonl")
    few = tmp_path / "few.txt"
    few.write_text("one sample\n\nanother sample\n")
    too_few = run_script("style_report.py", *base, "--texts", f"few={few}", cwd=tmp_path)
    assert_user_error(too_few, "--texts few=", "2 texts", "needs 10 or more")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    assert_user_error(run_script("style_report.py", "--texts", f"b={broken}", cwd=tmp_path), "--texts b=", "line 2")
    missing = run_script("style_report.py", "--models", str(tmp_path / "nope"), cwd=tmp_path)
    assert_user_error(missing, "no such folder")
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    assert_user_error(run_script("style_report.py", *base, "--prompts", str(empty), cwd=tmp_path), "no prompt")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("an earlier report")
    assert_user_error(run_script("style_report.py", *base, "--out", str(report), cwd=tmp_path), "--overwrite")
    assert (report / "report.md").read_text() == "an earlier report"
