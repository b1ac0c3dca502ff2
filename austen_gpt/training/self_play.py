"""Self-play fine-tuning (SPIN: Chen et al., "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", ICML 2024): the pairs of a round and their loss. training/loop.py runs the rounds.

Each round draws --self-play-pairs openings of training paragraphs (their first --self-play-prompt-tokens
tokens), seeded by the round. The author's next --self-play-new-tokens tokens are "chosen", the current model's
own continuation of the same opening "rejected", and both are read once under the current model: the round's
fixed reference (the previous round's model, as SPIN has it), so no second model is held in memory. A round is
one pass over its pairs with the SPIN loss (DPO's logistic loss on the pair)

    -log sigmoid(beta * [(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))])

plus --self-play-likelihood-weight x the author's continuation's loss per token: SPIN's reported pitfall is
that the chosen log-probabilities fall along with the rejected ones, and the likelihood term holds them up.

Written in the project's loop rather than with TRL's DPOTrainer: the loss is these few lines, and DPOTrainer
owns a loop of its own (its own resume, precision and distribution in place of this project's, which a round
must share to resume bitwise).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from austen_gpt.cli import UserError
from austen_gpt.data.tokens import paragraph_frame
from austen_gpt.models.saving import run_settings
from austen_gpt.sampling.generation import context_length, rows_per_call, sample_ids, special_token_ids
from austen_gpt.settings import SamplingSettings
from austen_gpt.style.report import take_split_from_runs
from austen_gpt.training.settings import TrainSettings

BEST_BY = "style_distinguishability"  # with self-play rounds, best/ is the round whose samples are told apart least
COPY_GUARD = 0.01  # with self-play, a round whose samples copy more than 1% of their 8-grams is never best/
PAIR_TENSORS = ("chosen", "rejected", "ref_chosen", "ref_rejected")
PAIR_STATS = ("spin_loss", "chosen_logp", "rejected_logp", "margin")  # logged as self_play_<name>, means per pair


@dataclass
class Pairs:
    """One round's pairs: the same opening (start token + prompt tokens) before the author's continuation and the
    model's, and their summed log-probabilities under the round's reference model."""

    chosen: torch.Tensor  # (pairs, opening + new tokens) int64
    rejected: torch.Tensor  # (pairs, opening + new tokens) int64
    ref_chosen: torch.Tensor  # (pairs,) float32
    ref_rejected: torch.Tensor  # (pairs,) float32
    opening: int  # tokens before the continuation: the start token and the prompt

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """For a checkpoint's training_state.pt: tensors only."""
        tensors = {name: getattr(self, name).cpu() for name in PAIR_TENSORS}
        return tensors | {"opening": torch.tensor(self.opening)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Pairs:
        return cls(*(tensors[name] for name in PAIR_TENSORS), opening=int(tensors["opening"]))

    def batches(self, batch_size: int, processes: int, process: int, seed: int, device) -> list[dict]:
        """This process's batches of the round, in an order drawn with `seed`: each step's window of pairs is dealt
        `batch_size` to each process; the pairs left over after the last full deal are not used."""
        order = torch.randperm(len(self.chosen), generator=torch.Generator().manual_seed(seed))
        deal = batch_size * processes
        batches = []
        for first in range(0, len(order) - deal + 1, deal):
            mine = order[first + process * batch_size : first + (process + 1) * batch_size]
            batch = {name: getattr(self, name)[mine].to(device) for name in PAIR_TENSORS}
            ids = torch.cat([batch["chosen"], batch["rejected"]])
            batches.append(batch | {"attention_mask": torch.ones_like(ids)})  # StepMeter counts its tokens
        return batches


def training_openings(tokenizer, train: list[str], prompt_tokens: int, new_tokens: int) -> list[list[int]]:
    """The start token and the first prompt_tokens + new_tokens tokens of each training paragraph that has them:
    the rows a round draws its openings and the author's continuations from."""
    start, length = paragraph_frame(tokenizer)[0], prompt_tokens + new_tokens
    encoded = tokenizer(train, add_special_tokens=False)["input_ids"]
    return [[start, *ids[:length]] for ids in encoded if len(ids) >= length]


def check_openings(openings: list[list[int]], settings: TrainSettings, processes: int, model) -> None:
    """Enough training paragraphs for one step of pairs, and pairs that fit the model's context."""
    sp, batch = settings.self_play, settings.optimization.batch_size
    needed, length = batch * processes, 1 + sp.self_play_prompt_tokens + sp.self_play_new_tokens
    if length > context_length(model):
        raise UserError(
            f"--self-play-prompt-tokens {sp.self_play_prompt_tokens} + --self-play-new-tokens "
            f"{sp.self_play_new_tokens} exceed the model's {context_length(model)} positions; lower them"
        )
    if min(len(openings), sp.self_play_pairs) < needed:
        raise UserError(
            f"self-play needs {needed} pairs for one step ({batch} x {processes} processes) and has "
            f"{min(len(openings), sp.self_play_pairs)} (--self-play-pairs, and training paragraphs of {length - 1} "
            "tokens or more); raise --self-play-pairs or lower --batch-size"
        )


def draw_pairs(model, tokenizer, openings: list[list[int]], settings: TrainSettings, round_: int, autocast) -> Pairs:
    """Round `round_`'s pairs: openings drawn with the seed and the round, the model's continuations of them (each
    drawn with its own seeded generator, so every process draws the same ones) and both sides' log-probabilities
    under the model as it is now, the round's reference."""
    sp, seed = settings.self_play, settings.data.seed
    chosen = random.Random(f"{seed}/self-play/{round_}").sample(openings, min(sp.self_play_pairs, len(openings)))
    chosen = torch.tensor(chosen)
    opening = 1 + sp.self_play_prompt_tokens
    # The model's text as users sample it by default, run on past paragraph ends to the same length as the author's.
    sampling = SamplingSettings(
        max_new_tokens=sp.self_play_new_tokens, top_k=settings.samples.top_k, top_p=settings.samples.top_p
    )
    sampling = replace(sampling, paragraphs=None)
    eot, special, size = paragraph_frame(tokenizer)[1], special_token_ids(tokenizer), rows_per_call(model)
    model.eval()
    drawn: list[list[int]] = []
    with autocast:  # the training's (accelerator.autocast())
        for first in range(0, len(chosen), size):
            prompts = chosen[first : first + size, :opening].tolist()
            samples = [0] * len(prompts)  # one continuation per opening
            drawn += sample_ids(model, prompts, sampling, seed + round_, eot, samples=samples, special_ids=special)
        rejected = torch.cat([chosen[:, :opening], torch.tensor(drawn)], dim=1)
        ref_chosen, ref_rejected = (reference_log_probs(model, ids, opening) for ids in (chosen, rejected))
    model.train()
    return Pairs(chosen, rejected, ref_chosen, ref_rejected, opening)


@torch.no_grad()
def reference_log_probs(model, ids: torch.Tensor, opening: int, batch_size: int = 32) -> torch.Tensor:
    device = next(model.parameters()).device
    rows = range(0, len(ids), batch_size)
    parts = [continuation_log_probs(model, ids[i : i + batch_size].to(device), opening) for i in rows]
    return torch.cat(parts).float().cpu()


def continuation_log_probs(model, ids: torch.Tensor, opening: int) -> torch.Tensor:
    """(rows,): each row's summed log-probability of its tokens after the first `opening` ones."""
    logits = model(input_ids=ids).logits[:, opening - 1 : -1]  # position t predicts token t + 1
    return logits.float().log_softmax(-1).gather(-1, ids[:, opening:, None])[..., 0].sum(-1)


def pair_loss_sums(model, batch: dict, opening: int, beta: float, likelihood_weight: float):
    """(the batch's summed loss, its summed PAIR_STATS), on the device. The chosen and rejected rows go through
    one forward call."""
    logps = continuation_log_probs(model, torch.cat([batch["chosen"], batch["rejected"]]), opening)
    chosen, rejected = logps.chunk(2)
    new_tokens = batch["chosen"].shape[1] - opening
    margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
    spin = -F.logsigmoid(beta * margin)
    loss = spin - likelihood_weight * chosen / new_tokens
    stats = torch.stack([spin.sum(), chosen.sum() / new_tokens, rejected.sum() / new_tokens, margin.sum()])
    return loss.sum(), stats.detach()


def self_play_split(settings: TrainSettings, given: set[str], print_line) -> TrainSettings:
    """With --self-play-rounds, the split of the model's own run where the command line names none: a round's
    openings must be text the model trained on, and its validation text text it never saw."""
    if not settings.self_play.self_play_rounds:
        return settings
    model = settings.model.model
    if run_settings(model) is None and "data" not in given:
        raise UserError(
            f"self-play draws its openings from the training text of {model}, and {model} records no training run; "
            "give --data (and the split flags it was fine-tuned with)"
        )
    data, lines = take_split_from_runs(settings.data, [model], given)
    for line in lines:
        print_line(f"self-play {line}")
    return replace(settings, data=data)
