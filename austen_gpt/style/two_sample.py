"""Could these texts pass for the author? A classifier two-sample test against her own held-out prose.

A classifier is trained to tell the texts from real passages of the author of the same lengths, drawn
from text no model trained on, and scored by cross-validated ROC AUC: 0.5 when it cannot tell them
apart, 1.0 when it always can (Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests").
Unlike P(author), which asks "more like the author than like the contrast authors?", this asks
"like the author at all?": a bag of her favourite words scores high P(author) and still is told apart
at once, because word order, sentence shape and punctuation betray it.

The test is repeated over fresh draws of the author's passages and fresh fold splits; the mean is the
distinguishability, the standard deviation across draws its spread. The same test with real author
passages in place of the texts gives the floor (about 0.5). Samples that continue prompts are folded by
prompt: a prompt's continuations are all in one fold, so what they share is never learned from their
own fold-mates.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import numpy as np

from austen_gpt.cli import UserError
from austen_gpt.style.text import normalize

FOLDS = 5
_SENTENCE_END = re.compile(r"[.!?]+")
_PUNCTUATION = [",", ";", ":", "!", "?", "-", "'"]


def ngrams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


class ProseFeatures:
    """Dense features of normalized texts that a few dozen examples cannot learn from scratch.

    - sentence length (mean and s.d., in words), word length, punctuation marks per word: the shape of
      sentences, which a bag of n-grams sees least and a reader sees first;
    - the share of the text's word pairs and word triples that occur in the reference prose (the contrast
      novels: plain English word order of the period, no text of the author): low for word salad;
    - the logit of P(author), the author-vs-contrast classifier fit on far more text than any one test.
    """

    def __init__(self, reference_prose: list[str], author_classifier, names: set[str]):
        words = normalize(" ".join(reference_prose), names).split()
        self.pairs, self.triples = set(ngrams(words, 2)), set(ngrams(words, 3))
        self.author_classifier = author_classifier

    def __deepcopy__(self, memo: dict) -> ProseFeatures:
        return self  # sklearn clones every estimator per fold; this holds nothing fitted, so share it

    def __call__(self, texts: list[str]) -> np.ndarray:
        p_author = np.clip(self.author_classifier.p_author(texts), 1e-6, 1 - 1e-6)
        rows = []
        for text, p in zip(texts, p_author, strict=True):
            words = text.split()
            sentences = [len(s.split()) for s in _SENTENCE_END.split(text) if s.split()] or [0]
            n = max(len(words), 1)
            rows.append(
                [
                    statistics.mean(sentences),
                    statistics.pstdev(sentences),
                    sum(len(w) for w in words) / n,
                    *(text.count(mark) / n for mark in _PUNCTUATION),
                    statistics.mean([g in self.pairs for g in ngrams(words, 2)] or [0]),
                    statistics.mean([g in self.triples for g in ngrams(words, 3)] or [0]),
                    np.log(p / (1 - p)),
                ]
            )
        return np.array(rows, dtype=float)


def make_classifier(prose_features: ProseFeatures):
    """Word 1-2-grams and character 1-4-grams (across word boundaries), TF-IDF, and the prose features;
    logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True),
        make_pipeline(FunctionTransformer(prose_features), StandardScaler()),
    )
    return make_pipeline(features, LogisticRegression(C=1.0, max_iter=2000))


def by_prompt(prompts: list[str] | None) -> bool:
    """Whether the folds can keep each prompt's texts together: two prompts or more are needed."""
    return prompts is not None and len(set(prompts)) >= 2


def fold_split(n_texts: int, n_real: int, prompts: list[str] | None, seed: int) -> tuple[object, list[int] | None]:
    """The folds and each text's group (None when the folds are not grouped).

    Continuations of one prompt share what the prompt sets going (a morning, a letter, a speech), and the
    real passages share nothing of the kind. With one prompt's texts on both sides of a split, the classifier
    learns the prompt's traces from the training fold and finds them in the test fold: texts as good as the
    author's would still be told apart. So each prompt's texts stay in one fold, and each real passage, drawn
    at its own random place, is a group of its own.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if not by_prompt(prompts):
        return StratifiedKFold(min(FOLDS, n_texts, n_real), shuffle=True, random_state=seed), None
    index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
    groups = [index[p] for p in prompts] + [len(index) + i for i in range(n_real)]
    return StratifiedGroupKFold(min(FOLDS, len(index), n_real), shuffle=True, random_state=seed), groups


def cross_validated_auc(
    texts: list[str], real: list[str], prose_features: ProseFeatures, seed: int, prompts: list[str] | None = None
) -> float:
    """ROC AUC of out-of-fold scores: texts (label 1) against real author passages (label 0).

    With `prompts` (the prompt each text continues), the folds keep each prompt's texts together.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    labels = [1] * len(texts) + [0] * len(real)
    folds, groups = fold_split(len(texts), len(real), prompts, seed)
    scores = cross_val_predict(
        make_classifier(prose_features), texts + real, labels, groups=groups, cv=folds, method="decision_function"
    )
    return float(roc_auc_score(labels, scores))


@dataclass
class Distinguishability:
    """ROC AUC of telling the texts from the author, per draw; 0.5: indistinguishable, 1.0: always told apart."""

    draws: list[float]
    folds_by_prompt: bool = False

    @property
    def mean(self) -> float:
        return statistics.mean(self.draws)

    @property
    def spread(self) -> float:
        """Standard deviation across the draws."""
        return statistics.pstdev(self.draws)

    def as_dict(self) -> dict:
        return {
            "distinguishability": self.mean,
            "distinguishability_spread": self.spread,
            "auc_by_draw": self.draws,
            "folds_by_prompt": self.folds_by_prompt,
        }


class TwoSampleTest:
    """A pool of the author's held-out paragraphs, and the test of any texts against passages drawn from it.

    The pool must be text that nothing else measured with saw: not the training text, not the author
    classifier's (whose P(author) is one of the features), not the reference rows'.
    """

    MIN_TEXTS = 10  # two per class in each of five folds

    def __init__(
        self, pool_paragraphs: list[str], prose_features: ProseFeatures, names: set[str], draws: int, seed: int
    ):
        self.pool = normalize(" ".join(pool_paragraphs), names).split()
        self.prose_features, self.names, self.draws, self.seed = prose_features, names, draws, seed

    def draw_real(self, lengths: list[int], rng: np.random.Generator) -> list[str]:
        """Real passages with exactly these word counts, at random places in the pool, never overlapping."""
        slot = max(lengths)
        slots = len(self.pool) // slot
        if slots < len(lengths):
            raise UserError(
                f"{len(lengths)} texts of up to {slot} words need {len(lengths) * slot:,} words of held-out author "
                f"text in the two-sample test's pool and there are {len(self.pool):,}; give fewer or shorter texts, "
                "or hold out more of the author's text (a lower --train-size)"
            )
        offset = int(rng.integers(0, len(self.pool) - slots * slot + 1))
        starts = [offset + s * slot for s in rng.choice(slots, size=len(lengths), replace=False)]
        return [" ".join(self.pool[start : start + n]) for start, n in zip(starts, lengths, strict=True)]

    def __call__(self, texts: list[str], prompts: list[str] | None = None) -> Distinguishability:
        """Distinguishability of `texts` from the author: one cross-validated AUC per fresh draw of real passages.

        `prompts`, the prompt each text continues, keeps each prompt's texts in one fold (two prompts or more).
        """
        if len(texts) < self.MIN_TEXTS:
            raise UserError(f"the two-sample test needs at least {self.MIN_TEXTS} texts, got {len(texts)}")
        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
        texts = [normalize(t, self.names) for t in texts]
        lengths = [max(len(t.split()), 1) for t in texts]
        aucs = []
        for draw in range(self.draws):
            real = self.draw_real(lengths, np.random.default_rng([self.seed, draw]))
            aucs.append(cross_validated_auc(texts, real, self.prose_features, self.seed + draw, prompts))
        return Distinguishability(aucs, by_prompt(prompts))
