"""train.py's flags, in the groups of its settings (training/settings.py), which give each flag its default and
type; the help says what it does."""

from __future__ import annotations

import argparse

from austen_gpt.cli import (
    ArgumentParser,
    add_original_resume_flags,
    add_settings,
    read_original_resume_flags,
)
from austen_gpt.flags import add_corpus_flags, add_precision_flag, add_sampling_flags, add_split_flags
from austen_gpt.settings import from_flags
from austen_gpt.training.settings import TrainSettings

D = TrainSettings()  # the flags' defaults and types are the settings' own


def train_settings(argv: list[str] | None = None, description: str | None = None) -> TrainSettings:
    """train.py's command line (and run file) as the run's settings."""
    return from_flags(TrainSettings, parse_args(argv, description))


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(run_files=True, description=description)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_training_samples_flags(p.add_argument_group("samples during training"))
    add_validation_flags(p.add_argument_group("validation, the best model and early stopping"))
    add_outputs_flags(p.add_argument_group("checkpoints and outputs"))
    add_self_play_flags(p.add_argument_group("self-play (SPIN) on a fine-tuned model"))
    add_original_resume_flags(p)
    return p


def given_settings(argv: list[str] | None = None) -> set[str]:
    """The settings train.py's command line (or its run file) sets, as opposed to those left at their defaults."""
    return build_parser().given_dests(argv)


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    p = build_parser(description)
    args = p.parse_args(argv)
    read_original_resume_flags(args)
    return args


def add_data_flags(group) -> None:
    """The paragraphs and how they become examples."""
    # --split-seed: the style report's name for it; --seed: the original project's
    add_split_flags(group, ("--split-seed", "--seed"), "seed", "seed of the split, the data order and new weights")
    add_corpus_flags(group)
    add_settings(group, D.data, "max_input_length", "data_cache", "packing")


def add_model_flags(group) -> None:
    """The model, and LoRA/QLoRA adapters on it."""
    add_settings(group, D.model, "model", "from_scratch", "lora", "qlora", "load_in_8bit", "rank_lora", "alpha_lora")
    add_settings(group, D.model, "targets_lora", "dropout", "lora_dropout")


def add_optimization_flags(group) -> None:
    """Optimizer, schedule, precision and the step's implementation."""
    add_settings(
        group, D.optimization, "epochs", "max_steps", "batch_size", "grad_accum_steps", "lr", "eps", "weight_decay"
    )
    add_settings(group, D.optimization, "warmup_steps", "max_grad_norm")
    add_precision_flag(group)
    add_settings(group, D.optimization, "gradient_checkpointing", "chunked_loss", "fused_activations", "compile")


def add_training_samples_flags(group) -> None:
    """Samples and style measures during training."""
    add_settings(group, D.samples, "sample_every", "sample_prompts", "max_output_length")
    add_sampling_flags(group, temperature=False)
    add_settings(group, D.samples, "eval_style", "eval_style_samples")


def add_validation_flags(group) -> None:
    """When to validate, which model to keep, when to stop, where the numbers go."""
    add_settings(
        group,
        D.validation,
        *("log_every", "eval_steps", "load_best_at_end", "early_stopping_patience", "early_stopping_threshold"),
        *("max_copied_8grams", "report_to"),
        max_copied_8grams={"metavar": "SHARE"},
        report_to={"choices": ["tensorboard", "wandb", "mlflow", "none"]},
    )


def add_outputs_flags(group) -> None:
    """Checkpoints, resume and the final model."""
    add_settings(group, D.checkpoints, "check_dir", "save_interval", "save_steps", "keep_last", "resume")
    add_settings(group, D.checkpoints, "resume_from", resume_from={"metavar": "CHECKPOINT"})
    add_settings(group, D.checkpoints, "output_dir", "overwrite_output_dir")


def add_self_play_flags(group) -> None:
    """Self-play rounds on a fine-tuned model."""
    add_settings(group, D.self_play, "self_play_rounds", "self_play_pairs", "self_play_beta")
    add_settings(group, D.self_play, "self_play_likelihood_weight", "self_play_prompt_tokens", "self_play_new_tokens")
