"""Style evaluation: the classifier, Delta, copying and fluency measures, style_report.py and --eval-style."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import assert_user_error, run_script

import style
import style_report

PASSAGE_WORDS = 130  # about what 200 sampled tokens come to


@pytest.fixture(scope="module")
def refs():
    """style_report.py's references on the real data: the split, the classifier (validated), Delta, copying."""
    return style_report.build_references(style_report.parse_args(["--models", "unused"]), PASSAGE_WORDS)


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


def report_args(tmp_path, tiny_model_dir, tiny_config_dir, adapter_dir, small_data, out: str) -> list[str]:
    return [
        "--models",
        str(tiny_config_dir),
        str(tiny_model_dir),
        str(adapter_dir),
        "--names",
        "untrained",
        "tiny",
        "tiny + LoRA",
        "--from-scratch",
        "--n-samples",
        "4",
        "--max-new-tokens",
        "24",
        "--data",
        str(small_data),
        "--out",
        str(tmp_path / out),
    ]


@pytest.mark.slow
def test_style_report_writes_the_report_and_the_same_seed_gives_the_same_report(
    tmp_path, tiny_model_dir, tiny_config_dir, adapter_dir, small_data
):
    for out in ("first", "second"):
        arguments = report_args(tmp_path, tiny_model_dir, tiny_config_dir, adapter_dir, small_data, out)
        result = run_script("style_report.py", *arguments, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = tmp_path / "first", tmp_path / "second"
    assert sorted(p.name for p in first.iterdir()) == ["report.json", "report.md", "style.png"]
    report = json.loads((first / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["untrained", "tiny", "tiny + LoRA"]
    assert all(len(samples) == 4 for samples in report["samples"].values())
    # the untrained adapter changes nothing: the same samples and perplexity as its base
    assert report["samples"]["tiny + LoRA"] == report["samples"]["tiny"]
    assert report["models"][2]["val_perplexity"] == pytest.approx(report["models"][1]["val_perplexity"], rel=1e-4)
    for row in report["models"]:
        assert row["val_perplexity"] > 1 and 0 <= row["p_author"] <= 1 and 0 <= row["copied_ngram_share"] <= 1
    assert report["classifier"]["heldout_novel_accuracy"] > 0.5
    assert len(report["references"]) == 2
    table = (first / "report.md").read_text()
    assert table.startswith("# Style report\n\n| |") and "| untrained |" in table and "## Samples: tiny" in table
    again = json.loads((second / "report.json").read_text())
    assert report["settings"].pop("out") != again["settings"].pop("out")
    assert report == again
    for name in ("report.md", "style.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_style_report_refuses_bad_input_and_keeps_an_existing_report(tmp_path, tiny_model_dir, small_data):
    base = ["--models", str(tiny_model_dir), "--data", str(small_data)]
    assert_user_error(run_script("style_report.py", *base, "--n-samples", "0", cwd=tmp_path), "--n-samples")
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
