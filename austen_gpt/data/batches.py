"""Examples to batches: padding and labels, the epoch's order across processes, loaders and device moves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from austen_gpt.data.tokens import TokenBlocks, tokenize_cached, unpredicted_token


def collate(examples: list[list[int]], pad_id: int, unpredicted: int | None = None) -> dict[str, Any]:
    """Right-pad a batch; padding gets label -100 by the attention mask (pad may equal end-of-text).

    `unpredicted` (a begin-of-text token distinct from end-of-text, see paragraph_frame) gets -100 too: it
    always follows end-of-text in packed blocks, so predicting it teaches nothing and would flatter the loss.
    """

    if not examples:  # a process's empty share of a last batch: one token, which has no target
        examples = [[pad_id]]
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example)
        attention_mask[row, : len(example)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if unpredicted is not None:
        labels = labels.masked_fill(input_ids == unpredicted, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class EpochBatches:
    """One process's batches of an epoch, a pure function of (seed, epoch, process, number of processes).

    The epoch's order is a fresh permutation drawn from seed + epoch (seed None: corpus order, for
    validation), cut into global batches of batch_size x processes examples; process r takes the r-th
    slice of each. The last, short global batch is shared out as evenly as possible. So every example
    is read exactly once per epoch, whatever the number of processes, and every process runs the
    same number of steps (a process whose share is empty gets an empty batch: see collate). Resuming
    at epoch N replays epoch N's order exactly; `skip` leaves out the batches already trained on.
    `targets`: each example's prediction targets (TokenBlocks.targets), for window_targets.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int | None,
        rank: int = 0,
        processes: int = 1,
        targets: list[int] | None = None,
    ):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.processes, self.targets = rank, processes, targets
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[list[int]]:
        """Every process's examples of each batch of the epoch, skipped ones included."""

        if self.seed is None:
            order = list(range(self.size))
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        step = self.batch_size * self.processes
        return [order[start : start + step] for start in range(0, self.size, step)]

    def window_targets(self, accumulate: int) -> list[int]:
        """For each batch of the epoch, the prediction targets of its whole accumulation window of `accumulate`
        batches, every process's examples counted.

        Host integers, known before any forward: every process knows the whole epoch's order, so none waits
        for a device, or for another process, to learn them.
        """
        per_batch = [sum(self.targets[i] for i in chunk) for chunk in self.global_batches()]
        windows = [max(1, sum(per_batch[i : i + accumulate])) for i in range(0, len(per_batch), accumulate)]
        return [windows[i // accumulate] for i in range(len(per_batch))]

    def __iter__(self):
        for chunk in self.global_batches()[self.skip :]:
            n = len(chunk)  # = batch_size x processes except in the last global batch
            yield chunk[self.rank * n // self.processes : (self.rank + 1) * n // self.processes]

    def __len__(self) -> int:
        return math.ceil(self.size / (self.batch_size * self.processes))


# ----------------------------------------------------------------------------------------------
# Data loaders


def batch_loader(
    examples: TokenBlocks, batch_size: int, pad_id: int, seed: int | None, unpredicted: int | None, state=None
):
    """This process's batches of `examples`: reshuffled per epoch from `seed` (None: in order, for validation);
    `unpredicted`: a token that is never a target (dataset.unpredicted_token).

    Our own sharding (accelerate's pads the last batch with repeated examples). Its own generator:
    starting an epoch must not draw from the global RNG, or a run resumed mid-epoch (whose epoch
    starts after the restore) would see other dropout masks.
    """

    state = state or PartialState()
    targets = examples.targets(unpredicted)  # as collate labels them
    batches = EpochBatches(len(examples), batch_size, seed, state.process_index, state.num_processes, targets)
    return DataLoader(
        examples,
        batch_sampler=batches,
        collate_fn=lambda chunk: collate(chunk, pad_id, unpredicted),
        generator=torch.Generator().manual_seed(seed or 0),
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU faster
    )


def validation_loader(tokenizer, paragraphs: list[str], block_size: int, batch_size: int, cache: Path | None = None):
    """One paragraph per example, starting from end-of-text as generation does, so the validation loss
    means the same whether training packs or pads."""

    examples = tokenize_cached(tokenizer, paragraphs, block_size, False, cache)
    return batch_loader(examples, batch_size, tokenizer.pad_token_id, None, unpredicted_token(tokenizer))


def epoch_batches(loader, epoch: int, skip: int, device):
    """The epoch's batches in their (seed, epoch) order, minus the first `skip` (already trained on)."""
    loader.batch_sampler.set_epoch(epoch, skip)
    return (to_device(batch, device) for batch in loader)


def to_device(batch: dict, device) -> dict:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}
