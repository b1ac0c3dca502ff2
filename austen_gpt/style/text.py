"""Style metrics on plain text: does it read like the author, and how much of it is copied?

- AuthorClassifier: TF-IDF word and character n-grams + logistic regression, the author's novels
  against contrast novels, validated on whole held-out novels (a classifier that only knows the
  novels it was fit on would learn their plots, not the author's hand).
- Delta: Burrows' Delta, cosine variant (Smith & Aldridge 2011; Evert et al. 2017), over the most
  frequent words of the reference novels, z-scored across 2,000-word chunks of them.
- Copying: the share of word n-grams found verbatim in the training text, the longest verbatim run,
  and the rate of the author's character names.
- distinct_n and repetition_rate: the usual fluency proxies for sampled text.

Character names are derived from the novels (a capitalized word that follows a title such as "Mr"
or stands next to a speech verb, and never appears in lower case), never typed in by hand. The
classifier and Delta see names masked, so a model that only repeats "Elizabeth" and "Darcy" gains no
style score for it; how often it does so is reported on its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from austen_gpt.cli import UserError
from austen_gpt.data.paragraphs import novel_paragraphs, novel_title, read_text

TITLES = {"mr", "mrs", "miss", "lady", "sir", "lord", "colonel", "captain", "dr", "admiral", "master", "madam"}
SPEECH_VERBS = {"said", "cried", "replied", "answered", "asked", "continued", "added", "returned", "exclaimed"}
PASSAGES_PER_NOVEL = 400
# The author's side is fit on held-out text only, a few hundred passages; 400 a contrast novel outweighed it
# (on novels it never saw, the author's accuracy fell to 78-87% and the contrast's stayed at 94-96%). 150 evens
# the two (88-97%; docs/style.md).
CONTRAST_PASSAGES_PER_NOVEL = 150
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_CASED_WORD = re.compile(r"[A-Za-z]+")
# "Mr. Darcy", "said Emma": nothing but a full stop and spaces between (not 'said, "Ah!')
_TITLE_OR_VERB_THEN_NAME = re.compile(r"\b([A-Za-z]+)\.? +([A-Z][a-z]+)\b")


def words(text: str) -> list[str]:
    """Lower-case words, apostrophes inside words kept ("don't"), punctuation and quotes dropped."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def load_novels(folder: str | Path) -> dict[str, list[str]]:
    """Title -> paragraphs of every `*.txt` novel in `folder`, or of the one novel a file is (title pages and
    headings removed)."""
    files = [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).glob("*.txt"))
    if not files:
        raise UserError(f"no .txt novels in {folder}; point the flag at a folder of plain-text novels")
    return {novel_title(path): novel_paragraphs(read_text(path)) for path in files}


def character_names(paragraphs: list[str], min_count: int = 3) -> set[str]:
    """Lower-cased names of characters, found the way a reader spots them.

    A name is a capitalized word seen at least `min_count` times right after a title ("Mr Darcy") or
    a speech verb ("said Emma"), and never written in lower case (which rules out "She said").
    """
    lowercase_words, seen_as_name = set(), Counter()
    for paragraph in paragraphs:
        lowercase_words.update(w for w in _CASED_WORD.findall(paragraph) if w.islower())
        for before, name in _TITLE_OR_VERB_THEN_NAME.findall(paragraph):
            if before.lower() in TITLES | SPEECH_VERBS:
                seen_as_name[name.lower()] += 1
    return {n for n, count in seen_as_name.items() if count >= min_count and n not in lowercase_words | TITLES}


def names_to_mask(author_paragraphs: list[str], contrast: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """(the author's character names, counted by Copying; those and the contrast novels' names, masked by
    the classifier and Delta)."""
    author = character_names(author_paragraphs)
    return author, author | character_names([p for paragraphs in contrast.values() for p in paragraphs])


def normalize(text: str, names: set[str]) -> str:
    """Text as the classifier sees it: lower case, names masked, typography made uniform.

    Editions differ in quotes (curly, straight, single for dialogue), dashes and italics marks; left
    in, a character n-gram model separates editions rather than authors.
    """
    text = text.lower().translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": " ", "\u201d": " "}))
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # quote marks go, apostrophes in words stay
    text = re.sub(r"[\"_*\[\](){}]", " ", text)
    text = re.sub(r"\s*(?:--+|\u2014|\u2013)\s*", " - ", text)
    text = re.sub(r"\d+", "0", text)
    text = re.sub(r"[a-z]+", lambda m: "name" if m.group() in names else m.group(), text)
    return " ".join(text.split())


def passages(paragraphs: list[str], n_words: int, at_most: int | None = None) -> list[str]:
    """The paragraphs read in order and cut into consecutive passages of `n_words` words.

    With `at_most`, that many passages evenly spread over the text (a classifier fit on 400 passages
    a novel is as accurate on held-out novels as on all of them, and several times faster).
    """
    tokens = " ".join(paragraphs).split()
    starts = range(0, len(tokens) - n_words + 1, n_words)
    if at_most is not None and len(starts) > at_most:
        starts = [starts[i * len(starts) // at_most] for i in range(at_most)]
    return [" ".join(tokens[i : i + n_words]) for i in starts]


def paragraph_key(paragraph: str) -> str:
    """A paragraph as its words alone, so that the same paragraph read two ways gets the same key.

    --data read as a folder of .txt keeps the edition's italics marks (`_them_`), the novels' reader drops
    them, and a pickle or Hub dataset may have other quotes or dashes: compared character for character, a
    held-out paragraph read one way is not found among the novels read the other way.
    """
    return " ".join(words(paragraph))


def without(novels: dict[str, list[str]], paragraphs: Iterable[str]) -> dict[str, list[str]]:
    """The novels without any of these paragraphs (compared by `paragraph_key`); novels left empty are dropped."""
    excluded = {paragraph_key(p) for p in paragraphs}
    kept = {title: [p for p in ps if paragraph_key(p) not in excluded] for title, ps in novels.items()}
    return {title: ps for title, ps in kept.items() if ps}


def deal(paragraphs: list[str], shares: list[float], seed: int) -> list[list[str]]:
    """The paragraphs dealt at random (seeded) into disjoint parts holding about these shares of their words.

    Each part keeps the text's order. By words, not paragraphs: a part's use (passages, a pool to draw
    from) is counted in words, and a few long paragraphs would otherwise skew it.
    """
    order = np.random.default_rng(seed).permutation(len(paragraphs))
    lengths = np.array([len(paragraphs[i].split()) for i in order], dtype=float)
    middles = (np.cumsum(lengths) - lengths / 2) / max(lengths.sum(), 1)  # where each paragraph sits, 0 to 1
    part_of = np.searchsorted(np.cumsum(shares[:-1]), middles, side="right")
    return [[paragraphs[i] for i in sorted(order[part_of == k])] for k in range(len(shares))]


def _fit_pipeline(texts: list[str], labels: list[int]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50_000, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, max_features=50_000, sublinear_tf=True),
    )
    model = make_pipeline(features, LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    return model.fit(texts, labels)


@dataclass
class AuthorClassifier:
    """P(author) of a text, with the accuracy it reached on novels it never saw."""

    pipeline: object
    names: set[str]
    passage_words: int
    heldout_accuracy: float
    heldout_by_novel: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        author: dict[str, list[str]],
        contrast: dict[str, list[str]],
        passage_words: int,
        names: set[str],
        validate: bool = True,
    ) -> AuthorClassifier:
        """Fit on every novel; first, if `validate`, measure accuracy on whole held-out novels.

        Fold i holds out contrast novel i and every k-th author novel from i (k = number of contrast
        novels), trains on the rest and scores passages of the held-out novels. A novel whose text is
        shorter than one passage is left out (it would be a fold with nothing to score).
        """
        author, contrast = (
            {t: ps for t, ps in novels.items() if passages(ps, passage_words)} for novels in (author, contrast)
        )
        if not author or not contrast:
            raise UserError(
                f"the style classifier needs {passage_words} words or more of the author and of the contrast"
            )
        if validate and (len(author) < 2 or len(contrast) < 2):
            raise UserError(
                f"validating the style classifier needs two author novels and two contrast novels or more, each of "
                f"{passage_words} words or more"
            )

        def labelled(novels: dict[str, list[str]], label: int) -> tuple[list[str], list[int]]:
            at_most = PASSAGES_PER_NOVEL if label else CONTRAST_PASSAGES_PER_NOVEL
            texts = [
                normalize(p, names)
                for paragraphs in novels.values()
                for p in passages(paragraphs, passage_words, at_most)
            ]
            return texts, [label] * len(texts)

        by_novel = {}
        if validate:
            author_titles, contrast_titles = sorted(author), sorted(contrast)
            k = len(contrast_titles)
            for i in range(k):
                held_out = {contrast_titles[i], *author_titles[i::k]}
                train_texts, train_labels = [], []
                for novels, label in ((author, 1), (contrast, 0)):
                    texts, labels = labelled({t: p for t, p in novels.items() if t not in held_out}, label)
                    train_texts += texts
                    train_labels += labels
                fold = _fit_pipeline(train_texts, train_labels)
                for title in sorted(held_out):
                    label = int(title in author)
                    texts, _ = labelled({title: (author | contrast)[title]}, label)
                    by_novel[title] = float(np.mean(fold.predict(texts) == label))
        texts_a, labels_a = labelled(author, 1)
        texts_c, labels_c = labelled(contrast, 0)
        pipeline = _fit_pipeline(texts_a + texts_c, labels_a + labels_c)
        accuracy = statistics.mean(by_novel.values()) if by_novel else math.nan
        return cls(pipeline, names, passage_words, accuracy, by_novel)

    @property
    def reliable(self) -> bool:
        return self.heldout_accuracy >= 0.9

    def p_author(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        normalized = [normalize(t, self.names) for t in texts]
        return [float(p) for p in self.pipeline.predict_proba(normalized)[:, 1]]


class Delta:
    """Burrows' Delta, cosine variant: 1 - cosine of z-scored most-frequent-word profiles (0 = same style)."""

    def __init__(self, reference: dict[str, list[str]], names: set[str], n_words: int = 150, chunk: int = 2000):
        tokens = {title: words(" ".join(ps)) for title, ps in reference.items()}
        counts = Counter(w for ws in tokens.values() for w in ws if w not in names)
        self.vocabulary = [w for w, _ in counts.most_common(n_words)]
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        chunks = [ws[i : i + chunk] for ws in tokens.values() for i in range(0, len(ws) - chunk + 1, chunk)]
        frequencies = np.stack([self._frequencies(c) for c in chunks])
        self.mean, self.std = frequencies.mean(axis=0), frequencies.std(axis=0) + 1e-12

    def _frequencies(self, tokens: list[str]) -> np.ndarray:
        vector = np.zeros(len(self.vocabulary))
        for w in tokens:
            if w in self.index:
                vector[self.index[w]] += 1
        return vector / max(len(tokens), 1)

    def profile(self, texts: list[str]) -> np.ndarray:
        return (self._frequencies([w for t in texts for w in words(t)]) - self.mean) / self.std

    def distance(self, texts: list[str], other: list[str]) -> float:
        a, b = self.profile(texts), self.profile(other)
        return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class Copying:
    """What a text shares verbatim (as words, case and punctuation ignored) with the training text."""

    def __init__(self, training_paragraphs: list[str], names: set[str], n: int = 8):
        self.n, self.names = n, names
        corpus = [w for p in training_paragraphs for w in words(p)]
        self.ngrams = {hash(" ".join(corpus[i : i + n])) for i in range(len(corpus) - n + 1)}
        self.text = f" {' '.join(corpus)} "  # for runs longer than n

    def _hits(self, tokens: list[str]) -> list[bool]:
        return [hash(" ".join(tokens[i : i + self.n])) in self.ngrams for i in range(len(tokens) - self.n + 1)]

    def ngram_hits(self, texts: list[str]) -> tuple[int, int]:
        """(the texts' word n-grams found in the training text, all their word n-grams)."""
        hits = [h for t in texts for h in self._hits(words(t))]
        return sum(hits), len(hits)

    def ngram_rate(self, texts: list[str]) -> float:
        """Share of the texts' word n-grams that occur in the training text."""
        found, total = self.ngram_hits(texts)
        return found / total if total else 0.0

    def longest_run(self, texts: list[str]) -> tuple[int, str]:
        """The longest run of words found verbatim in the training text (at least n words, else 0)."""
        best = (0, "")
        for tokens in (words(t) for t in texts):
            for start, hit in enumerate(self._hits(tokens)):
                if not hit or len(tokens) - start <= best[0]:
                    continue
                end = start + self.n
                while end < len(tokens) and f" {' '.join(tokens[start : end + 1])} " in self.text:
                    end += 1
                if end - start > best[0]:
                    best = (end - start, " ".join(tokens[start:end]))
        return best

    def names_per_1000_words(self, texts: list[str]) -> float:
        tokens = [w for t in texts for w in words(t)]
        return 1000 * sum(w in self.names for w in tokens) / max(len(tokens), 1)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of a text (1.0: nothing repeats), averaged over the texts.

    Per text, so texts of equal length compare fairly however many there are (pooled, the ratio falls
    as the total length grows).
    """
    ratios = []
    for ws in map(words, texts):
        grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return statistics.mean(ratios) if ratios else 0.0


def repetition_rate(texts: list[str], n: int = 4) -> float:
    """Share of a text's word n-grams that already occurred earlier in the same text, averaged."""
    return 1 - distinct_n(texts, n) if texts else 0.0


class OverusedPhrases:
    """Word n-grams much more frequent in a set of texts than in the author's training text: the tics a model
    picks up (a phrase it reaches for in every sample), which DPO-style training is known to breed.

    An n-gram of the texts is over-used where it occurs `min_count` times or more and its rate there is at least
    `ratio` times its rate in the author's text (add-one smoothed, so a phrase she never wrote counts as once).
    """

    def __init__(self, author_paragraphs: list[str], n: int = 3, ratio: float = 5.0, min_count: int = 3):
        self.n, self.ratio, self.min_count = n, ratio, min_count
        self.author = Counter(gram for p in author_paragraphs for gram in self._grams(p))
        self.author_total = max(1, sum(self.author.values()))

    def _grams(self, text: str) -> list[str]:
        ws = words(text)
        return [" ".join(ws[i : i + self.n]) for i in range(len(ws) - self.n + 1)]

    def find(self, texts: list[str]) -> tuple[dict[str, int], int]:
        """({over-used n-gram: its count in the texts}, most frequent first; the texts' number of n-grams)."""
        counts = Counter(gram for t in texts for gram in self._grams(t))
        total = max(1, sum(counts.values()))
        over = {
            gram: count
            for gram, count in counts.most_common()
            if count >= self.min_count and count / total >= self.ratio * (self.author[gram] + 1) / self.author_total
        }
        return over, total

    def share(self, texts: list[str]) -> float:
        """The share of the texts' n-grams that are over-used ones."""
        over, total = self.find(texts)
        return sum(over.values()) / total
