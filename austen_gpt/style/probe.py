"""The style probe run at each validation during training: samples scored for style and copying."""

from __future__ import annotations

import statistics
from pathlib import Path

from austen_gpt.sampling.generation import generate_samples, read_prompts
from austen_gpt.settings import SamplingSettings
from austen_gpt.style.text import AuthorClassifier, Copying, deal, load_novels, names_to_mask, passages, words
from austen_gpt.style.two_sample import ProseFeatures, TwoSampleTest


class StyleProbe:
    """--eval-style during training: fresh samples of the shipped prompts, measured as the report measures them.

    Fit once: a classifier of held-out text against the contrast novels, an index of the training text's word
    8-grams, and the two-sample test against held-out paragraphs. The validation paragraphs (train.py's split,
    apart from the training paragraphs) are dealt in two by words: half fits the classifier, half is the
    two-sample test's pool. The test needs `n_samples` of 10 or more and 3 x `n_samples` x TOKENS words of
    validation text (`two_sample` is None otherwise, and the classifier gets all of it). With less than one
    passage of validation text, `classifier` is None and P(author) is not measured. Each call samples the model
    (its own seeds; training's random stream is untouched).
    """

    TOKENS = 100  # per sample: long enough to judge, short enough for every validation
    DRAWS = 3  # of the two-sample test: a third of the report's, for speed
    CLASSIFIER_SHARE = 0.5  # of the validation text, when the two-sample test takes the rest

    def __init__(
        self,
        train_paragraphs: list[str],
        val_paragraphs: list[str],
        n_samples: int,
        top_k: int,
        top_p: float,
        repo: Path,
    ):

        contrast = load_novels(repo / "data/contrast")
        names, masked = names_to_mask(train_paragraphs, contrast)
        words_per_sample = round(self.TOKENS * 0.75)  # GPT-2 tokens per English word: about 4/3
        testable = n_samples >= TwoSampleTest.MIN_TEXTS
        testable &= len(words(" ".join(val_paragraphs))) >= 3 * n_samples * self.TOKENS
        # Never fit on the training text: a model that recites it would score high for the recital alone.
        # The pool gets half the words, still 1.5 x what the draws of real passages take.
        shares = [self.CLASSIFIER_SHARE, 1 - self.CLASSIFIER_SHARE]
        fitting, pool = deal(val_paragraphs, shares, seed=0) if testable else (val_paragraphs, [])
        self.held_out = {"classifier": fitting, "two-sample pool": pool}
        self.classifier = None
        if passages(fitting, words_per_sample):
            held_out = {"held-out text": fitting}
            self.classifier = AuthorClassifier.fit(held_out, contrast, words_per_sample, masked, False)
        self.copying = Copying(train_paragraphs, names)
        self.two_sample = None
        if testable:
            prose = ProseFeatures([p for ps in contrast.values() for p in ps], self.classifier, masked)
            self.two_sample = TwoSampleTest(pool, prose, masked, self.DRAWS, seed=0)
        self.prompts, self.n_samples = read_prompts(repo / "data/eval_prompts.txt"), n_samples
        self.settings = SamplingSettings(max_new_tokens=self.TOKENS, top_k=top_k, top_p=top_p, paragraphs=None)

    def __call__(self, model, tokenizer, seed: int) -> dict[str, float]:
        """Sample the model on the shipped prompts and score the samples."""
        model.eval()
        samples = generate_samples(model, tokenizer, self.prompts, self.n_samples, self.settings, seed)
        model.train()
        return self.score([s["text"] for s in samples], [s["prompt"] for s in samples])

    def score(self, texts: list[str], prompts: list[str] | None = None) -> dict[str, float]:
        """P(author), the share of copied word 8-grams, names per 1,000 words and, with enough texts and
        held-out prose, the two-sample distinguishability (texts sharing a prompt stay in one fold)."""
        measures = {"style_p_author": statistics.mean(self.classifier.p_author(texts))} if self.classifier else {}
        measures["style_copied_8grams"] = self.copying.ngram_rate(texts)
        measures["style_names_per_1000_words"] = self.copying.names_per_1000_words(texts)
        if self.two_sample and len(texts) >= TwoSampleTest.MIN_TEXTS:
            measures["style_distinguishability"] = self.two_sample(texts, prompts).mean
        return measures
