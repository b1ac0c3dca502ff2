"""Fine-tune a GPT-2-class model on one author's paragraphs (default: Jane Austen's six novels).

  python train.py                                                      # gpt2, austen_dataset.pkl, 4 epochs
  python train.py --model configs/gpt2-tiny --from-scratch --epochs 1  # offline CPU quickstart
  python train.py --restore-file Epoch_2 --load-checkpoint True        # resume after epoch 2

One hand-written loop on an accelerate.Accelerator, which owns the device, mixed precision, gradient
accumulation and multi-process distribution: the same code runs on a CPU, one GPU or many.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli import ArgumentParser, CliError, UserError, add_bool_flag, add_flag, quiet_libraries, require, run_cli

# torch, transformers and accelerate are imported inside functions, after the arguments are parsed,
# so that `--help` and argument errors answer at once.

DEFAULT_PROMPTS = ["", '"I cannot think," said she,', "The ball at"]
# Settings that decide the data split, the batches or the model: a resumed run must keep them.
MUST_MATCH_ON_RESUME = ("model", "from_scratch", "data", "train_size", "seed", "max_input_length", "packing")
MUST_MATCH_ON_RESUME += ("batch_size", "grad_accum_steps", "lora", "qlora", "load_in_8bit", "rank_lora", "alpha_lora")
MUST_MATCH_ON_RESUME += ("targets_lora",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    data = p.add_argument_group("data")
    add_flag(
        data,
        "--data",
        default="austen_dataset.pkl",
        help="paragraphs: .pkl, .txt, .jsonl, .json, .csv or a folder of .txt",
    )
    add_flag(data, "--train-size", type=float, default=0.9, help="share of paragraphs for training; the rest validate")
    add_flag(
        data,
        "--max-input-length",
        type=int,
        default=100,
        help="tokens per example; longer paragraphs are cut in several",
    )
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "austen-gpt")
    add_flag(data, "--data-cache", default=cache, help="folder of tokenized data, keyed by a hash of it; '' disables")
    add_bool_flag(
        data, "--packing", default=True, help="pack paragraphs into full blocks (no padding) instead of one per example"
    )

    model = p.add_argument_group("model")
    add_flag(model, "--model", default="gpt2", help="Hub id or local folder of the base model")
    add_bool_flag(model, "--from-scratch", help="random weights from the --model config instead of pretrained ones")
    add_bool_flag(model, "--lora", help="train LoRA adapters on the frozen base model instead of all weights")
    add_bool_flag(model, "--qlora", help="LoRA on the base model quantized to 4-bit NF4 (bitsandbytes)")
    add_bool_flag(model, "--load-in-8bit", help="LoRA on the base model quantized to 8-bit (bitsandbytes)")
    add_flag(model, "--rank-lora", type=int, default=64, help="LoRA rank")
    add_flag(model, "--alpha-lora", type=int, default=16, help="LoRA alpha (the update is scaled by alpha/rank)")
    add_flag(
        model, "--targets-lora", nargs="+", default=["c_attn"], help="layers that get adapters, e.g. c_attn c_proj"
    )
    add_flag(
        model,
        "--dropout",
        type=float,
        default=None,
        help="dropout of the model's embeddings, attention and residual stream (default: the model's own, 0.1 for "
        "GPT-2); not the adapters' (--lora-dropout)",
    )
    add_flag(model, "--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")

    optim = p.add_argument_group("optimization")
    add_flag(optim, "--epochs", type=int, default=4, help="passes over the training paragraphs")
    add_flag(optim, "--batch-size", type=int, default=8, help="examples per batch and device")
    add_flag(optim, "--grad-accum-steps", type=int, default=1, help="batches accumulated into one optimizer step")
    add_flag(optim, "--lr", type=float, default=5e-4, help="peak learning rate of AdamW")
    add_flag(optim, "--eps", type=float, default=1e-8, help="AdamW epsilon")
    add_flag(
        optim, "--weight-decay", type=float, default=0.0, help="AdamW weight decay (never on biases and LayerNorms)"
    )
    add_flag(optim, "--warmup-steps", type=int, default=100, help="linear warm-up steps, then linear decay to 0")
    add_flag(optim, "--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")
    add_flag(
        optim,
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32",
    )
    add_bool_flag(optim, "--gradient-checkpointing", help="recompute activations in backward: less memory, more time")
    add_bool_flag(optim, "--compile", help="torch.compile the model (inductor); pays a compile time at start")
    add_flag(optim, "--seed", type=int, default=42, help="seed of the split, the data order and new weights")

    sampling = p.add_argument_group("samples during training")
    add_flag(sampling, "--sample-every", type=int, default=100, help="print and log samples every N steps; 0 disables")
    add_flag(
        sampling, "--sample-prompts", nargs="+", default=DEFAULT_PROMPTS, help="their prompts; '' starts a paragraph"
    )
    add_flag(sampling, "--max-output-length", type=int, default=200, help="tokens per sample, prompt included")
    add_flag(sampling, "--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 disables")
    add_flag(sampling, "--top-p", type=float, default=0.95, help="nucleus sampling probability mass")
    add_bool_flag(
        sampling,
        "--eval-style",
        help="at each epoch end, sample continuations of data/eval_prompts.txt and log how much they read like the "
        "training text (a classifier against data/contrast novels), the share of copied word 8-grams and "
        "character names per 1,000 words (evaluate.py gives the full report)",
    )
    add_flag(sampling, "--eval-style-samples", type=int, default=12, help="samples of --eval-style, 100 tokens each")

    io = p.add_argument_group("checkpoints and outputs")
    add_flag(io, "--check-dir", default="Checkpoints", help="folder of the Epoch_N checkpoints and the run logs")
    add_flag(io, "--save-interval", type=int, default=1, help="checkpoint every N epochs (the last epoch always)")
    add_flag(io, "--save-steps", type=int, default=0, help="also checkpoint every N optimizer steps (Step_N); 0: off")
    add_flag(io, "--keep-last", type=int, default=0, help="keep only the newest K Step_N checkpoints; 0 keeps all")
    add_bool_flag(io, "--resume", help="continue from the newest complete checkpoint in --check-dir (if any)")
    add_flag(io, "--restore-file", default=None, help="checkpoint to resume from: Epoch_2 (in --check-dir) or a path")
    add_bool_flag(io, "--load-checkpoint", help="resume from --restore-file: weights, optimizer, schedule, RNG, step")
    add_flag(io, "--output-dir", default="GPT2_fine_tuned_Austen", help="where the final model and tokenizer go")
    add_bool_flag(io, "--overwrite-output-dir", help="replace a model already in --output-dir")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible settings before anything is loaded or written."""
    rules = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.lr > 0, "--lr must be positive"),
        (0 < args.train_size < 1, "--train-size must be between 0 and 1, e.g. 0.9"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1], e.g. 0.95"),
        (args.top_k >= 0, "--top-k must be 0 (off) or more"),
        (args.max_input_length >= 2, "--max-input-length must be at least 2 tokens"),
        (args.max_output_length >= 1, "--max-output-length must be at least 1"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (args.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
        (args.sample_every >= 0, "--sample-every must be 0 (off) or more"),
        (args.eval_style_samples >= 1, "--eval-style-samples must be at least 1"),
        (args.save_interval >= 1, "--save-interval must be at least 1"),
        (args.save_steps >= 0 and args.keep_last >= 0, "--save-steps and --keep-last must be 0 (off) or more"),
        (
            not (args.resume and args.restore_file),
            "--resume picks the newest checkpoint, --restore-file names one: use one",
        ),
        (args.eps > 0, "--eps must be positive"),
        (args.weight_decay >= 0 and args.max_grad_norm >= 0, "--weight-decay and --max-grad-norm must not be negative"),
        (args.restore_file or not args.load_checkpoint, "--load-checkpoint True needs --restore-file, e.g. Epoch_2"),
        (
            args.load_checkpoint or not args.restore_file,
            f"--restore-file {args.restore_file} needs --load-checkpoint True",
        ),
        (not Path(args.output_dir).is_file(), f"--output-dir {args.output_dir} is a file; pass a folder path"),
        (not (args.qlora and args.load_in_8bit), "--qlora (4-bit) and --load-in-8bit exclude each other; pick one"),
        (args.rank_lora >= 1, "--rank-lora must be at least 1, e.g. 16"),
        (args.alpha_lora > 0, "--alpha-lora must be positive, e.g. 16"),
        (0 <= args.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (args.dropout is None or 0 <= args.dropout < 1, "--dropout must be in [0, 1), e.g. 0.1 or 0"),
        (not (uses_adapters(args) and args.from_scratch), "LoRA freezes the base model: drop --from-scratch"),
    ]
    require(rules)
    output = Path(args.output_dir)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise UserError(f"--output-dir {output} already holds files; pass --overwrite-output-dir or another folder")


def uses_adapters(args: argparse.Namespace) -> bool:
    return args.lora or args.qlora or args.load_in_8bit


@dataclass
class Resume:
    """Where training starts: from nothing, or from a checkpoint's weights and states."""

    checkpoint: Path | None = None
    training_state: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, RNG tensors
    epoch: int = 0  # completed epochs
    global_step: int = 0
    batches_in_epoch: int = 0  # batches of the next epoch already trained on (a mid-epoch checkpoint)
    metrics: dict[str, float] = field(default_factory=dict)
    processes: int = 1  # the number of processes that trained the checkpoint


def plan_resume(args: argparse.Namespace) -> Resume:
    """Find, load and vet the checkpoint to resume from (--resume or --restore-file), if any."""
    from accelerate import PartialState

    from utils import find_checkpoint, incomplete_checkpoints, load_checkpoint_states, sorted_checkpoints

    check_dir = Path(args.check_dir)
    if not (args.resume or args.load_checkpoint):
        return Resume()
    skipped = incomplete_checkpoints(check_dir)
    if skipped:
        PartialState().print(f"ignoring incomplete checkpoints (an interrupted save): {', '.join(skipped)}")
    if args.load_checkpoint:
        checkpoint = find_checkpoint(check_dir, args.restore_file)
    elif complete := sorted_checkpoints(check_dir):
        checkpoint = complete[-1]
    else:
        PartialState().print(f"--resume: no complete checkpoint in {check_dir} yet, starting from the beginning")
        return Resume()
    training_state, trainer_state = load_checkpoint_states(checkpoint)
    if "optimizer" not in training_state:
        raise UserError(
            f"{checkpoint} holds no optimizer state (it was written under FSDP or DeepSpeed); "
            + continue_from_weights(checkpoint)
        )
    check_resume_settings(trainer_state["args"], args, checkpoint)
    resume = Resume(
        checkpoint,
        training_state,
        trainer_state["epoch"],
        trainer_state["global_step"],
        trainer_state.get("batches_in_epoch", 0),
        trainer_state["metrics"],
        trainer_state.get("processes", 1),
    )
    if resume.epoch >= args.epochs:
        raise UserError(f"{checkpoint} already completed {resume.epoch} epochs; raise --epochs to train further")
    return resume


def continue_from_weights(checkpoint: Path) -> str:
    """The way on from a checkpoint without optimizer state: a new run that starts from its weights."""
    new_run = "--check-dir <a new folder>"
    if (Path(checkpoint) / "adapter_config.json").exists():
        merge = f"python export.py --adapter {checkpoint} --out <merged>"
        return f"merge its adapters into a model ({merge}) and start a new run from it: --model <merged> {new_run}"
    return f"start a new run from its weights: --model {checkpoint} {new_run}"


def check_resume_settings(saved: dict[str, Any], args: argparse.Namespace, checkpoint: Path) -> None:
    """Settings that shape the data or the model must match the checkpoint's; others may change, and are logged."""
    from accelerate import PartialState

    for key in MUST_MATCH_ON_RESUME:
        if saved.get(key) != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"cannot resume: {checkpoint} was trained with {flag} {saved.get(key)}, not {getattr(args, key)}"
            )
    ignored = {"resume", "restore_file", "load_checkpoint", "overwrite_output_dir"}
    changed = [
        f"--{key.replace('_', '-')} {saved.get(key)} -> {value}"
        for key, value in vars(args).items()
        if key not in ignored and saved.get(key) != value
    ]
    if changed:
        PartialState().print(f"resuming with changed settings: {'; '.join(changed)}")


def refuse_overwrites(args: argparse.Namespace, resume: Resume, total_steps: int) -> None:
    """Stop before training if this run would overwrite, prune or mix up another run's checkpoints or logs."""
    from utils import checkpoint_progress, sorted_checkpoints

    check_dir = Path(args.check_dir)
    start = (resume.global_step, resume.epoch)
    later = [p.name for p in sorted_checkpoints(check_dir) if checkpoint_progress(p) > start]
    if later or (not resume.checkpoint and not args.resume and (check_dir / "logs").exists()):
        found = f"checkpoints ({', '.join(later[-3:])})" if later else "the logs of another run"
        where = f"beyond {resume.checkpoint.name}" if resume.checkpoint else "from another run"
        raise UserError(f"{check_dir} holds {found} {where}; continue with --resume, or use another --check-dir")
    epochs = range(resume.epoch + 1, args.epochs + 1)
    planned = [check_dir / f"Epoch_{e}" for e in epochs if e % args.save_interval == 0 or e == args.epochs]
    if args.save_steps:
        steps = range(resume.global_step + 1, total_steps + 1)
        planned += [check_dir / f"Step_{s}" for s in steps if s % args.save_steps == 0]
    clashes = [p.name for p in planned if p.exists()]
    if clashes:
        raise UserError(f"{check_dir} holds {', '.join(clashes[:3])}, which this run would write; move them away")


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) asks the loop to stop after the current
    optimizer step, with a checkpoint. A second signal exits at once: checkpoint writes are atomic,
    so an interrupted save leaves only a `.tmp` folder that is never resumed from."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again quits at once)", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(argv: list[str]) -> str:
    """This run's command line with --resume in place of any restore flags."""
    restore_flags = {"--resume", "--restore-file", "--restore_file", "--load-checkpoint", "--load_checkpoint"}
    kept, drop_value = [], False
    for token in argv:
        if drop_value and not token.startswith("--"):
            drop_value = False
            continue
        name = token.split("=", 1)[0]
        drop_value = name in restore_flags and "=" not in token
        if name not in restore_flags:
            kept.append(token)
    return shlex.join(["python", "train.py", *kept, "--resume"])


def resolve_precision(precision: str) -> str:
    """The Accelerator's mixed_precision for --precision ("no" is fp32)."""
    import torch

    if precision != "auto":
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_model(args: argparse.Namespace, resume: Resume, precision: str):
    """The model to train, with activation checkpointing if asked for."""
    model = load_trainable_model(args, resume, precision)
    if args.dropout is not None:
        set_dropout(model, args.dropout)
    if args.gradient_checkpointing:
        # Recompute each block's activations in the backward pass: far less memory, ~1/3 more compute.
        # The non-reentrant kind replays the same dropout masks, so the result does not change.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def set_dropout(model, p: float) -> None:
    """Every dropout of the model (GPT-2: embeddings, attention, residual) but the adapters', and its config."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = p
    for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):  # so the saved config says what was trained
        if hasattr(model.config, key):
            setattr(model.config, key, p)


def load_trainable_model(args: argparse.Namespace, resume: Resume, precision: str):
    """All weights, or LoRA adapters on a frozen (optionally 4/8-bit) base.

    A full fine-tune resumes from the checkpoint's weights; a LoRA run reloads --model and then the
    checkpoint's adapters.
    """
    import torch
    from accelerate import PartialState

    import lora
    from utils import load_model

    if not uses_adapters(args):
        return load_model(
            str(resume.checkpoint or args.model), from_scratch=args.from_scratch and not resume.checkpoint
        )
    bits = 4 if args.qlora else 8 if args.load_in_8bit else None
    kwargs = {}
    if bits:
        device = PartialState().device
        lora.require_bitsandbytes(device, "--qlora" if bits == 4 else "--load-in-8bit")
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kwargs = {"quantization_config": lora.quantization_config(bits, compute_dtype), "device_map": {"": device}}
    model = load_model(args.model, **kwargs)
    if bits == 4:
        lora.keep_4bit_weights_trainable(model)
    if resume.checkpoint:
        return lora.load_lora(model, resume.checkpoint, quantized=bool(bits), trainable=True)
    return lora.add_lora(
        model,
        args.rank_lora,
        args.alpha_lora,
        args.lora_dropout,
        args.targets_lora,
        quantized=bool(bits),
        base_name=args.model,
    )


def capture_states(accelerator, optimizer, scheduler) -> dict[str, Any]:
    """All an exact resume needs besides the weights, as tensors and numbers (no pickled objects).

    Every process calls it; with several processes the optimizer state is the same on each (DDP).
    Under FSDP or DeepSpeed each process holds only its part of it, which is left out: such a
    checkpoint gives its weights to a new run and is never resumed (its scheduler and RNG states are
    kept only so that every checkpoint has the same layout).
    """
    from accelerate.utils import gather_object

    from utils import rng_state

    # Every process's random state (its dropout masks differ), in process order; a collective call.
    rngs = gather_object([rng_state()])
    states = {"scheduler": scheduler.state_dict(), "rng": rngs}
    if not optimizer_state_is_split(accelerator):
        states["optimizer"] = optimizer.state_dict()
    if accelerator.scaler is not None:  # fp16 loss scaling
        states["scaler"] = accelerator.scaler.state_dict()
    return states


def check_optimizer_state_fits(optimizer) -> None:
    """Moments shaped like their parameters, or the first step would fail (an FSDP shard, say, is not)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for name, value in optimizer.state.get(parameter, {}).items():
                if value.dim() and value.shape != parameter.shape:
                    raise UserError(
                        f"the checkpoint's optimizer state does not fit this model ({name} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(parameter.shape)}); "
                        "start a new run from its weights"
                    )


def restore_states(states: dict[str, Any], accelerator, optimizer, scheduler) -> None:
    from utils import set_rng_state

    optimizer.load_state_dict(states["optimizer"])
    check_optimizer_state_fits(optimizer)
    scheduler.load_state_dict(states["scheduler"])
    rng = states["rng"]
    set_rng_state(rng[accelerator.process_index] if isinstance(rng, list) else rng)  # a list since v2 checkpoints
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(states["scaler"])


def make_loaders(args: argparse.Namespace, tokenizer, train_paragraphs: list[str], val_paragraphs: list[str]):
    """This process's training batches (packed or padded, reshuffled per epoch) and validation batches.

    Validation always reads one paragraph per example, starting from end-of-text as generation does,
    so its loss means the same whether training packs or pads.
    """
    import torch
    from accelerate import PartialState
    from torch.utils.data import DataLoader

    from dataset import EpochBatches, collate, tokenize_cached

    def collate_batch(examples: list[list[int]]):
        return collate(examples, tokenizer.pad_token_id)

    cache = Path(args.data_cache).expanduser() if args.data_cache else None
    train = tokenize_cached(tokenizer, train_paragraphs, args.max_input_length, args.packing, cache)
    val = tokenize_cached(tokenizer, val_paragraphs, args.max_input_length, False, cache)

    state = PartialState()

    def loader(examples: list[list[int]], seed: int | None) -> DataLoader:
        # Our own sharding (accelerate's pads the last batch with repeated examples). Its own generator:
        # starting an epoch must not draw from the global RNG, or a run resumed mid-epoch (whose epoch
        # starts after the restore) would see other dropout masks.
        batches = EpochBatches(len(examples), args.batch_size, seed, state.process_index, state.num_processes)
        generator = torch.Generator().manual_seed(args.seed)
        pin = torch.cuda.is_available()  # page-locked batches copy to the GPU faster
        return DataLoader(
            examples, batch_sampler=batches, collate_fn=collate_batch, generator=generator, pin_memory=pin
        )

    return loader(train, args.seed), loader(val, None)


def make_optimizer(model, args: argparse.Namespace):
    """AdamW with no weight decay on biases and LayerNorm weights (the 1-D tensors), as GPT-2 was trained."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass; on CPU it is ~6x faster than the default
    # per-tensor loop, which took a fifth of a GPT-2 124M bf16 step (bench.py, torch.profiler).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=args.lr, eps=args.eps, fused=fused or None)


def lm_loss_sum(model, batch: dict):
    """Next-token cross-entropy summed over real targets (label != -100), and the number of targets.

    The labels are shifted left rather than the logits sliced, which would copy batch x length x vocab floats.
    """
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def to_device(batch: dict, device) -> dict:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def evaluate(model, loader, accelerator, n_chars: int) -> dict[str, float]:
    """Validation loss per real token (pads excluded), its perplexity, and bits per character.

    Each process reads its own share of the paragraphs; the sums are added up across processes.
    """
    import torch

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


def sample_texts(model, tokenizer, prompts: list[str], settings, seed: int) -> list[str]:
    """One sample per prompt, in eval mode, with its own seed (training's random stream is untouched)."""
    from generation import generate_paragraphs

    model.eval()
    texts = [generate_paragraphs(model, tokenizer, p, 1, settings, seed + i)[0] for i, p in enumerate(prompts)]
    model.train()
    return texts


STYLE_PROBE_TOKENS = 100  # per --eval-style sample: long enough to judge, short enough for every epoch


def make_style_probe(args: argparse.Namespace, train_paragraphs: list[str]):
    """--eval-style: fit once a classifier of the training text against the contrast novels and a copying
    index; returns measure(model, tokenizer, seed) -> the style metrics of fresh samples."""
    import statistics

    import style
    from generation import SamplingSettings, generate_samples, read_prompts

    repo = Path(__file__).resolve().parent
    contrast = style.load_novels(repo / "data/contrast")
    names, masked = style.names_to_mask(train_paragraphs, contrast)
    words = round(STYLE_PROBE_TOKENS * 0.75)  # GPT-2 tokens per English word: about 4/3
    classifier = style.AuthorClassifier.fit({"training text": train_paragraphs}, contrast, words, masked, False)
    copying = style.Copying(train_paragraphs, names)
    prompts = read_prompts(repo / "data/eval_prompts.txt")
    settings = SamplingSettings(
        max_new_tokens=STYLE_PROBE_TOKENS, top_k=args.top_k, top_p=args.top_p, stop_at_end_of_text=False
    )

    def measure(model, tokenizer, seed: int) -> dict[str, float]:
        model.eval()
        samples = generate_samples(model, tokenizer, prompts, args.eval_style_samples, settings, seed)
        model.train()
        texts = [s["text"] for s in samples]
        return {
            "style_p_author": statistics.mean(classifier.p_author(texts)),
            "style_copied_8grams": copying.ngram_rate(texts),
            "style_names_per_1000_words": copying.names_per_1000_words(texts),
        }

    return measure


def parallelism(accelerator) -> str:
    """How several processes share the work, for the log: DDP, FSDP2 or DeepSpeed ZeRO-2, say."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return "DDP"


def describe_run(args: argparse.Namespace, accelerator, model, train_loader, val_loader, steps_per_epoch: int) -> str:
    """The start-of-run summary: data, model, trainable share, memory, device, batch and schedule."""
    from lora import parameter_counts

    trainable, total = parameter_counts(model)
    footprint = accelerator.unwrap_model(model).get_memory_footprint() / 2**20
    effective_batch = args.batch_size * args.grad_accum_steps * accelerator.num_processes
    processes = f"{accelerator.num_processes} processes"
    if accelerator.num_processes > 1:
        processes += f", {parallelism(accelerator)}"
    return (
        f"examples: {len(train_loader.dataset):,} training / {len(val_loader.dataset):,} validation of "
        f"<= {args.max_input_length} tokens ({'packed' if args.packing else 'one paragraph each'})\n"
        f"model: {args.model}{' + LoRA' * uses_adapters(args)}, {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%), {footprint:,.0f} MiB in memory, on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}\n"
        f"batches: {effective_batch} examples per optimizer step ({args.batch_size} x {args.grad_accum_steps} "
        f"accumulated x {processes}), {steps_per_epoch} steps per epoch, "
        f"{steps_per_epoch * args.epochs} in all\n"
        f"schedule: AdamW lr {args.lr:g}, linear warm-up over {args.warmup_steps} steps, then linear decay to 0 at "
        f"step {steps_per_epoch * args.epochs}"
    )


def optimizer_state_is_split(accelerator) -> bool:
    """FSDP and DeepSpeed hold each process's part of the optimizer state only (DDP: all of it on each)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def refuse_unsupported(accelerator, args: argparse.Namespace, resume: Resume) -> None:
    """What this loop does not do under FSDP and DeepSpeed."""
    from accelerate.utils import DistributedType

    if optimizer_state_is_split(accelerator) and resume.checkpoint:
        raise UserError(
            "resuming under FSDP or DeepSpeed is not supported (the optimizer state is split over the processes); "
            "resume with DDP (torchrun or configs/accelerate/ddp.yaml), or " + continue_from_weights(resume.checkpoint)
        )
    if accelerator.distributed_type == DistributedType.FSDP and args.load_in_8bit:
        # bitsandbytes' 8-bit layers lose their quantization state when FSDP2 shards their weights
        raise UserError(
            "--load-in-8bit is not supported under FSDP; use --qlora, or DDP (torchrun or configs/accelerate/ddp.yaml)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED and args.grad_accum_steps > 1:
        raise UserError("under DeepSpeed use --grad-accum-steps 1 (DeepSpeed steps at every backward)")


def configure_deepspeed(accelerator, args: argparse.Namespace) -> None:
    """DeepSpeed reads the batch size off prepare()d loaders, which ours are not, and clips inside its
    own step (accelerator.clip_grad_norm_ only reports the norm there): both come from the flags."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config["gradient_clipping"] = args.max_grad_norm


def start_processes():
    """Accelerate's process state, set up before anything asks for it.

    Launched by torchrun on a machine without CUDA, the processes train on CPU over gloo; accelerate
    does so only when told (ACCELERATE_USE_CPU=true), and otherwise runs each process alone. DeepSpeed
    has a CPU accelerator of its own, which accelerate starts only when given the gloo backend.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched_without_cuda = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if launched_without_cuda and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return PartialState(backend="gloo")
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or launched_without_cuda)


def max_over_processes(accelerator, value: int) -> int:
    """The largest `value` of all processes, so that they all take the same decision at the same step."""
    import torch

    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def epoch_batches(loader, epoch: int, skip: int, device):
    """The epoch's batches in their (seed, epoch) order, minus the first `skip` (already trained on)."""
    loader.batch_sampler.set_epoch(epoch, skip)
    return (to_device(batch, device) for batch in loader)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    quiet_libraries()
    stop = StopSignals()
    try:
        return train(args, stop, resume_command(sys.argv[1:] if argv is None else argv))
    finally:
        stop.restore()


def train(args: argparse.Namespace, stop: StopSignals, resume_cmd: str) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    import utils
    from dataset import load_paragraphs, split_paragraphs, text_chars
    from generation import SamplingSettings, context_length
    from runlog import RunLog

    # ---- everything that can fail on bad input fails here, before any work or write -------------------
    processes = start_processes()
    resume = plan_resume(args)
    if resume.checkpoint and resume.processes != processes.num_processes:
        raise UserError(
            f"{resume.checkpoint} was trained by {resume.processes} processes; resume it with {resume.processes}, "
            f"not {processes.num_processes} (the data order and random states are per process)"
        )
    train_paragraphs, val_paragraphs = split_paragraphs(load_paragraphs(args.data), args.train_size, args.seed)
    precision = resolve_precision(args.precision)
    tokenizer = utils.load_tokenizer(str(resume.checkpoint or args.model))
    # The same random weights (--from-scratch, new LoRA adapters) in every process: DDP and DeepSpeed
    # would copy the first process's, FSDP2 would keep each process's own shard of different ones.
    set_seed(args.seed)
    model = build_model(args, resume, precision)
    if processes.num_processes > 1:
        set_seed(args.seed + processes.process_index)  # then each process its own dropout masks
    if args.max_input_length > context_length(model):
        raise UserError(
            f"--max-input-length {args.max_input_length} exceeds the model's {context_length(model)} positions"
        )
    for prompt in args.sample_prompts:  # a prompt that fills the context would fail mid-run, not now
        if len(tokenizer(prompt)["input_ids"]) + 1 >= min(args.max_output_length, context_length(model)):
            raise UserError(f"--sample-prompts {prompt!r} leaves no room within --max-output-length; shorten it")
    with processes.main_process_first():  # the first process fills the token cache, the others read it
        train_loader, val_loader = make_loaders(args, tokenizer, train_paragraphs, val_paragraphs)
    val_chars = text_chars(val_paragraphs)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    refuse_overwrites(args, resume, steps_per_epoch * args.epochs)

    torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls on Ampere and newer GPUs
    dynamo = TorchDynamoPlugin(backend="inductor" if args.compile else "no")
    # Accumulation is written out in the loop (the last window of an epoch may be short); the loaders
    # are not prepare()d, as they already hold this process's share of the data.
    accelerator = Accelerator(mixed_precision=precision, dynamo_plugin=dynamo)
    refuse_unsupported(accelerator, args, resume)
    configure_deepspeed(accelerator, args)
    sharded = optimizer_state_is_split(accelerator)  # checkpoints without optimizer state, no resuming
    optimizer = make_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Stepped by hand once per optimizer step, not prepare()d (Accelerate would step it once per
    # process), so --warmup-steps counts optimizer steps on any number of devices.
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, steps_per_epoch * args.epochs)
    if resume.checkpoint:
        restore_states(resume.training_state, accelerator, optimizer, scheduler)
        accelerator.print(
            f"resumed from {resume.checkpoint}: step {resume.global_step}, epoch {resume.epoch + 1} "
            f"after {resume.batches_in_epoch} of its {len(train_loader)} batches"
        )

    accelerator.print(f"data: {len(train_paragraphs):,} training / {len(val_paragraphs):,} validation paragraphs")
    accelerator.print(describe_run(args, accelerator, model, train_loader, val_loader, steps_per_epoch))
    sampling = SamplingSettings(max_length=args.max_output_length, top_k=args.top_k, top_p=args.top_p)
    # Samples and the style probe run on every process: under FSDP each forward gathers the sharded weights.
    style_probe = make_style_probe(args, train_paragraphs) if args.eval_style else None
    global_step, metrics, last_saved = resume.global_step, resume.metrics, resume.checkpoint
    best_val_loss = metrics.get("val_best_loss", math.inf)

    def save(name: str, epochs_done: int, batches_in_epoch: int) -> Path:
        """A checkpoint of this exact moment: weights (or adapters), optimizer (not under FSDP or DeepSpeed),
        schedule, RNG, position."""
        folder, started = Path(args.check_dir) / name, time.perf_counter()
        states = capture_states(accelerator, optimizer, scheduler)  # on every process: they send their RNG
        weights = accelerator.get_state_dict(model)  # on every process: under FSDP, gathers the shards
        if accelerator.is_main_process:
            progress = {
                "epoch": epochs_done,
                "global_step": global_step,
                "batches_in_epoch": batches_in_epoch,
                "metrics": metrics,
                "processes": accelerator.num_processes,
                "args": vars(args),
            }
            utils.save_checkpoint(folder, accelerator.unwrap_model(model), tokenizer, states, progress, weights)
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            accelerator.print(f"saved {folder} ({size:,.1f} MiB in {time.perf_counter() - started:.2f} s)")
        return folder

    def stopped() -> int:
        accelerator.wait_for_everyone()  # until the first process has written the checkpoint
        way_on = continue_from_weights(last_saved) if sharded else f"resume with:\n  {resume_cmd}"
        accelerator.print(f"stopped by {signal.Signals(stop.received).name} at step {global_step}; {way_on}")
        return 128 + stop.received  # 130 for Ctrl-C, 143 for SIGTERM

    # ---- the loop: forward, backward, clip, step, schedule; samples, validation, checkpoints ------------
    model.train()
    with RunLog(Path(args.check_dir) / "logs", resume.global_step, enabled=accelerator.is_main_process) as run_log:
        for epoch in range(resume.epoch, args.epochs):
            skip = resume.batches_in_epoch if epoch == resume.epoch else 0
            batches = epoch_batches(train_loader, epoch, skip, accelerator.device)
            bar = tqdm(
                batches,
                desc=f"epoch {epoch + 1}/{args.epochs}",
                initial=skip,
                total=len(train_loader),
                disable=not accelerator.is_main_process,
            )
            started, real_tokens = time.perf_counter(), 0
            for batches_done, batch in enumerate(bar, start=skip + 1):
                # One optimizer step per window of --grad-accum-steps batches; an epoch's last may be shorter.
                window_start = (batches_done - 1) // args.grad_accum_steps * args.grad_accum_steps
                window = min(args.grad_accum_steps, len(train_loader) - window_start)
                last_in_window = batches_done == window_start + window
                with contextlib.nullcontext() if last_in_window else accelerator.no_sync(model):
                    loss_sum, n_targets = lm_loss_sum(model, batch)
                    # The mean over the real tokens of every process's batch (padding never counts), the
                    # same loss one process would get from all of them; x processes, as DDP averages gradients.
                    totals = accelerator.reduce(torch.stack([loss_sum.detach(), n_targets.float()]), "sum")
                    loss = totals[0] / totals[1]
                    if not torch.isfinite(loss):  # the same verdict on every process: all stop together
                        raise CliError(
                            f"the loss became {loss.item()} at step {global_step + 1}; stopped without "
                            f"saving. Last good checkpoint: {last_saved}; "
                            f"{'go on from its weights' if sharded else 'resume from it'} with a lower --lr"
                        )
                    accelerator.backward(loss_sum * accelerator.num_processes / totals[1] / window)
                real_tokens += int(batch["attention_mask"].sum())
                if not last_in_window:
                    continue
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
                global_step += 1
                lr, tokens_per_s = scheduler.get_last_lr()[0], real_tokens / (time.perf_counter() - started)
                bar.set_postfix(
                    step=global_step, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}"
                )
                run_log.metrics(global_step, epoch + 1, train_loss=loss.item(), train_lr=lr)
                if args.sample_every and global_step % args.sample_every == 0:
                    unwrapped, seed = accelerator.unwrap_model(model), args.seed + global_step
                    texts = sample_texts(unwrapped, tokenizer, args.sample_prompts, sampling, seed)
                    if accelerator.is_main_process:
                        tqdm.write("\n".join(f"[step {global_step}] {text}" for text in texts))
                    run_log.samples(global_step, epoch + 1, args.sample_prompts, texts)
                stop.received = max_over_processes(accelerator, stop.received or 0) or None  # one stopped: all stop
                if stop.received or (args.save_steps and global_step % args.save_steps == 0):
                    last_saved = save(f"Step_{global_step}", epoch, batches_done)
                    if args.keep_last and accelerator.is_main_process:
                        utils.prune_step_checkpoints(Path(args.check_dir), args.keep_last)
                if stop.received:
                    return stopped()

            metrics = evaluate(model, val_loader, accelerator, val_chars)
            metrics["val_best_loss"] = best_val_loss = min(best_val_loss, metrics["val_loss"])
            if style_probe:
                metrics.update(style_probe(accelerator.unwrap_model(model), tokenizer, args.seed + epoch))
                accelerator.print(
                    f"epoch {epoch + 1} style: P(reads like the training text) {metrics['style_p_author']:.2f}, "
                    f"copied 8-grams {metrics['style_copied_8grams']:.1%}, "
                    f"{metrics['style_names_per_1000_words']:.1f} character names per 1,000 words"
                )
            run_log.metrics(global_step, epoch + 1, **metrics)
            accelerator.print(
                f"epoch {epoch + 1}: validation loss {metrics['val_loss']:.4f} (best {metrics['val_best_loss']:.4f}), "
                f"perplexity {metrics['val_perplexity']:.2f}, {metrics['val_bits_per_char']:.3f} bits/char"
            )
            if (epoch + 1) % args.save_interval == 0 or epoch + 1 == args.epochs or stop.received:
                last_saved = save(f"Epoch_{epoch + 1}", epoch + 1, 0)
            if stop.received:
                return stopped()

    weights = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        # Sampling defaults, so that pipeline("text-generation") samples as inference.py does.
        final.generation_config.update(
            do_sample=True, top_k=args.top_k, top_p=args.top_p, pad_token_id=tokenizer.pad_token_id
        )
        notes = {"training_metrics.json": {"global_step": global_step, **metrics}}
        utils.save_model_folder(Path(args.output_dir), final, tokenizer, replace=True, notes=notes, state_dict=weights)
        accelerator.print(
            f'final model in {args.output_dir}: python inference.py --model_path {args.output_dir} --prompt "..."'
        )
    accelerator.wait_for_everyone()  # a process leaving while the first still saves can hang its shutdown
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    run_cli(main)
