"""A model's loss on held-out batches: the summed next-token cross-entropy, per token and per character."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from austen_gpt.data.batches import to_device
from austen_gpt.models import chunked_loss

# ----------------------------------------------------------------------------------------------
# Loss, optimizer, one step


def lm_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over real targets (label != -100), and the number of targets.

    The labels are shifted left rather than the logits sliced, which would copy batch x length x vocab floats.
    No attention mask is passed: batches are right-padded, and under causal attention no real token sees a
    later position, so the padding cannot change their outputs (its own targets are -100). Given a mask,
    transformers reads it on the host at every forward to learn whether it masks anything: on a GPU, the
    host would wait for the device each time.
    """

    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    if head := chunked_loss.chunked_head(model):  # the output layer and the loss a chunk of tokens at a time
        return chunked_loss.loss_sum(model, head, batch["input_ids"], targets), (targets != -100).sum()
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


# ----------------------------------------------------------------------------------------------
# Validation and samples


def held_out_metrics(model, loader, accelerator, n_chars: int) -> dict[str, float]:
    """Validation loss per real token (pads excluded), its perplexity, and bits per character.

    Each process reads its own share of the paragraphs; the sums are added up across processes.
    """
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)  # summed loss, number of targets
    with torch.no_grad():
        for batch in loader:
            loss_sum, n_targets = lm_loss_sum(model, to_device(batch, accelerator.device))
            totals += torch.stack([loss_sum, n_targets.float()])
    model.train()
    nll, n_targets = accelerator.reduce(totals, "sum").tolist()
    return {
        "val_loss": nll / n_targets,
        "val_perplexity": math.exp(nll / n_targets),
        "val_bits_per_char": nll / math.log(2) / n_chars,
    }
