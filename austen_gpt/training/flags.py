"""train.py's flags, in groups, and the checks that run on them before torch is imported."""

from __future__ import annotations

import argparse

from austen_gpt.cli import (
    ArgumentParser,
    add_bool_flag,
    add_flag,
    add_original_resume_flags,
    read_original_resume_flags,
)
from austen_gpt.flags import add_sampling_flags, add_split_flags
from austen_gpt.settings import from_flags
from austen_gpt.training.settings import TrainSettings

DEFAULTS = TrainSettings()  # the flags' defaults are the settings' own


def train_settings(argv: list[str] | None = None, description: str | None = None) -> TrainSettings:
    """train.py's command line (and run file) as the run's settings."""
    return from_flags(TrainSettings, parse_args(argv, description))


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    p = ArgumentParser(run_files=True, description=description)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_training_samples_flags(p.add_argument_group("samples during training"))
    add_validation_flags(p.add_argument_group("validation, the best model and early stopping"))
    add_outputs_flags(p.add_argument_group("checkpoints and outputs"))
    add_original_resume_flags(p)
    args = p.parse_args(argv)
    read_original_resume_flags(args)
    return args


def add_data_flags(group) -> None:
    """The paragraphs and how they become examples."""
    # --split-seed: the style report's name for it; --seed: the original project's
    add_split_flags(group, ("--split-seed", "--seed"), "seed", "seed of the split, the data order and new weights")
    add_flag(
        group,
        "--max-input-length",
        type=int,
        default=DEFAULTS.data.max_input_length,
        help="tokens per example; longer paragraphs are cut in several",
    )
    add_flag(
        group,
        "--data-cache",
        default=DEFAULTS.data.data_cache,
        help="folder of tokenized data, keyed by a hash of it; '' disables",
    )
    add_bool_flag(
        group,
        "--packing",
        default=DEFAULTS.data.packing,
        help="pack paragraphs into full blocks (no padding) instead of one per example",
    )


def add_model_flags(group) -> None:
    """The model, and LoRA/QLoRA adapters on it."""
    add_flag(group, "--model", default=DEFAULTS.model.model, help="Hub id or local folder of the base model")
    add_bool_flag(group, "--from-scratch", help="random weights from the --model config instead of pretrained ones")
    add_bool_flag(group, "--lora", help="train LoRA adapters on the frozen base model instead of all weights")
    add_bool_flag(group, "--qlora", help="LoRA on the base model quantized to 4-bit NF4 (bitsandbytes)")
    add_bool_flag(group, "--load-in-8bit", help="LoRA on the base model quantized to 8-bit (bitsandbytes)")
    add_flag(group, "--rank-lora", type=int, default=DEFAULTS.model.rank_lora, help="LoRA rank")
    add_flag(
        group,
        "--alpha-lora",
        type=int,
        default=DEFAULTS.model.alpha_lora,
        help="LoRA alpha (the update is scaled by alpha/rank)",
    )
    add_flag(
        group,
        "--targets-lora",
        nargs="+",
        default=DEFAULTS.model.targets_lora,
        help="layers that get adapters, e.g. q_proj v_proj; auto: the attention projections (GPT-2: c_attn, "
        "GPT-NeoX: query_key_value, Llama/Qwen/Mistral/Gemma: q_proj k_proj v_proj o_proj); all-linear: every "
        "linear layer but the output layer",
    )
    add_flag(
        group,
        "--dropout",
        type=float,
        default=DEFAULTS.model.dropout,
        help="dropout of the model's embeddings, attention and residual stream (default: the model's own, 0.1 for "
        "GPT-2); not the adapters' (--lora-dropout)",
    )
    add_flag(
        group, "--lora-dropout", type=float, default=DEFAULTS.model.lora_dropout, help="dropout on the adapters' input"
    )


def add_optimization_flags(group) -> None:
    """Optimizer, schedule, precision and seed."""
    add_flag(
        group, "--epochs", type=int, default=DEFAULTS.optimization.epochs, help="passes over the training paragraphs"
    )
    add_flag(
        group, "--batch-size", type=int, default=DEFAULTS.optimization.batch_size, help="examples per batch and device"
    )
    add_flag(
        group,
        "--grad-accum-steps",
        type=int,
        default=DEFAULTS.optimization.grad_accum_steps,
        help="batches accumulated into one optimizer step",
    )
    add_flag(group, "--lr", type=float, default=DEFAULTS.optimization.lr, help="peak learning rate of AdamW")
    add_flag(group, "--eps", type=float, default=DEFAULTS.optimization.eps, help="AdamW epsilon")
    add_flag(
        group,
        "--weight-decay",
        type=float,
        default=DEFAULTS.optimization.weight_decay,
        help="AdamW weight decay (never on biases and LayerNorms)",
    )
    add_flag(
        group,
        "--warmup-steps",
        type=int,
        default=DEFAULTS.optimization.warmup_steps,
        help="linear warm-up steps, then linear decay to 0",
    )
    add_flag(
        group,
        "--max-grad-norm",
        type=float,
        default=DEFAULTS.optimization.max_grad_norm,
        help="gradient clipping norm; 0 disables",
    )
    add_flag(
        group,
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=DEFAULTS.optimization.precision,
        help="auto: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32",
    )
    add_bool_flag(group, "--gradient-checkpointing", help="recompute activations in backward: less memory, more time")
    add_bool_flag(
        group,
        "--chunked-loss",
        default=DEFAULTS.optimization.chunked_loss,
        help="compute the output layer and the loss 1,024 tokens at a time, their gradients in the same pass: the "
        "logits of a whole batch never exist (much less memory with a large vocabulary). Not under FSDP or "
        "DeepSpeed, nor where the logits are more than a bias-free projection (checked at the start)",
    )
    add_bool_flag(
        group,
        "--fused-activations",
        default=DEFAULTS.optimization.fused_activations,
        help="run GPT-2's (and Phi's) tanh GELU, written in transformers as 7 elementwise operations that each keep "
        "their output for backward, as PyTorch's one fused kernel: the same function within rounding, less memory "
        "and time. Saved models are unchanged",
    )
    add_bool_flag(group, "--compile", help="torch.compile the model (inductor); pays a compile time at start")


def add_training_samples_flags(group) -> None:
    """Samples and style measures during training."""
    add_flag(
        group,
        "--sample-every",
        type=int,
        default=DEFAULTS.samples.sample_every,
        help="print and log samples every N steps; 0 disables",
    )
    add_flag(
        group,
        "--sample-prompts",
        nargs="+",
        default=DEFAULTS.samples.sample_prompts,
        help="their prompts; '' starts a paragraph",
    )
    add_flag(
        group,
        "--max-output-length",
        type=int,
        default=DEFAULTS.samples.max_output_length,
        help="tokens per sample, prompt included",
    )
    add_sampling_flags(group, temperature=False)
    add_bool_flag(
        group,
        "--eval-style",
        help="at each validation, sample continuations of data/eval_prompts.txt and log how much they read like the "
        "author (a classifier fitted on half of the held-out text against data/contrast novels), how well a "
        "classifier tells them from the other half (distinguishability), the share of copied word 8-grams and "
        "character names per 1,000 words (style_report.py gives the full report)",
    )
    add_flag(
        group,
        "--eval-style-samples",
        type=int,
        default=DEFAULTS.samples.eval_style_samples,
        help="samples of --eval-style, 100 tokens each (10 or more for its two-sample test)",
    )


def add_validation_flags(group) -> None:
    """When to validate, which model to keep, when to stop, where the numbers go."""
    add_flag(
        group,
        "--log-every",
        type=int,
        default=DEFAULTS.validation.log_every,
        help="every N optimizer steps (and at each sample, validation, checkpoint and epoch end): read the loss from "
        "the device, log its mean since the last time, update the progress bar, check for a non-finite loss and a "
        "stop signal. In between the host never waits for the device",
    )
    add_flag(
        group,
        "--eval-steps",
        type=int,
        default=DEFAULTS.validation.eval_steps,
        help="also validate every N optimizer steps; 0: epoch ends only",
    )
    add_bool_flag(
        group,
        "--load-best-at-end",
        default=DEFAULTS.validation.load_best_at_end,
        help="export the best validated model (<check-dir>/best/) to --output-dir; False: the last step's model",
    )
    add_flag(
        group,
        "--early-stopping-patience",
        type=int,
        default=DEFAULTS.validation.early_stopping_patience,
        help="stop after K validations in a row without a new best model; 0: never",
    )
    add_flag(
        group,
        "--early-stopping-threshold",
        type=float,
        default=DEFAULTS.validation.early_stopping_threshold,
        help="a new best must lower the validation loss by more than this (nats per token)",
    )
    add_flag(
        group,
        "--max-copied-8grams",
        type=float,
        default=DEFAULTS.validation.max_copied_8grams,
        metavar="SHARE",
        help="with --eval-style: a validation point whose samples copy more than this share of their word 8-grams "
        "from the training text never becomes the best model (e.g. 0.01 for 1%%)",
    )
    add_flag(
        group,
        "--report-to",
        nargs="+",
        choices=["tensorboard", "wandb", "mlflow", "none"],
        default=DEFAULTS.validation.report_to,
        help="trackers that also get the metrics (logs/metrics.jsonl is always written)",
    )


def add_outputs_flags(group) -> None:
    """Checkpoints, resume and the final model."""
    add_flag(
        group,
        "--check-dir",
        default=DEFAULTS.checkpoints.check_dir,
        help="folder of the Epoch_N checkpoints and the run logs",
    )
    add_flag(
        group,
        "--save-interval",
        type=int,
        default=DEFAULTS.checkpoints.save_interval,
        help="checkpoint every N epochs (the last epoch always)",
    )
    add_flag(
        group,
        "--save-steps",
        type=int,
        default=DEFAULTS.checkpoints.save_steps,
        help="also checkpoint every N optimizer steps (Step_N); 0: off",
    )
    add_flag(
        group,
        "--keep-last",
        type=int,
        default=DEFAULTS.checkpoints.keep_last,
        help="keep only the newest K Step_N checkpoints, deleting older ones once a new one checks out against its "
        "manifest; 0 keeps all",
    )
    add_bool_flag(group, "--resume", help="continue from the newest complete checkpoint in --check-dir (if any)")
    add_flag(
        group,
        "--resume-from",
        default=DEFAULTS.checkpoints.resume_from,
        metavar="CHECKPOINT",
        help="continue from this checkpoint: a name in --check-dir (Epoch_2, Step_300) or a path",
    )
    add_flag(
        group, "--output-dir", default=DEFAULTS.checkpoints.output_dir, help="where the final model and tokenizer go"
    )
    add_bool_flag(group, "--overwrite-output-dir", help="replace a model already in --output-dir")
