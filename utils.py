"""The Python API for a notebook: load a trained model or adapter, draw samples, score a text's style.

    from utils import load, sample, style_scores

    model, tokenizer = load("GPT2_fine_tuned_Austen")        # a model folder, adapter folder or Hub id
    texts = sample(model, tokenizer, "It is a truth universally acknowledged", n=4, seed=0)
    style_scores(texts)   # {'style_p_author': 0.83, 'style_copied_8grams': 0.01, ...}

The scripts (train.py, inference.py, style_report.py) do the same from the command line. Training from a
notebook takes the run's typed settings, with train.py's defaults for what they leave out:

    from austen_gpt.settings import ModelSettings
    from austen_gpt.training.loop import train
    from austen_gpt.training.settings import CheckpointSettings, OptimizationSettings, TrainSettings

    train(TrainSettings(model=ModelSettings("configs/base-tiny"),
                        optimization=OptimizationSettings(epochs=1),
                        checkpoints=CheckpointSettings(output_dir="models/austen-tiny")))
"""

from __future__ import annotations

from dataclasses import replace

from austen_gpt.data.paragraphs import load_split
from austen_gpt.flags import REPO
from austen_gpt.models.loading import load_tokenizer
from austen_gpt.sampling.generation import generate_paragraphs
from austen_gpt.sampling.loading import load_for_sampling
from austen_gpt.settings import DataSettings, SamplingSettings
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


def style_scores(texts: list[str], data: DataSettings | None = None) -> dict[str, float]:
    """How `texts` read against the author of `data` (train.py's split of it; None: the bundled Austen with
    train.py's defaults): P(author) from a classifier of her held-out text against other novelists, the share
    of word 8-grams copied from the training split, names per 1,000 words, and with 10 or more texts the
    two-sample distinguishability (0.5: passes for her)."""
    train, val = load_split(data or DataSettings())
    sampling = SamplingSettings()  # (the probe scores the texts given; it samples none)
    probe = StyleProbe(train, val, n_samples=len(texts), top_k=sampling.top_k, top_p=sampling.top_p, repo=REPO)
    return probe.score(texts)
