"""The Python API for a notebook: load a trained model or adapter, draw samples, score a text's style.

    from utils import load, sample, style_scores

    model, tokenizer = load("GPT2_fine_tuned_Austen")        # a model folder, adapter folder or Hub id
    texts = sample(model, tokenizer, "It is a truth universally acknowledged", n=4, seed=0)
    style_scores(texts)   # {'style_p_author': 0.83, 'style_copied_8grams': 0.01, ...}

The scripts (train.py, inference.py, style_report.py) do the same from the command line; the package
austen_gpt holds everything, e.g. austen_gpt.training.loop.train for a run without a command line.
"""

from __future__ import annotations

from dataclasses import replace

from austen_gpt.data.paragraphs import load_paragraphs, split_paragraphs
from austen_gpt.flags import REPO
from austen_gpt.models.loading import load_tokenizer
from austen_gpt.sampling.generation import generate_paragraphs
from austen_gpt.sampling.loading import load_for_sampling
from austen_gpt.settings import SamplingSettings
from austen_gpt.style.probe import StyleProbe


def load(path: str, base_model: str | None = None, load_in_4bit: bool = False):
    """(model, tokenizer) ready to sample: a model folder, an adapter folder on its base model, or a Hub id,
    on the best device in eval mode (as `inference.py --model-path`)."""
    return load_for_sampling(path, base_model, load_in_4bit), load_tokenizer(path)


def sample(model, tokenizer, prompt: str = "", n: int = 1, seed: int | None = None, **settings) -> list[str]:
    """`n` continuations of `prompt`, the prompt included. `settings` are SamplingSettings fields
    (max_new_tokens, top_k, top_p, temperature, repetition_penalty, paragraphs, ...) with inference.py's
    defaults; a `seed` makes them repeatable."""
    return generate_paragraphs(model, tokenizer, prompt, n, replace(SamplingSettings(), **settings), seed)


def style_scores(
    texts: list[str], data: str = str(REPO / "austen_dataset.pkl"), train_size: float = 0.9, split_seed: int = 42
) -> dict[str, float]:
    """How `texts` read against the author of `data` (train.py's split of it): P(author) from a classifier of
    her held-out text against other novelists, the share of word 8-grams copied from the training split, names
    per 1,000 words, and with 10 or more texts the two-sample distinguishability (0.5: passes for her)."""
    train, val = split_paragraphs(load_paragraphs(data), train_size, split_seed)
    probe = StyleProbe(train, val, n_samples=len(texts), top_k=50, top_p=0.95, repo=REPO)
    return probe.score(texts)
