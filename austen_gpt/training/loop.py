"""The training loop: set-up, then epochs of steps with logging, samples, validation, checkpoints and the
final model.

Set-up first (everything that can fail on bad input fails there, before any work or write), then the
loop. One hand-written loop on an accelerate.Accelerator, which owns the device, mixed precision and
multi-process distribution: the same code runs on a CPU, one GPU or many.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.utils import TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from austen_gpt.cli import (
    CliError,
    UserError,
)
from austen_gpt.data.batches import batch_loader, epoch_batches, validation_loader
from austen_gpt.data.paragraphs import Split, split_data, text_chars
from austen_gpt.data.tokens import TokenBlocks, tokenize_cached, unpredicted_token
from austen_gpt.flags import REPO
from austen_gpt.models import loading
from austen_gpt.models.device import compute_dtype, resolve_precision
from austen_gpt.models.evaluation import held_out_metrics
from austen_gpt.models.lora import adapted_layers, parameter_counts
from austen_gpt.models.saving import EXPORT_NOTE, copy_model_folder, save_model_folder
from austen_gpt.sampling.generation import model_positions, sample_texts, window_note
from austen_gpt.settings import SamplingSettings, flat_settings
from austen_gpt.style.probe import StyleProbe
from austen_gpt.training import checkpoints, distributed, hot_path, self_play
from austen_gpt.training.checkpoints import continue_from_weights
from austen_gpt.training.distributed import StopSignals, full_state_dict, parallelism, unwrapped
from austen_gpt.training.logs import NOT_SETTINGS, RunLog, tracker_settings, write_run_file
from austen_gpt.training.settings import (
    OptimizationSettings,
    TrainingSamplesSettings,
    TrainSettings,
    check_settings,
)
from austen_gpt.training.state import TrainingState, judge_validation
from austen_gpt.training.step import (
    CastsPerStep,
    StepMeter,
    ends_step,
    forward_backward,
    linear_schedule,
    make_optimizer,
    optimizer_step,
    set_hyperparameters,
    skips_on_device,
)

BEST_NOTE = "best.json"  # beside the model in <check-dir>/best/: its step, epoch and validation numbers


@dataclass
class Run:
    """The objects of one training run, made by set_up()."""

    settings: TrainSettings
    accelerator: Accelerator
    model: torch.nn.Module  # as prepare()d: wrapped under DDP, FSDP or DeepSpeed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: PreTrainedTokenizerBase
    train_loader: DataLoader
    val_loader: DataLoader
    val_chars: int  # characters of the validation paragraphs, for bits per character
    total_steps: int  # optimizer steps of the whole run: --epochs of them, or --max-steps if fewer
    sharded: bool  # FSDP/DeepSpeed: checkpoints hold no optimizer state and are not resumed
    style_probe: StyleProbe | None = None  # with --eval-style (and self-play)
    openings: list[list[int]] | None = None  # self-play: the training paragraphs' openings a round draws from
    pairs: self_play.Pairs | None = None  # self-play: the round's pairs, once drawn (or resumed)

    @cached_property
    def sampling(self) -> SamplingSettings:
        """How the periodic samples are drawn."""
        samples = self.settings.samples
        return SamplingSettings(max_length=samples.max_output_length, top_k=samples.top_k, top_p=samples.top_p)

    @cached_property
    def skips_steps_on_device(self) -> bool:
        """Whether a step with a non-finite loss is skipped on the device (fused AdamW, not sharded)."""
        return skips_on_device(self.optimizer) and not self.sharded


def train(settings: TrainSettings, resume_cmd: str = "python train.py --resume") -> int:
    """Train as `settings` say: train.py's job, callable from a notebook. Ctrl-C or SIGTERM stops after the
    current step with a checkpoint, and `resume_cmd` is the way on that is printed then. Returns 0, or the exit
    code of the signal (130 for Ctrl-C, 143 for SIGTERM)."""
    check_settings(settings)
    stop = StopSignals()
    try:
        return train_loop(settings, stop, resume_cmd)
    finally:
        stop.restore()


def train_loop(settings: TrainSettings, stop: StopSignals, resume_cmd: str) -> int:
    """Forward, backward, clip, step, schedule; samples, validation and checkpoints on their schedules.

    Between log points the host never waits for the device: losses, token counts and the non-finite
    check stay on it (training.StepMeter), and a step with a non-finite loss is skipped there. At a log
    point (every --log-every steps, and wherever a sample, validation or checkpoint needs the host anyway)
    the numbers are read, logged, and checked; the processes agree on a stop signal there too.
    """

    run, state = set_up(settings)
    accelerator, model, opt = run.accelerator, run.model, settings.optimization
    n_batches, accumulate, early_stop = len(run.train_loader), opt.grad_accum_steps, False
    cut = state.global_step >= run.total_steps  # --max-steps reached (resumed from its last checkpoint)
    casts = CastsPerStep(accelerator, run.sharded)
    model.train()
    with RunLog(logs_folder(settings), state.global_step, accelerator, flat_settings(settings)) as log:
        if settings.self_play.self_play_rounds:
            return self_play_loop(run, state, stop, resume_cmd, log)
        for epoch in range(state.epoch, opt.epochs if not cut else state.epoch):
            batches = epoch_batches(run.train_loader, epoch, state.batches_in_epoch, accelerator.device)
            targets = run.train_loader.batch_sampler.window_targets(accumulate)  # host integers, for each batch
            bar = progress_bar(run, batches, epoch, state.batches_in_epoch)
            meter = StepMeter(accelerator)
            for batch in bar:
                state.batches_in_epoch += 1
                targets_in_window = targets[state.batches_in_epoch - 1]
                step_now = ends_step(state.batches_in_epoch, n_batches, accumulate)
                casts.open()  # the weights' casts to bf16 serve the whole window
                loss_sum = forward_backward(model, batch, accelerator, targets_in_window, sync=step_now)
                meter.add(loss_sum, batch)
                if not step_now:
                    continue
                casts.close()  # before the optimizer changes the weights
                skip = skip_flag(run, state, meter, targets_in_window)
                lr = optimizer_step(model, run.optimizer, run.scheduler, accelerator, opt.max_grad_norm, skip)
                state.global_step += 1
                cut = state.global_step == run.total_steps and state.batches_in_epoch < n_batches  # --max-steps
                log_now, sample, evaluate, checkpoint = scheduled(settings, state, n_batches, cut)
                if not log_now:
                    continue  # the device runs ahead: nothing was read from it
                log_step(run, state, log, bar, meter, lr)  # the log point
                if sample:
                    log_samples(run, state, log)
                if evaluate:
                    early_stop = validate(run, state, log)
                if save_or_stop(run, state, stop, checkpoint, f"Step_{state.global_step}"):
                    return stopped(run, state, stop, resume_cmd)
                if early_stop or cut:
                    break
            if early_stop or cut:
                break
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            if state.last_validation_step != state.global_step:  # not yet validated at this step
                early_stop = validate(run, state, log)
            finished = state.epoch == opt.epochs or state.global_step >= run.total_steps  # --max-steps at an epoch end
            due = state.epoch % settings.checkpoints.save_interval == 0 or finished
            if save_or_stop(run, state, stop, due, f"Epoch_{state.epoch}"):
                return stopped(run, state, stop, resume_cmd)
            if early_stop or finished:
                break
        write_final_model(run, state, early_stop)
    return 0


def self_play_loop(run: Run, state: TrainingState, stop: StopSignals, resume_cmd: str, log: RunLog) -> int:
    """--self-play-rounds: each round draws its pairs with the model as it stands (the round's reference), makes
    one pass over them with the SPIN loss (training/self_play.py), then validates and checkpoints (Round_N). The
    model as given is validated first, so that best/ is a round only where it beats it. The steps are the likelihood
    loop's: the same accumulation, meter, schedule, log points, samples, Step_N checkpoints and stop signals."""

    settings, accelerator, model, sp = run.settings, run.accelerator, run.model, run.settings.self_play
    accumulate, early_stop, casts = settings.optimization.grad_accum_steps, False, CastsPerStep(accelerator, False)
    if state.last_validation_step is None:
        early_stop = validate(run, state, log)
    for round_ in range(state.epoch, sp.self_play_rounds if not early_stop else state.epoch):
        if run.pairs is None:  # not resumed inside this round
            # read under autocast, as training computes: at the round's first step the policy's numbers are these
            reference = unwrapped(accelerator, model)
            run.pairs = self_play.draw_pairs(
                reference, run.tokenizer, run.openings, settings, round_, accelerator.autocast()
            )
        batches = run.pairs.batches(
            settings.optimization.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            settings.data.seed + round_,
            accelerator.device,
        )
        pairs_per_batch, n_batches = settings.optimization.batch_size * accelerator.num_processes, len(batches)
        bar = progress_bar(run, batches[state.batches_in_epoch :], round_, state.batches_in_epoch, n_batches)
        meter, stats = StepMeter(accelerator), torch.zeros(len(self_play.PAIR_STATS), device=accelerator.device)
        model.train()
        for batch in bar:
            state.batches_in_epoch += 1
            step_now = ends_step(state.batches_in_epoch, n_batches, accumulate)
            window = state.batches_in_epoch - (state.batches_in_epoch - 1) % accumulate - 1  # its first batch - 1
            targets = pairs_per_batch * (min(window + accumulate, n_batches) - window)  # pairs in the step's window
            casts.open()
            with contextlib.nullcontext() if step_now else accelerator.no_sync(model):
                loss_sum, batch_stats = self_play.pair_loss_sums(
                    model, batch, run.pairs.opening, sp.self_play_beta, sp.self_play_likelihood_weight
                )
                accelerator.backward(loss_sum * accelerator.num_processes / targets)
            meter.add(loss_sum.detach(), batch)
            stats += batch_stats
            if not step_now:
                continue
            casts.close()
            skip = skip_flag(run, state, meter, targets)
            lr = optimizer_step(
                model, run.optimizer, run.scheduler, accelerator, settings.optimization.max_grad_norm, skip
            )
            state.global_step += 1
            log_now, sample, _, checkpoint = scheduled(settings, state, n_batches, False)
            if not log_now:
                continue
            pairs = meter.targets  # since the last log point (log_step restarts the count)
            log_step(run, state, log, bar, meter, lr)
            stats = log_pair_stats(run, state, log, stats, pairs)
            if sample:
                log_samples(run, state, log)
            if save_or_stop(run, state, stop, checkpoint, f"Step_{state.global_step}"):
                return stopped(run, state, stop, resume_cmd)
        state.epoch, state.batches_in_epoch, run.pairs = round_ + 1, 0, None
        early_stop = validate(run, state, log)
        if save_or_stop(run, state, stop, True, f"Round_{state.epoch}"):
            return stopped(run, state, stop, resume_cmd)
        if early_stop:
            break
    write_final_model(run, state, early_stop)
    return 0


def log_pair_stats(run: Run, state: TrainingState, log: RunLog, stats: torch.Tensor, pairs: int) -> torch.Tensor:
    """Log the means per pair of the SPIN loss, the chosen and rejected log-probabilities (per token) and their
    margin since the last log point (`stats`: this process's sums over them, `pairs`: all processes' count); returns
    the zeroed sums for the next interval."""
    totals = run.accelerator.reduce(stats, "sum").cpu().tolist()
    means = {
        f"self_play_{name}": total / max(1, pairs) for name, total in zip(self_play.PAIR_STATS, totals, strict=True)
    }
    log.metrics(state.global_step, state.current_epoch, **means)
    return torch.zeros_like(stats)


# ---- set-up: each step can fail on bad input, and does so before any training or write -----------------


def set_up(settings: TrainSettings) -> tuple[Run, TrainingState]:
    """(Run, TrainingState): data, model, optimizer and schedule, restored from a checkpoint if resuming."""

    processes = distributed.start_processes()
    resume = checkpoints.plan_resume(settings, processes.num_processes, processes.print)
    split = split_data(settings.data)
    train_paragraphs, val_paragraphs = split.train, split.val
    precision = resolve_precision(settings.optimization.precision)
    tokenizer = loading.load_tokenizer(str(resume.checkpoint or settings.model.model))
    model = trainable_model(settings, resume.checkpoint, precision, processes, tokenizer.pad_token_id)
    loading.check_vocabulary(model, tokenizer, str(resume.checkpoint or settings.model.model))
    check_lengths(settings, model, tokenizer)
    with processes.main_process_first():  # the first process fills the token cache, the others read it
        train_loader, val_loader = make_loaders(settings, tokenizer, train_paragraphs, val_paragraphs)
    opt, sp = settings.optimization, settings.self_play
    total_steps = math.ceil(len(train_loader) / opt.grad_accum_steps) * opt.epochs
    openings = None
    if sp.self_play_rounds:
        openings = self_play.training_openings(
            tokenizer, train_paragraphs, sp.self_play_prompt_tokens, sp.self_play_new_tokens
        )
        self_play.check_openings(openings, settings, processes.num_processes, model)
        batches = min(sp.self_play_pairs, len(openings)) // (opt.batch_size * processes.num_processes)
        total_steps = math.ceil(batches / opt.grad_accum_steps) * sp.self_play_rounds
    total_steps = min(total_steps, opt.max_steps) if opt.max_steps else total_steps
    checkpoints.refuse_overwrites(settings, resume, total_steps)
    record_trained_positions(model, train_loader.dataset, settings.model.from_scratch, settings.model.adapters)
    accelerator = make_accelerator(settings, precision, resume)
    sharded = distributed.optimizer_state_is_split(accelerator)
    if sharded and sp.self_play_rounds:
        raise UserError("self-play runs on one process or under DDP, not FSDP or DeepSpeed: launch it without them")
    compute = compute_dtype(accelerator.mixed_precision)
    choices = hot_path.device_choices(accelerator.device, compute, resume.state.device_choices)
    if resume.state.device_choices is None:
        resume.state.device_choices = hot_path.record(choices)
    elif choices != hot_path.device_choices(accelerator.device, compute, None):
        accelerator.print(f"resuming with the run's own device choices: {resume.state.device_choices}")
    hot_path.install_lean_layers(model, opt, choices, compute, settings.data.max_input_length, sharded)
    model, optimizer, scheduler = optimizer_and_schedule(model, opt, accelerator, resume, total_steps)
    if resume.checkpoint:
        accelerator.print(describe_resume(resume, len(train_loader), scheduler.get_last_lr()[0]))
    if accelerator.is_main_process:
        write_run_file(logs_folder(settings), flat_settings(settings), resolved_settings(accelerator, choices))
    val_chars = text_chars(val_paragraphs)
    run = Run(
        settings,
        *(accelerator, model, optimizer, scheduler, tokenizer, train_loader, val_loader),
        *(val_chars, total_steps, sharded),
        openings=openings,
    )
    if "self_play_pairs" in resume.tensors and resume.state.batches_in_epoch:  # resumed inside a round
        run.pairs = self_play.Pairs.from_tensors(resume.tensors["self_play_pairs"])
    accelerator.print(describe_run(run, split))
    if note := window_note(unwrapped(accelerator, model)):  # samples during training keep to the trained positions
        accelerator.print(note)
    for warning in questionable_settings(settings, len(train_loader), total_steps):
        accelerator.print(f"warning: {warning}")
    samples = settings.samples
    if samples.eval_style or sp.self_play_rounds:  # on every process: under FSDP each forward gathers the weights
        run.style_probe = style_probe(samples, settings.data.seed, train_paragraphs, val_paragraphs, accelerator.print)
        if sp.self_play_rounds and run.style_probe.two_sample is None:
            raise UserError(
                "self-play picks best/ by distinguishability from held-out text, and this split holds too little "
                f"validation text for {samples.eval_style_samples} samples; lower --eval-style-samples or --train-size"
            )
    return run, resume.state


def trainable_model(
    settings: TrainSettings, checkpoint: Path | None, precision: str, processes: PartialState, pad_token_id: int
) -> torch.nn.Module:
    """The model (or base and adapters) with the run's dropout and sampling defaults, seeded alike in every
    process: DDP and DeepSpeed would copy the first process's new weights, FSDP2 would keep each process's own
    shard of different ones. Each process then gets its own stream, for its own dropout masks."""
    set_seed(settings.data.seed)
    gradient_checkpointing = settings.optimization.gradient_checkpointing
    model = loading.load_trainable_model(settings.model, checkpoint, precision, gradient_checkpointing)
    # Self-play without dropout (as TRL's DPO): the pairs' reference numbers are read without it, and dropout in
    # the policy alone would move the SPIN margin by noise.
    dropout = 0.0 if settings.self_play.self_play_rounds else settings.model.dropout
    if dropout is not None and (note := loading.set_dropout(model, dropout)):
        processes.print(f"warning: {note}")
    if processes.num_processes > 1:
        set_seed(settings.data.seed + processes.process_index)
    # Sampling defaults in every saved model, so that pipeline("text-generation") samples as inference.py does.
    samples = settings.samples
    model.generation_config.update(do_sample=True, top_k=samples.top_k, top_p=samples.top_p, pad_token_id=pad_token_id)
    return model


def make_accelerator(settings: TrainSettings, precision: str, resume: checkpoints.Resume) -> Accelerator:
    """The Accelerator of this run's precision, compilation and trackers, refusing what the loop does not do
    under the distribution it was launched with (FSDP, DeepSpeed)."""
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls on Ampere and newer GPUs
    opt = settings.optimization
    dynamo = TorchDynamoPlugin(backend="inductor" if opt.compile else "no")
    trackers = tracker_settings(settings.validation.report_to, logs_folder(settings), resume.state.global_step)
    # Accumulation is written out in the loop (the last window of an epoch may be short); the loaders
    # are not prepare()d, as they already hold this process's share of the data.
    accelerator = Accelerator(mixed_precision=precision, dynamo_plugin=dynamo, **trackers)
    distributed.refuse_unsupported(accelerator, resume.checkpoint, settings.model.load_in_8bit, opt.grad_accum_steps)
    distributed.configure_deepspeed(accelerator, opt.batch_size, opt.max_grad_norm)
    return accelerator


def optimizer_and_schedule(model, opt: OptimizationSettings, accelerator, resume: checkpoints.Resume, total_steps: int):
    """(model, optimizer, scheduler) as prepare()d, restored from the checkpoint if resuming; the schedule these
    settings define, at the step to take next."""
    optimizer = make_optimizer(model, opt.lr, opt.eps, opt.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume.checkpoint:  # the moments, steps and RNG; this run's settings then set eps, decay and the rate
        checkpoints.restore_states(resume.tensors, accelerator, optimizer)
        set_hyperparameters(optimizer, opt.eps, opt.weight_decay)
    # Stepped by hand once per optimizer step, not prepare()d (Accelerate would step it once per process), so
    # --warmup-steps counts optimizer steps.
    scheduler = linear_schedule(optimizer, opt.lr, opt.warmup_steps, total_steps, resume.state.global_step)
    return model, optimizer, scheduler


def style_probe(
    samples: TrainingSamplesSettings, seed: int, train: list[str], val: list[str], print_line
) -> StyleProbe:
    """--eval-style's measures, saying which of them this much validation text cannot give."""
    probe = StyleProbe(train, val, samples.eval_style_samples, samples.top_k, samples.top_p, REPO)
    if probe.classifier is None:
        print_line(
            "warning: --eval-style logs no P(author): its classifier needs a passage (about 75 words) or more "
            "of validation text"
        )
    if probe.two_sample is None:
        print_line(
            "warning: --eval-style logs no distinguishability: it needs --eval-style-samples 10 or more and "
            f"{3 * samples.eval_style_samples * probe.TOKENS:,} words of validation text"
        )
    return probe


def logs_folder(settings: TrainSettings) -> Path:
    return Path(settings.checkpoints.check_dir) / "logs"


def record_trained_positions(model, examples: TokenBlocks, from_scratch: bool, adapters: bool) -> None:
    """Where the positions were not pretrained, write in the model's config how many this run trains, so that
    every sampler keeps its window within them (generation.context_length), from checkpoints, best/ and
    exports alike. A block of n tokens trains positions 0 to n-2: the last one has no target, and under causal
    attention it reaches no other position, so its embedding row gets no gradient. A later run raises the
    record only; adapters leave the positions as they were."""
    recorded = getattr(model.config, "trained_positions", None)
    if adapters or not (from_scratch or recorded):
        return
    longest = examples.longest() - 1
    model.config.trained_positions = max(recorded or 0, longest)


def resolved_settings(accelerator, choices: hot_path.DeviceChoices) -> dict[str, Any]:
    """What this machine made of the run's settings: for the record in run.yaml, never read back."""
    return {
        "precision": accelerator.mixed_precision,
        "device_choices": hot_path.record(choices),
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }


def describe_resume(resume, n_batches: int, lr: float) -> str:
    """Where the run goes on from, and its learning rate there: the one its checkpoint's schedule gave and the
    one this run's flags give (they differ where --lr, --epochs or --warmup-steps changed)."""
    state, before = resume.state, resume.tensors["scheduler"]["_last_lr"][0]
    rate = f"learning rate {lr:.4g}"
    if before != lr:
        rate = f"learning rate {before:.4g} -> {lr:.4g} (this run's schedule)"
    return (
        f"resumed from {resume.checkpoint}: step {state.global_step}, epoch {state.epoch + 1} after "
        f"{state.batches_in_epoch} of its {n_batches} batches; {rate}"
    )


def check_lengths(settings: TrainSettings, model, tokenizer) -> None:
    """Examples and sample prompts must fit the model's context (a prompt that does not would fail mid-run)."""

    positions, length, samples = model_positions(model), settings.data.max_input_length, settings.samples
    if length > positions:
        raise UserError(f"--max-input-length {length} exceeds the model's {positions} positions")
    for prompt in samples.sample_prompts:
        if len(tokenizer(prompt)["input_ids"]) + 1 >= min(samples.max_output_length, positions):
            raise UserError(f"--sample-prompts {prompt!r} leaves no room within --max-output-length; shorten it")


def make_loaders(settings: TrainSettings, tokenizer, train_paragraphs: list[str], val_paragraphs: list[str]):
    """This process's training batches (packed or padded, reshuffled per epoch) and validation batches."""

    data, batch_size = settings.data, settings.optimization.batch_size
    cache = Path(data.data_cache).expanduser() if data.data_cache else None
    examples = tokenize_cached(tokenizer, train_paragraphs, data.max_input_length, data.packing, cache)
    unpredicted = unpredicted_token(tokenizer)
    train_loader = batch_loader(examples, batch_size, tokenizer.pad_token_id, data.seed, unpredicted)
    val_loader = validation_loader(tokenizer, val_paragraphs, data.max_input_length, batch_size, cache)
    return train_loader, val_loader


def describe_run(run: Run, split: Split) -> str:
    """The start-of-run summary: data, model, trainable share, memory, device, batch and schedule."""

    settings, accelerator = run.settings, run.accelerator
    data, opt = settings.data, settings.optimization
    trainable, total = parameter_counts(run.model)
    model = unwrapped(accelerator, run.model)
    adapters = f" + LoRA on {' '.join(adapted_layers(model))}" if settings.model.adapters else ""
    footprint = model.get_memory_footprint() / 2**20
    effective_batch = opt.batch_size * opt.grad_accum_steps * accelerator.num_processes
    distributed = f"{accelerator.num_processes} processes"
    if accelerator.num_processes > 1:
        distributed += f", {parallelism(accelerator)}"
    step_path = hot_path.describe(run.model, accelerator.device, compute_dtype(accelerator.mixed_precision))
    steps_per_epoch = math.ceil(len(run.train_loader) / opt.grad_accum_steps)
    unit, per_pass = "examples", f"{steps_per_epoch} steps per epoch"
    if rounds := settings.self_play.self_play_rounds:
        sp = settings.self_play
        unit, per_pass = "pairs", f"{run.total_steps // rounds} steps per self-play round of {sp.self_play_pairs} pairs"
        per_pass += f" ({sp.self_play_prompt_tokens} tokens of opening, {sp.self_play_new_tokens} of continuation)"
    tokens = [sum(loader.batch_sampler.targets) for loader in (run.train_loader, run.val_loader)]
    return (
        f"data: {split.describe()}; {tokens[0]:,} / {tokens[1]:,} tokens to predict\n"
        f"examples: {len(run.train_loader.dataset):,} training / {len(run.val_loader.dataset):,} validation of "
        f"<= {data.max_input_length} tokens ({'packed' if data.packing else 'one paragraph each'})\n"
        f"model: {settings.model.model}{adapters}, {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%), {footprint:,.0f} MiB in memory, on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}, {step_path}\n"
        f"batches: {effective_batch} {unit} per optimizer step ({opt.batch_size} x {opt.grad_accum_steps} "
        f"accumulated x {distributed}), {per_pass}, {run.total_steps} in all\n"
        f"schedule: AdamW lr {opt.lr:g}, linear warm-up over {opt.warmup_steps} steps, then linear decay to 0 at "
        f"step {run.total_steps}"
    )


def questionable_settings(settings: TrainSettings, batches_per_epoch: int, total_steps: int) -> list[str]:
    """Settings that are allowed but that cannot do what they say in this run."""
    opt, val, warnings = settings.optimization, settings.validation, []
    if opt.warmup_steps > total_steps:
        peak = opt.lr * total_steps / opt.warmup_steps
        warnings.append(
            f"--warmup-steps {opt.warmup_steps} is longer than the whole run ({total_steps} steps): the learning "
            f"rate never reaches --lr {opt.lr:g} (it peaks at {peak:.2g})"
        )
    if settings.self_play.self_play_rounds:  # validated at each round's end, whatever --epochs and --eval-steps say
        return warnings
    if val.eval_steps > total_steps:
        warnings.append(
            f"--eval-steps {val.eval_steps} is more than the run's {total_steps} steps: it validates at epoch ends"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / opt.grad_accum_steps)
    epoch_ends = {min(steps_per_epoch * e, total_steps) for e in range(1, opt.epochs + 1)}
    every = set(range(val.eval_steps, total_steps + 1, val.eval_steps)) if val.eval_steps else set()
    validations = len(epoch_ends | every)
    if val.early_stopping_patience >= validations:
        warnings.append(
            f"--early-stopping-patience {val.early_stopping_patience} can never stop this run: it validates "
            f"{validations} times (validate more often with --eval-steps)"
        )
    return warnings


# ---- what the loop does on its schedules ---------------------------------------------------------------


def progress_bar(run: Run, batches, epoch: int, skip: int, n_batches: int | None = None):
    """The bar of an epoch of `n_batches` batches (default: the training loader's), or of a self-play round."""
    from tqdm.auto import tqdm

    opt, disable, n_batches = (
        run.settings.optimization,
        not run.accelerator.is_main_process,
        n_batches or len(run.train_loader),
    )
    steps_before = epoch * math.ceil(n_batches / opt.grad_accum_steps)
    total = min(n_batches, (run.total_steps - steps_before) * opt.grad_accum_steps)  # --max-steps may end it early
    rounds = run.settings.self_play.self_play_rounds
    name = f"self-play round {epoch + 1}/{rounds}" if rounds else f"epoch {epoch + 1}/{opt.epochs}"
    return tqdm(batches, name, total=total, initial=skip, disable=disable)


def scheduled(settings: TrainSettings, state, n_batches: int, cut: bool) -> tuple[bool, bool, bool, bool]:
    """(a log point, a sample, a validation, a checkpoint) after this step. Samples, validations and
    checkpoints need the host anyway, so each is a log point too, as is an epoch's last step. `cut`: the run
    ends here, mid-epoch (--max-steps), so it validates and checkpoints here as an epoch's end would."""
    step, val = state.global_step, settings.validation
    every = (settings.samples.sample_every, val.eval_steps, settings.checkpoints.save_steps)
    sample, evaluate, checkpoint = (due(n, step) for n in every)
    evaluate, checkpoint = evaluate or cut, checkpoint or cut
    last = state.batches_in_epoch == n_batches
    return due(val.log_every, step) or sample or evaluate or checkpoint or last, sample, evaluate, checkpoint


def due(every: int, step: int) -> bool:
    """Whether a --*-every/--*-steps schedule (0: off) falls on `step`."""
    return bool(every) and step % every == 0


def log_step(run: Run, state, log, bar, meter, lr: float) -> None:
    """Read the steps since the last log point from the device; stop on a non-finite loss among them,
    else update the bar and log their loss per target and the learning rate of the last step."""
    loss, tokens_per_s, failed_step, failed_loss = meter.read()
    if failed_step:  # skipped on the device; the same numbers on every process, so all stop together
        raise CliError(non_finite_loss(run, state, failed_step, failed_loss))
    bar.set_postfix(step=state.global_step, loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
    log.metrics(state.global_step, state.current_epoch, train_loss=loss, train_lr=lr)


def skip_flag(run: Run, state, meter, targets: int):
    """The step's flag for the optimizer, on the device: 1.0 if its loss was not finite. An optimizer that
    cannot skip a step on the device gets none: the host reads the flag first (and waits for the device)."""
    flag = meter.end_step(state.global_step + 1, targets)
    if run.skips_steps_on_device:
        return flag
    failed_step, failed_loss = (number.item() for number in (meter.first_failed_step, meter.failed_loss))
    if failed_step:
        raise CliError(non_finite_loss(run, state, failed_step, failed_loss))
    return None


def log_samples(run: Run, state, log) -> None:
    """One sample per --sample-prompts, printed and logged; seeded by the step, so a resumed run repeats them."""
    from tqdm.auto import tqdm

    model, prompts = unwrapped(run.accelerator, run.model), run.settings.samples.sample_prompts
    with run.accelerator.autocast():  # as training computes (PEFT's generate bypasses the wrapped forward)
        texts = sample_texts(model, run.tokenizer, prompts, run.sampling, run.settings.data.seed + state.global_step)
    if run.accelerator.is_main_process:
        tqdm.write("\n".join(f"[step {state.global_step}] {text}" for text in texts))
    log.samples(state.global_step, state.current_epoch, prompts, texts)


def validate(run: Run, state, log) -> bool:
    """Validation loss, perplexity and bits per character (with --eval-style, the style probe's measures);
    a new best model goes to <check-dir>/best/. Returns whether early stopping ends the run here."""

    settings, accelerator, val = run.settings, run.accelerator, run.settings.validation
    metrics = held_out_metrics(run.model, run.val_loader, accelerator, run.val_chars)
    if run.style_probe:  # seeded by the step: a resumed run draws the same samples
        model = unwrapped(accelerator, run.model)
        with accelerator.autocast():
            metrics.update(run.style_probe(model, run.tokenizer, settings.data.seed + state.global_step))
    measure, max_copied = "val_loss", val.max_copied_8grams
    if settings.self_play.self_play_rounds:  # best/ is the round least told apart, among those that do not copy
        metrics["self_play_round"] = state.epoch  # rounds completed: 0 is the model as given
        measure, max_copied = self_play.BEST_BY, self_play.COPY_GUARD if max_copied is None else max_copied
    verdict = judge_validation(state, metrics, val.early_stopping_threshold, max_copied, measure)
    log.metrics(state.global_step, state.current_epoch, **metrics, val_best_loss=state.best_val_loss)
    accelerator.print(describe_validation(state, metrics, verdict, max_copied, measure))
    if verdict == "best":
        save_best(run, state)
    log.curves(state.best_step)
    patience = val.early_stopping_patience
    return bool(patience) and state.validations_without_improvement >= patience


def describe_validation(
    state, metrics: dict[str, float], verdict: str, max_copied: float | None, measure: str = "val_loss"
) -> str:
    where = f"step {state.global_step} (epoch {state.current_epoch})"
    if "self_play_round" in metrics:
        where = f"step {state.global_step} (self-play round {metrics['self_play_round']})"
    by = "" if measure == "val_loss" else f"{measure.removeprefix('style_')} "
    best = "new best" if verdict == "best" else f"best {by}{state.best_val_loss:.4f} at step {state.best_step}"
    lines = [
        f"{where}: validation loss {metrics['val_loss']:.4f} ({best}), perplexity {metrics['val_perplexity']:.2f}, "
        f"{metrics['val_bits_per_char']:.3f} bits/char"
    ]
    if "style_p_author" in metrics:
        told_apart = metrics.get("style_distinguishability")
        lines.append(
            f"{where} style: P(author) {metrics['style_p_author']:.2f}, "
            + ("" if told_apart is None else f"distinguishability from held-out text {told_apart:.2f}, ")
            + f"copied 8-grams {metrics['style_copied_8grams']:.1%}, "
            f"{metrics['style_names_per_1000_words']:.1f} character names per 1,000 words"
        )
    if verdict == "copying":
        lines.append(
            f"{where}: the lowest {by or 'validation loss '}so far, but its samples copy "
            f"{metrics['style_copied_8grams']:.1%} of their word 8-grams (--max-copied-8grams {max_copied:g}): "
            "not kept as the best model"
        )
    return "\n".join(lines)


def save_best(run: Run, state) -> None:
    """This validation point's model as <check-dir>/best/, replacing the previous best (atomically)."""

    accelerator = run.accelerator
    weights = full_state_dict(accelerator, run.model)  # on every process: under FSDP, gathered from the shards
    if accelerator.is_main_process:
        note = {BEST_NOTE: {"step": state.best_step, "epoch": state.best_epoch, **state.best_metrics}}
        model = unwrapped(accelerator, run.model)
        save_model_folder(best_folder(run.settings), model, run.tokenizer, replace=True, notes=note, state_dict=weights)


def best_folder(settings: TrainSettings) -> Path:
    return Path(settings.checkpoints.check_dir) / "best"


def save(run: Run, state, name: str) -> None:
    """A checkpoint of this exact moment: weights (or adapters), optimizer (not under FSDP or DeepSpeed),
    schedule, RNG, position. With --keep-last, older Step_N checkpoints go once this one checks out."""

    accelerator, out, started = run.accelerator, run.settings.checkpoints, time.perf_counter()
    folder = Path(out.check_dir) / name
    # On every process: each sends its RNG state; under FSDP the weights are gathered from the shards.
    tensors = checkpoints.capture_states(accelerator, run.optimizer, run.scheduler, include_optimizer=not run.sharded)
    if run.pairs is not None and state.batches_in_epoch:  # inside a self-play round: its pairs, to resume it
        tensors["self_play_pairs"] = run.pairs.to_tensors()
    weights = full_state_dict(accelerator, run.model)
    if accelerator.is_main_process:
        model = unwrapped(accelerator, run.model)
        progress = state.to_json(flat_settings(run.settings), accelerator.num_processes)
        checkpoints.save_checkpoint(folder, model, run.tokenizer, tensors, progress, weights)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        accelerator.print(f"saved {folder} ({size:,.1f} MiB in {time.perf_counter() - started:.2f} s)")
        if name.startswith("Step_") and out.keep_last:
            deleted = checkpoints.prune_step_checkpoints(Path(out.check_dir), out.keep_last, folder)
            if deleted:
                accelerator.print(f"deleted {', '.join(deleted)} (--keep-last {out.keep_last})")
    state.last_checkpoint = folder


def save_or_stop(run: Run, state, stop: StopSignals, due: bool, name: str) -> bool:
    """The processes agree on a stop signal; the checkpoint `name` is saved if `due` or stopping. True: stop now."""
    stopping = stop.agree(run.accelerator)
    if stopping or due:
        save(run, state, name)
    return stopping


def stopped(run: Run, state, stop: StopSignals, resume_cmd: str) -> int:

    run.accelerator.wait_for_everyone()  # until the first process has written the checkpoint
    way_on = continue_from_weights(state.last_checkpoint) if run.sharded else f"resume with:\n  {resume_cmd}"
    run.accelerator.print(f"stopped by {stop.name} at step {state.global_step}; {way_on}")
    return 128 + stop.agreed  # 130 for Ctrl-C, 143 for SIGTERM


def non_finite_loss(run: Run, state, step: int, loss: float) -> str:
    way_on = "go on from its weights" if run.sharded else "resume from it"
    return (
        f"the loss became {loss} at step {step}; stopped without saving (that step left the weights as they "
        f"were). Last good checkpoint: {state.last_checkpoint}; {way_on} with a lower --lr"
    )


def write_final_model(run: Run, state, stopped_early: bool) -> None:
    """The final model (or adapters) in --output-dir: the best one with --load-best-at-end, else the last."""

    accelerator, settings, val = run.accelerator, run.settings, run.settings.validation
    if stopped_early:
        by = "distinguishability" if settings.self_play.self_play_rounds else "validation loss"
        accelerator.print(
            f"early stopping at step {state.global_step}: {val.early_stopping_patience} validations in a row without "
            f"a new best model (best: {by} {state.best_val_loss:.4f} at step {state.best_step})"
        )
    best = best_folder(settings) / BEST_NOTE
    best_step = json.loads(best.read_text())["step"] if best.is_file() else None
    use_best = val.load_best_at_end and state.best_step is not None and best_step == state.best_step
    if val.load_best_at_end and state.best_step is not None and not use_best:
        accelerator.print(
            f"warning: {best.parent} does not hold the best model (step {state.best_step}): moved or deleted? "
            "Exporting the last step's model instead"
        )
    last = state.last_point()
    exported = {"step": state.best_step, "epoch": state.best_epoch, **state.best_metrics} if use_best else last
    recorded = {k: v for k, v in flat_settings(settings).items() if k not in NOT_SETTINGS}  # as run.yaml has them
    note = {"exported": "best" if use_best else "last", **exported, "last_step": last, "settings": recorded}
    notes = {EXPORT_NOTE: note}
    # On every process whatever the choice (under FSDP a collective gather), so no process can wait alone.
    weights = full_state_dict(accelerator, run.model)
    if accelerator.is_main_process:
        output = Path(settings.checkpoints.output_dir)
        if use_best:
            copy_model_folder(best_folder(settings), output, leave_out={BEST_NOTE}, notes=notes)
        else:
            model = unwrapped(accelerator, run.model)
            save_model_folder(output, model, run.tokenizer, replace=True, notes=notes, state_dict=weights)
        accelerator.print(describe_export(settings.checkpoints.output_dir, exported, last, use_best))
    accelerator.wait_for_everyone()  # a process leaving while the first still saves can hang its shutdown


def describe_export(output_dir: str, exported: dict, last: dict, use_best: bool) -> str:
    def numbers(point: dict) -> str:
        if "val_loss" not in point:
            return "not validated"
        return f"validation loss {point['val_loss']:.4f}, {point['val_bits_per_char']:.3f} bits/char"

    which = "the best model" if use_best else "the last step's model"
    where = f"epoch {exported['epoch']}"
    if "self_play_round" in exported:
        where = f"self-play round {exported['self_play_round']}" + (", the model as given" * (not exported["step"]))
    return (
        f"final model in {output_dir}: {which}, from step {exported['step']} ({where}), "
        f"{numbers(exported)}; the last step, {last['step']}: {numbers(last)}\n"
        f'sample from it: python inference.py --model-path {output_dir} --prompt "..."'
    )
