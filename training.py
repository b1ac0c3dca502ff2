"""What training, the style report and the benchmark share: device and precision, data loaders, the
loss, one optimizer step, validation and samples during training.

The loss of an optimizer step is the next-token cross-entropy summed over every real target of its
accumulation window (padding never counts), on every process, divided once by their total count: the same
update as one batch holding them all, however they are split into micro-batches and processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Device and precision


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32.

    AUSTEN_GPT_CPU_BF16=0 answers no on any CPU: the tests set it, so that --precision auto computes in fp32
    everywhere and the suite's numbers and times do not depend on which kind of CPU runs it."""
    if os.environ.get("AUSTEN_GPT_CPU_BF16") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """The Accelerator's mixed_precision for --precision ("no" is fp32); auto: bf16 where native."""
    if precision != "auto":
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype matmuls run in under an Accelerator's mixed_precision (also 4-bit layers' compute dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


# ----------------------------------------------------------------------------------------------
# Data loaders


def batch_loader(
    examples: list[list[int]], batch_size: int, pad_id: int, seed: int | None, unpredicted: int | None, state=None
):
    """This process's batches of `examples`: reshuffled per epoch from `seed` (None: in order, for validation);
    `unpredicted`: a token that is never a target (dataset.unpredicted_token).

    Our own sharding (accelerate's pads the last batch with repeated examples). Its own generator:
    starting an epoch must not draw from the global RNG, or a run resumed mid-epoch (whose epoch
    starts after the restore) would see other dropout masks.
    """
    from accelerate import PartialState
    from torch.utils.data import DataLoader

    from dataset import EpochBatches, collate, example_targets

    state = state or PartialState()
    targets = [example_targets(example, unpredicted) for example in examples]  # as collate labels them
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
    from dataset import tokenize_cached, unpredicted_token

    examples = tokenize_cached(tokenizer, paragraphs, block_size, False, cache)
    return batch_loader(examples, batch_size, tokenizer.pad_token_id, None, unpredicted_token(tokenizer))


def epoch_batches(loader, epoch: int, skip: int, device):
    """The epoch's batches in their (seed, epoch) order, minus the first `skip` (already trained on)."""
    loader.batch_sampler.set_epoch(epoch, skip)
    return (to_device(batch, device) for batch in loader)


def to_device(batch: dict, device) -> dict:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


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
    import chunked_loss

    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    if head := chunked_loss.chunked_head(model):  # the output layer and the loss a chunk of tokens at a time
        return chunked_loss.loss_sum(model, head, batch["input_ids"], targets), (targets != -100).sum()
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def make_optimizer(model, lr: float, eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW in two groups: weight decay on the matrices, none on biases and LayerNorm weights (the 1-D
    tensors), the usual exclusion (nanoGPT and transformers' Trainer make it too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass; on CPU it is ~6x faster than the default
    # per-tensor loop, which took a fifth of a GPT-2 124M bf16 step (bench.py, torch.profiler).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused or None)


def set_hyperparameters(optimizer, eps: float, weight_decay: float) -> None:
    """The flags' epsilon and weight decay (groups as make_optimizer makes them): a restored optimizer state
    brings back the values of the run that saved it. The learning rate is the schedule's."""
    for group in optimizer.param_groups:
        group["eps"] = eps
    optimizer.param_groups[0]["weight_decay"] = weight_decay


def linear_schedule(
    optimizer, lr: float, warmup_steps: int, total_steps: int, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to `lr`, then linear decay to 0 at `total_steps`; the optimizer's rate set for step
    `step` (0-based: the next step to take), so a resumed run follows the schedule its own flags define.

    A step's rate is lr x factor(step), a function of the step alone, so a run resumed with the same flags
    gets bitwise the rates of an uninterrupted one. The same factors as transformers'
    get_linear_schedule_with_warmup, written out because importing that one pulls in peft and bitsandbytes:
    3.5 s of every run's start on a CPU.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def ends_step(batches_done: int, batches_in_epoch: int, accumulate: int) -> bool:
    """Whether batch number `batches_done` (1-based) is the last of its optimizer step: one step per window
    of `accumulate` batches; an epoch's last window may be shorter."""
    return batches_done % accumulate == 0 or batches_done == batches_in_epoch


def forward_backward(model, batch: dict, accelerator, targets_in_window: int, sync: bool) -> torch.Tensor:
    """Backpropagate one batch's share of the step's loss; returns this batch's summed loss, on the device:
    nothing here makes the host wait for the device, or for another process.

    The step's loss is the sum over every target of the accumulation window on every process, divided by
    their count `targets_in_window` (EpochBatches.window_targets), so each token weighs the same whichever micro-batch
    and process holds it; x processes, as DDP averages gradients. Gradients are synchronized across
    processes only on the last batch of a window (`sync`). A non-finite loss is backpropagated too: its
    step is then skipped (see StepMeter), and its gradients are discarded with the others.
    """
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        loss_sum, _ = lm_loss_sum(model, batch)
        accelerator.backward(loss_sum * accelerator.num_processes / targets_in_window)
    return loss_sum.detach()


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer can skip a step on the device, given a flag tensor (torch's fused Adam and
    AdamW read `found_inf`, as GradScaler sets it); others need the host to decide."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's AcceleratedOptimizer
    return isinstance(inner, torch.optim.Adam) and bool(inner.defaults.get("fused"))


def optimizer_step(
    model, optimizer, scheduler, accelerator, max_grad_norm: float, skip: torch.Tensor | None = None
) -> float:
    """Clip, step, zero the gradients, schedule; returns the learning rate of this step. `skip` (1.0 on the
    device: the step's loss was not finite; only for an optimizer that `skips_on_device`) makes it leave
    weights and moments as they are, without the host reading the flag."""
    lr = optimizer.param_groups[0]["lr"]  # read before the schedule moves on to the next step's
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    if skip is not None:
        getattr(optimizer, "optimizer", optimizer).found_inf = skip
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return lr


class StepMeter:
    """The training loss, targets, tokens and non-finite losses since the last log point, kept on the device.

    Reading a number from a GPU makes the host wait until the GPU has caught up, which leaves it idle
    while the host prepares the next step. So the loop reads these only at log points (`read`), a
    handful of times per --log-every steps, and never between them.
    """

    def __init__(self, accelerator):
        self.accelerator, self.started, self.targets = accelerator, time.perf_counter(), 0
        zero = torch.zeros((), device=accelerator.device)
        self.loss_sum, self.tokens, self.step_loss = zero.clone(), zero.clone(), zero.clone()
        self.first_failed_step = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.failed_loss = zero.clone()

    def add(self, loss_sum: torch.Tensor, batch: dict) -> None:
        """One batch's summed loss (this process's), and its real (not padding) tokens."""
        self.step_loss += loss_sum
        self.tokens += batch["attention_mask"].sum()

    def end_step(self, step: int, targets: int) -> torch.Tensor:
        """Close optimizer step `step`, whose window held `targets` targets on all processes; returns its skip
        flag (1.0 if its loss was not finite), the same on every process. The first such step and its loss
        are remembered for `read`."""
        step_loss = self.accelerator.reduce(self.step_loss, "sum")  # one small all-reduce per step, if several
        failed = ~torch.isfinite(step_loss)
        first = failed & (self.first_failed_step == 0)
        self.first_failed_step = torch.where(first, step, self.first_failed_step)
        self.failed_loss = torch.where(first, step_loss / targets, self.failed_loss)
        self.loss_sum += step_loss
        self.targets += targets
        self.step_loss = torch.zeros_like(self.step_loss)
        return failed.float()

    def read(self) -> tuple[float, float, int, float]:
        """(loss per target since the last read, this process's tokens per second, first failed step or 0,
        its loss), read from the device at once, then restarted for the next interval."""
        numbers = [self.loss_sum, self.tokens, self.first_failed_step, self.failed_loss]
        numbers = torch.stack([number.double() for number in numbers])
        loss_sum, tokens, failed_step, failed_loss = numbers.cpu().tolist()
        mean, per_second = loss_sum / max(1, self.targets), tokens / (time.perf_counter() - self.started)
        self.started, self.targets = time.perf_counter(), 0
        self.loss_sum, self.tokens = torch.zeros_like(self.loss_sum), torch.zeros_like(self.tokens)
        return mean, per_second, int(failed_step), failed_loss


# ----------------------------------------------------------------------------------------------
# Validation and samples


def validate(model, loader, accelerator, n_chars: int) -> dict[str, float]:
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


def judge_validation(state, metrics: dict[str, float], threshold: float, max_copied: float | None) -> str:
    """Record a validation in `state` (a checkpoints.TrainingState) and say what it is.

    'best': the loss improves on the best so far by more than `threshold`, and (with `max_copied`) the
    samples copy no more than that share of their word 8-grams: the model of this point is the new best.
    'copying': it would have been best, but its samples copy too much. 'worse': no improvement.
    Early stopping counts every validation that is not 'best'.
    """
    state.metrics, state.last_validation_step = metrics, state.global_step
    improved = metrics["val_loss"] < state.best_val_loss - threshold
    copying = max_copied is not None and metrics.get("style_copied_8grams", 0.0) > max_copied
    if improved and not copying:
        state.best_val_loss, state.best_metrics = metrics["val_loss"], dict(metrics)
        state.best_step, state.best_epoch = state.global_step, state.current_epoch
        state.validations_without_improvement = 0
        return "best"
    state.validations_without_improvement += 1
    if improved:
        state.copy_guard_refusals.append(state.global_step)
        return "copying"
    return "worse"


def sample_texts(model, tokenizer, prompts: list[str], settings, seed: int) -> list[str]:
    """One sample per prompt, in eval mode, with its own seed (training's random stream is untouched)."""
    from generation import generate_paragraphs

    model.eval()
    texts = [generate_paragraphs(model, tokenizer, p, 1, settings, seed + i)[0] for i, p in enumerate(prompts)]
    model.train()
    return texts
