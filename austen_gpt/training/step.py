"""One optimizer step: the optimizer and its schedule, forward and backward with accumulation, the meter.

The loss of an optimizer step is the next-token cross-entropy summed over every real target of its
accumulation window (padding never counts), on every process, divided once by their total count: the same
update as one batch holding them all, however they are split into micro-batches and processes.
"""

from __future__ import annotations

import contextlib
import time

import torch

from austen_gpt.models.evaluation import lm_loss_sum


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


class CastsPerStep:
    """One autocast region around each accumulation window, so that each weight is cast to the compute dtype
    once per optimizer step rather than at every micro-batch's forward.

    Autocast keeps its casts of the weights until the outermost region ends; accelerate opens a region in
    each forward, which would end there. Opened before the window's first forward (`open`) and ended before
    the optimizer changes the weights (`close`), the casts of the first micro-batch serve the others, and
    their gradients flow back to the weights as before. Not where the weights are sharded (FSDP, DeepSpeed),
    which gather and free them at each forward; in fp32 there is nothing to cast."""

    def __init__(self, accelerator, sharded: bool):
        self.accelerator, self.region = accelerator, None
        self.enabled = not sharded and accelerator.mixed_precision in ("bf16", "fp16")

    def open(self) -> None:
        if self.enabled and self.region is None:
            self.region = self.accelerator.autocast()
            self.region.__enter__()

    def close(self) -> None:
        if self.region is not None:
            self.region.__exit__(None, None, None)
            self.region = None


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
