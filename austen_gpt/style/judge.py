"""The reranking judge: the author's real text against a model's own samples, told apart by what the model
itself computes for a text (a residual energy on top of the language model: Deng et al., "Residual
Energy-Based Models for Text Generation", ICLR 2020).

A text's features are the model's last hidden state averaged over the text's tokens and the mean and spread of
its per-token log-probabilities: nothing the style report's classifier reads (word and character n-grams,
lengths, punctuation), so a judge the samples were chosen by is not the judge that measures them. A logistic
regression on those features, fit on the training split only (openings of training paragraphs, each with the
author's own continuation and the model's), gives each candidate its log-odds of being the author's.

It is saved beside the model: judge.safetensors (its tensors) and judge.json (what it was fit on, and the
sha256 of the model's weights it was fit for); no pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from austen_gpt.cli import UserError
from austen_gpt.data.tokens import paragraph_frame
from austen_gpt.sampling.generation import (
    as_text,
    context_length,
    prompt_ids,
    row_seed,
    rows_per_call,
    sample_ids,
    sample_prompts,
    special_token_ids,
)

JUDGE_TENSORS = "judge.safetensors"
JUDGE_RECORD = "judge.json"
JUDGE_FORMAT = 1
PROMPT_WORDS = 5  # a judged text opens with this many of the paragraph's words: the prompt both sides continue
MIN_CONTINUATION_WORDS = 20  # paragraphs with fewer words after the prompt say little of how she goes on
L2 = 1e-2  # the regression's weight penalty, on standardized features: a few hundred texts, hundreds of features


def weights_fingerprint(model_path: str) -> str:
    """The sha256 of a model folder's safetensors files (names and bytes), or the Hub id of a model that is no
    folder: what a saved judge must have been fit for."""
    folder = Path(model_path)
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != JUDGE_TENSORS) if folder.is_dir() else []
    if not files:
        return f"hub:{model_path}"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    """(texts, hidden size + 2): each text's mean last hidden state and the mean and spread of its tokens'
    log-probabilities, read from end-of-text on, at most `max_tokens` tokens and what the model's context holds
    (a text of none: zeros)."""
    device = next(model.parameters()).device
    max_tokens = min(max_tokens, context_length(model) - 1)  # end-of-text takes a position
    rows = []
    # One text a call, not a padded batch: a text's score then never depends on what shares its call (as a sample
    # never does), so the same seed keeps the same candidate; reading 128 tokens costs less than writing them.
    for text in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]]
        inputs = torch.tensor([ids], device=device)
        output = model(input_ids=inputs, output_hidden_states=True)
        log_probs = output.logits[0, :-1].float().log_softmax(-1).gather(-1, inputs[0, 1:, None])[:, 0]
        hidden = output.hidden_states[-1][0, 1:].float()
        if len(ids) == 1:
            rows.append(torch.zeros(hidden.shape[-1] + 2))
            continue
        spread = log_probs.std(correction=0)
        rows.append(torch.cat([hidden.mean(0), torch.stack([log_probs.mean(), spread])]).cpu())
    return torch.stack(rows)


def fit_logistic(features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Standardization and an L2-penalized logistic regression (full-batch L-BFGS: deterministic)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels.float())
        value = value + L2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return {"weight": weight.detach(), "bias": bias.detach(), "mean": mean, "std": std}


@dataclass
class Judge:
    """Log-odds that a text is the author's, for the model it was fit for."""

    tensors: dict[str, torch.Tensor]  # weight, bias, mean, std
    record: dict[str, Any]  # format, fingerprint, what it was fit on, its accuracy on unseen training pairs

    def log_odds(self, features: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        return ((features - t["mean"]) / t["std"]) @ t["weight"] + t["bias"]

    def save(self, folder: Path) -> None:
        """judge.safetensors, then judge.json (written last: a judge without its record is no judge)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in self.tensors.items()}, folder / JUDGE_TENSORS)
        (folder / JUDGE_RECORD).write_text(json.dumps(self.record, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> Judge | None:
        """The judge saved in `folder` for the model of `fingerprint`; None where none is saved. One line where
        it is damaged or was fit for another model."""
        tensors_path, record_path = folder / JUDGE_TENSORS, folder / JUDGE_RECORD
        if not record_path.exists():
            return None
        fix = f"delete {tensors_path} and {record_path} to fit a new one"
        try:
            record = json.loads(record_path.read_text())
            tensors = load_file(tensors_path)
        except (OSError, ValueError, SafetensorError) as error:
            raise UserError(f"the judge in {folder} is damaged ({type(error).__name__}); {fix}") from None
        if not isinstance(record, dict) or set(tensors) != {"weight", "bias", "mean", "std"}:
            raise UserError(f"the judge in {folder} is damaged (its files are not a judge's); {fix}")
        if record.get("format") != JUDGE_FORMAT or record.get("fingerprint") != fingerprint:
            raise UserError(f"the judge in {folder} was fit for another model (or format); {fix}")
        return cls(tensors, record)


def judged_openings(train: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, the author's continuation) for `n` training paragraphs drawn with `seed`: their first
    PROMPT_WORDS words, and the rest."""
    long_enough = [p for p in train if len(p.split()) >= PROMPT_WORDS + MIN_CONTINUATION_WORDS]
    if len(long_enough) < 4:
        raise UserError(
            f"fitting a judge needs 4 training paragraphs of {PROMPT_WORDS + MIN_CONTINUATION_WORDS} words or "
            f"more, and the training split has {len(long_enough)}; give more --data"
        )
    chosen = random.Random(seed).sample(long_enough, min(n, len(long_enough)))
    return [(" ".join(p.split()[:PROMPT_WORDS]), " " + " ".join(p.split()[PROMPT_WORDS:])) for p in chosen]


def fit_judge(
    model, tokenizer, openings: list[tuple[str, str]], generated: list[str], max_tokens: int, record: dict[str, Any]
) -> Judge:
    """A judge of the author's texts (each opening's prompt and continuation) against the model's (`generated`,
    one for each opening, the prompt included). A fifth of the pairs is held out first to say how well it
    tells them apart (`record["held_out_accuracy"]`); then it is fit on all of them."""
    real = text_features(model, tokenizer, [prompt + rest for prompt, rest in openings], max_tokens)
    own = text_features(model, tokenizer, generated, max_tokens)

    def labelled(real_part: torch.Tensor, own_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.ones(len(real_part)), torch.zeros(len(own_part))])
        return torch.cat([real_part, own_part]), labels

    cut = max(1, len(openings) // 5)
    trial = Judge(fit_logistic(*labelled(real[cut:], own[cut:])), {})
    held_out, truth = labelled(real[:cut], own[:cut])
    accuracy = ((trial.log_odds(held_out) > 0).float() == truth).float().mean().item()
    fitted = fit_logistic(*labelled(real, own))
    return Judge(fitted, {**record, "format": JUDGE_FORMAT, "pairs": len(openings), "held_out_accuracy": accuracy})


def choose(log_odds: torch.Tensor, how: str, temperature: float, generator: torch.Generator) -> int:
    """The candidate to keep: the judge's likeliest ('best'), or one drawn in proportion to its odds raised to
    1 / `temperature` ('sample'), with `generator`."""
    if how == "best":
        return int(torch.argmax(log_odds))
    weights = torch.softmax(log_odds.double() / temperature, 0)
    if not math.isfinite(float(weights.sum())):
        return int(torch.argmax(log_odds))
    return int(torch.multinomial(weights, 1, generator=generator))


JUDGE_PAIRS = 64  # training-split openings a judge is fit on: seconds of sampling for a small model
JUDGE_NEW_TOKENS = 96  # the model's continuation of each opening, one paragraph at most
JUDGED_TOKENS = 128  # the tokens of a text the judge reads, its prompt included


def judge_folder(model_path: str) -> Path:
    """Where a model's judge lives: beside its weights in its folder, or (a Hub id) in the cache."""
    folder = Path(model_path)
    if folder.is_dir():
        return folder
    return Path("~/.cache/austen-gpt/judges").expanduser() / model_path.replace("/", "--")


def judge_for(model_path: str, model, tokenizer, train: list[str], data: str, settings, seed: int) -> Judge:
    """The model's saved judge, or one fit now on `train` (the training split of `data`) and saved, saying so
    in one line either way."""
    folder, fingerprint = judge_folder(model_path), weights_fingerprint(model_path)
    saved = Judge.load(folder, fingerprint)
    if saved is None:
        openings = judged_openings(train, JUDGE_PAIRS, seed)
        fitting = replace(settings, max_new_tokens=JUDGE_NEW_TOKENS, paragraphs=1)
        generated = [texts[0] for texts in sample_prompts(model, tokenizer, [p for p, _ in openings], 1, fitting, seed)]
        record = {"fingerprint": fingerprint, "data": data, "seed": seed, "judged_tokens": JUDGED_TOKENS}
        saved = fit_judge(model, tokenizer, openings, generated, JUDGED_TOKENS, record)
        saved.save(folder)
        done = f"fit a judge for {model_path} on {len(openings)} openings of the training split of {data} (seed {seed})"
    else:
        done = f"judge of {model_path} from {folder / JUDGE_TENSORS}"
    accuracy = saved.record["held_out_accuracy"]
    print(f"{done}: it tells the author's continuations from the model's {accuracy:.0%} of the time", file=sys.stderr)
    return saved


@dataclass
class Rerank:
    """How a reranked sample is kept: one of `candidates`, by `judge`, the best or drawn (`how`) at `temperature`."""

    judge: Judge
    candidates: int
    how: str = "sample"
    temperature: float = 1.0

    def kept(self, model, tokenizer, texts: list[str], prompt: list[int], seed: int) -> list[int]:
        """The index of the text kept of each run of `candidates` `texts` (sample k's are texts k*N .. k*N+N-1 of
        `prompt`'s tokens); sample k's draw is seeded by row_seed(seed, prompt, k), so it is reproducible."""
        n = self.candidates
        log_odds = self.judge.log_odds(text_features(model, tokenizer, texts, JUDGED_TOKENS))
        kept = []
        for k in range(len(texts) // n):
            generator = torch.Generator().manual_seed(row_seed(seed, prompt, k))
            kept.append(k * n + choose(log_odds[k * n : (k + 1) * n], self.how, self.temperature, generator))
        return kept


def keep_one_in(
    n: int,
    candidates: list[str],
    judge: Judge,
    model,
    tokenizer,
    prompt: list[int],
    how: str,
    temperature: float,
    seed: int,
) -> list[str]:
    """One text of each run of `n` candidates (sample k's are candidates k*n .. k*n+n-1 of a prompt), chosen by
    the judge (Rerank.kept)."""
    kept = Rerank(judge, n, how, temperature).kept(model, tokenizer, candidates, prompt, seed)
    return [candidates[i] for i in kept]


def reranked_samples(
    model, tokenizer, prompts: list[str], n: int, settings, seed: int, rerank: Rerank
) -> list[dict[str, str]]:
    """generate_samples' `n` samples {prompt, text}, each the one of `rerank.candidates` that `rerank` keeps: sample
    k of a prompt is kept from its samples k*N .. k*N+N-1, so with N = 1 these are generate_samples' own."""
    eot, special, size = paragraph_frame(tokenizer)[1], special_token_ids(tokenizer), rows_per_call(model)
    samples = []
    for i, prompt in enumerate(prompts[:n]):
        ids, count = prompt_ids(tokenizer, prompt), len(range(i, n, len(prompts))) * rerank.candidates
        drawn = []
        for first in range(0, count, size):
            numbers = list(range(first, min(count, first + size)))
            drawn += sample_ids(model, [ids] * len(numbers), settings, seed, eot, samples=numbers, special_ids=special)
        judged = [as_text(tokenizer, ids[1:] + row) for row in drawn]  # the judge reads the prompt too, as it was fit
        kept = rerank.kept(model, tokenizer, judged, ids, seed)
        samples += [{"prompt": prompt, "text": as_text(tokenizer, drawn[k])} for k in kept]
    return samples
