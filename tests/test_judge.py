"""The reranking judge (austen_gpt/style/judge.py) and inference.py --rerank: the judge is fit on the training split
only, saved without pickle and reloaded to the same scores, refused when damaged or fit for another model; the
choice among candidates; --rerank 1 is sampling as it was, --rerank N keeps one of its N candidates reproducibly."""

from __future__ import annotations

import pytest
import torch

from austen_gpt.cli import UserError
from austen_gpt.data.paragraphs import load_split
from austen_gpt.sampling.generation import sample_prompts
from austen_gpt.sampling.loading import load_for_sampling
from austen_gpt.settings import DataSettings, SamplingSettings
from austen_gpt.style import judge


@pytest.fixture(scope="module")
def fitted(tiny_model_dir, tokenizer):
    """A judge of the tiny random model against Austen: 40 openings of her training split."""
    model = load_for_sampling(str(tiny_model_dir))
    train, val = load_split(DataSettings())
    openings = judge.judged_openings(train, 40, seed=3)
    settings = SamplingSettings(max_new_tokens=40, paragraphs=1)
    generated = [texts[0] for texts in sample_prompts(model, tokenizer, [p for p, _ in openings], 1, settings, 7)]
    record = {"fingerprint": judge.weights_fingerprint(str(tiny_model_dir))}
    return model, judge.fit_judge(model, tokenizer, openings, generated, 48, record), openings, generated, train, val


@pytest.mark.slow
def test_its_texts_come_from_the_training_split_only(fitted):
    _, _, openings, _, train, val = fitted
    texts = [prompt + rest for prompt, rest in openings]
    assert len(set(texts)) == 40 and set(texts) <= set(train) and not set(texts) & set(val)
    assert judge.judged_openings(train, 40, seed=3) == openings  # a function of the seed
    with pytest.raises(UserError, match="fitting a judge needs 4 training paragraphs"):
        judge.judged_openings(["Too short."] * 10, 5, seed=0)


@pytest.mark.slow
def test_it_tells_the_authors_text_from_the_models(fitted, tokenizer):
    model, fit, openings, generated, _, _ = fitted
    assert fit.record["pairs"] == 40 and fit.record["held_out_accuracy"] >= 0.9  # a random model: easy to tell
    real = judge.text_features(model, tokenizer, [p + r for p, r in openings], 48)
    own = judge.text_features(model, tokenizer, generated, 48)
    assert (fit.log_odds(real) > 0).float().mean() > 0.9 and (fit.log_odds(own) < 0).float().mean() > 0.9


@pytest.mark.slow
def test_it_reloads_from_its_safe_files_to_the_same_scores(fitted, tokenizer, tiny_model_dir, tmp_path):
    model, fit, _, generated, _, _ = fitted
    fit.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["judge.json", "judge.safetensors"]
    again = judge.Judge.load(tmp_path, judge.weights_fingerprint(str(tiny_model_dir)))
    features = judge.text_features(model, tokenizer, generated, 48)
    assert torch.equal(again.log_odds(features), fit.log_odds(features)) and again.record == fit.record
    assert judge.Judge.load(tmp_path / "none", "any") is None  # no judge saved: one is fit


@pytest.mark.slow
def test_a_damaged_judge_or_one_for_another_model_is_refused(fitted, tiny_model_dir, tmp_path):
    _, fit, _, _, _, _ = fitted
    fingerprint = judge.weights_fingerprint(str(tiny_model_dir))
    fit.save(tmp_path)
    with pytest.raises(UserError, match="was fit for another model"):
        judge.Judge.load(tmp_path, "0" * 64)
    tensors = tmp_path / judge.JUDGE_TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-9])
    with pytest.raises(UserError, match=r"is damaged .*delete"):
        judge.Judge.load(tmp_path, fingerprint)
    fit.save(tmp_path)
    (tmp_path / judge.JUDGE_RECORD).write_text("{not json")
    with pytest.raises(UserError, match="is damaged"):
        judge.Judge.load(tmp_path, fingerprint)


def test_the_fingerprint_follows_the_weights(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert judge.weights_fingerprint(str(copy)) == judge.weights_fingerprint(str(tiny_model_dir))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert judge.weights_fingerprint(str(copy)) != judge.weights_fingerprint(str(tiny_model_dir))
    assert judge.weights_fingerprint("gpt2") == "hub:gpt2"


def test_the_choice_is_the_best_or_a_reproducible_draw_by_the_odds():
    log_odds = torch.tensor([0.0, 3.0, -1.0, 2.5])
    assert judge.choose(log_odds, "best", 1.0, torch.Generator().manual_seed(0)) == 1
    draws = [judge.choose(log_odds, "sample", 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == [judge.choose(log_odds, "sample", 1.0, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) <= {0, 1, 2, 3} and draws.count(1) > draws.count(3) > draws.count(0) > draws.count(2)
    cold = [judge.choose(log_odds, "sample", 0.05, torch.Generator().manual_seed(s)) for s in range(50)]
    assert set(cold) == {1}  # a low temperature is the best


def samples_of(stdout: str) -> list[str]:
    """inference.py's numbered samples ("1. ...") from its output."""
    import re

    return [m.group(1) for m in re.finditer(r"^\d+\. (.*?)(?=\n\n\d+\. |\n*\Z)", stdout, re.S | re.M)]


@pytest.mark.slow
def test_inference_rerank_keeps_one_of_its_candidates_reproducibly(tiny_model_dir, tmp_path, capsys):
    import shutil

    import inference

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)  # the judge is saved beside the model

    def draw(*flags: str) -> tuple[list[str], str]:
        args = ["--model-path", str(model), "--prompt", "Emma", "--seed", "1", "--max-new-tokens", "20", *flags]
        assert inference.main(args) == 0
        out = capsys.readouterr()
        return samples_of(out.out), out.err

    today, _ = draw("--n-return-seqs", "2")
    assert len(today) == 2 and draw("--n-return-seqs", "2", "--rerank", "1")[0] == today  # 1: as drawn
    candidates, _ = draw("--n-return-seqs", "6")
    kept, said = draw("--n-return-seqs", "2", "--rerank", "3")
    assert "fit a judge for" in said and (model / judge.JUDGE_TENSORS).exists()
    assert kept[0] in candidates[:3] and kept[1] in candidates[3:6]
    again, said = draw("--n-return-seqs", "2", "--rerank", "3")
    assert again == kept and "judge of" in said  # the saved judge, the same draws


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--rerank", "0"], "--rerank must be 1 to 64"),
        (["--rerank", "65"], "--rerank must be 1 to 64"),
        (["--rerank", "2", "--rerank-temperature", "0"], "--rerank-temperature must be positive"),
    ],
)
def test_inference_rerank_refuses_bad_input(flags, fragment, capsys):
    from conftest import run_in_process

    import inference

    assert fragment in run_in_process(inference.main, ["--model-path", "nowhere", *flags], capsys)


@pytest.mark.slow
def test_inference_refuses_a_damaged_judge_in_one_line(fitted, tiny_model_dir, tmp_path, capsys):
    import shutil

    from conftest import run_in_process

    import inference

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    fitted[1].save(model)
    (model / judge.JUDGE_RECORD).write_text("{")
    line = run_in_process(inference.main, ["--model-path", str(model), "--rerank", "2", "--prompt", "A"], capsys)
    assert "is damaged" in line and (model / judge.JUDGE_TENSORS).exists()  # nothing deleted


@pytest.mark.slow
def test_few_shot_and_interactive_sampling_rerank_too(fitted, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import inference

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    fitted[1].save(model)  # fit for these weights: loaded, not refit
    common = ["--model-path", str(model), "--seed", "4", "--max-new-tokens", "12", "--data", "austen_dataset.pkl"]

    (tmp_path / "prompts.txt").write_text("Emma\n")

    def draw(*flags: str, piped: bool = False) -> list[str]:
        with (tmp_path / "prompts.txt").open() as stdin:  # a file, as `< prompts.txt` pipes it
            if piped:
                monkeypatch.setattr("sys.stdin", stdin)
            assert inference.main([*common, *flags]) == 0
        return samples_of(capsys.readouterr().out)

    few = ["--few-shot", "2", "--prompt", "Emma"]
    candidates, kept = draw(*few, "--n-return-seqs", "4"), draw(*few, "--n-return-seqs", "2", "--rerank", "2")
    assert len(kept) == 2 and kept[0] in candidates[:2] and kept[1] in candidates[2:]
    candidates = draw("--interactive", "--n-return-seqs", "4", piped=True)
    kept = draw("--interactive", "--n-return-seqs", "2", "--rerank", "2", piped=True)
    assert len(kept) == 2 and kept[0] in candidates[:2] and kept[1] in candidates[2:]


@pytest.mark.slow
def test_reranked_report_samples_are_generate_samples_at_one_candidate_and_kept_from_theirs(fitted, tokenizer):
    from austen_gpt.sampling.generation import generate_samples

    model, fit = fitted[0], fitted[1]
    settings, prompt = SamplingSettings(max_new_tokens=12, paragraphs=None), ["The ball at"]
    plain = generate_samples(model, tokenizer, prompt, 6, settings, 5)
    assert judge.reranked_samples(model, tokenizer, prompt, 6, settings, 5, judge.Rerank(fit, 1)) == plain
    kept = judge.reranked_samples(model, tokenizer, prompt, 2, settings, 5, judge.Rerank(fit, 3, "best"))
    texts = [s["text"] for s in plain]
    assert kept[0]["text"] in texts[:3] and kept[1]["text"] in texts[3:]


@pytest.mark.slow
def test_the_judge_shares_no_text_with_the_reports_distinguishability(fitted):
    """The reranking judge is fit on training-split openings; the report's two-sample classifier reads held-out
    text only, and n-grams and prose shape, not the model: neither rows nor features in common."""
    from austen_gpt.style.report import build_references
    from austen_gpt.style.settings import ReferenceSettings
    from austen_gpt.style.two_sample import make_classifier

    _, _, openings, _, train, val = fitted
    refs = build_references(ReferenceSettings(), 42, train, val, 100)
    judged = {prompt + rest for prompt, rest in openings}
    held_out = {p for part in refs.held_out.values() for p in part}
    assert judged <= set(train) and not judged & held_out and held_out <= set(val)
    steps = [type(step).__name__ for _, step in make_classifier(None).steps[0][1].transformer_list]
    assert steps == ["TfidfVectorizer", "TfidfVectorizer", "Pipeline"]  # n-grams and ProseFeatures: text alone
