"""A training run's settings, one group per section of train.py's --help, and the checks they must pass.

From a notebook, with no command line:

    from austen_gpt.settings import ModelSettings
    from austen_gpt.training.settings import TrainSettings, OptimizationSettings
    from austen_gpt.training.loop import train

    train(TrainSettings(model=ModelSettings("configs/austen-tiny", from_scratch=True),
                        optimization=OptimizationSettings(epochs=1)))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from austen_gpt.cli import UserError, require
from austen_gpt.flags import sampling_rules
from austen_gpt.settings import DataSettings, ModelSettings, SamplingSettings

DEFAULT_PROMPTS = ["", '"I cannot think," said she,', "The ball at"]


@dataclass
class OptimizationSettings:
    """Optimizer, schedule, precision and the step's implementation."""

    epochs: int = 4
    """Passes over the training paragraphs."""
    batch_size: int = 8
    """Examples per batch and device."""
    grad_accum_steps: int = 1
    """Batches accumulated into one optimizer step."""
    lr: float = 5e-4
    """The peak learning rate of AdamW."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    weight_decay: float = 0.0
    """AdamW's weight decay (never on biases and LayerNorms)."""
    warmup_steps: int = 100
    """Linear warm-up steps, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """The gradient clipping norm; 0 disables."""
    precision: str = "auto"
    """auto, fp32, bf16 or fp16; auto: bf16 where the device supports it, fp16 on older GPUs, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, more time."""
    chunked_loss: bool = True
    """The output layer and the loss 1,024 tokens at a time: the logits of a whole batch never exist."""
    fused_activations: bool = True
    """GPT-2's tanh GELU as PyTorch's one fused kernel."""
    compile: bool = False
    """torch.compile the model (inductor)."""


@dataclass
class TrainingSamplesSettings:
    """Samples and style measures during training."""

    sample_every: int = 100
    """Print and log samples every N optimizer steps; 0 disables."""
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Their prompts; '' starts a paragraph."""
    max_output_length: int = 200
    """Tokens per sample, prompt included."""
    top_k: int = SamplingSettings.top_k
    """Sample from the k likeliest tokens; 0 disables."""
    top_p: float = SamplingSettings.top_p
    """Nucleus sampling probability mass."""
    eval_style: bool = False
    """At each validation, sample continuations of data/eval_prompts.txt and log their style measures."""
    eval_style_samples: int = 24
    """Samples of eval_style, 100 tokens each (10 or more for its two-sample test)."""


@dataclass
class ValidationSettings:
    """When to validate, which model to keep, when to stop, where the numbers go."""

    log_every: int = 10
    """Read the loss from the device and log it every N optimizer steps (the host never waits in between)."""
    eval_steps: int = 0
    """Also validate every N optimizer steps; 0: at epoch ends only."""
    load_best_at_end: bool = True
    """Export the best validated model; False: the last step's."""
    early_stopping_patience: int = 0
    """Stop after K validations in a row without a new best model; 0: never."""
    early_stopping_threshold: float = 0.0
    """A new best must lower the validation loss by more than this (nats per token)."""
    max_copied_8grams: float | None = None
    """With eval_style: a point whose samples copy more than this share of their word 8-grams is never the best."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers that also get the metrics: tensorboard, wandb, mlflow or none."""


@dataclass
class CheckpointSettings:
    """Checkpoints, resume and the final model."""

    check_dir: str = "Checkpoints"
    """The folder of the Epoch_N and Step_N checkpoints, best/ and the run's logs."""
    save_interval: int = 1
    """Checkpoint every N epochs (the last epoch always)."""
    save_steps: int = 0
    """Also checkpoint every N optimizer steps (Step_N); 0: off."""
    keep_last: int = 0
    """Keep only the newest K Step_N checkpoints; 0 keeps all."""
    resume: bool = False
    """Continue from the newest complete checkpoint in check_dir, if any."""
    resume_from: str | None = None
    """Continue from this checkpoint: a name in check_dir (Epoch_2, Step_300) or a path."""
    output_dir: str = "GPT2_fine_tuned_Austen"
    """Where the final model and tokenizer go."""
    overwrite_output_dir: bool = False
    """Replace a model already in output_dir."""


@dataclass
class TrainSettings:
    """Everything a training run is told: the groups of train.py's flags."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    samples: TrainingSamplesSettings = field(default_factory=TrainingSamplesSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)


def check_settings(s: TrainSettings) -> None:
    """Reject impossible settings before anything is loaded or written (named by their flags)."""
    data, model, opt, samples, val, out = s.data, s.model, s.optimization, s.samples, s.validation, s.checkpoints
    rules = [
        (opt.batch_size >= 1, "--batch-size must be at least 1"),
        (opt.epochs >= 1, "--epochs must be at least 1"),
        (opt.lr > 0, "--lr must be positive"),
        (0 < data.train_size < 1, "--train-size must be between 0 and 1, e.g. 0.9"),
        *sampling_rules(samples.top_k, samples.top_p),
        (data.max_input_length >= 2, "--max-input-length must be at least 2 tokens"),
        (samples.max_output_length >= 1, "--max-output-length must be at least 1"),
        (opt.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
        (opt.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
        (samples.sample_every >= 0, "--sample-every must be 0 (off) or more"),
        (samples.eval_style_samples >= 1, "--eval-style-samples must be at least 1"),
        (out.save_interval >= 1, "--save-interval must be at least 1"),
        (out.save_steps >= 0 and out.keep_last >= 0, "--save-steps and --keep-last must be 0 (off) or more"),
        (val.log_every >= 1, "--log-every must be 1 or more"),
        (not (out.resume and out.resume_from), "--resume takes the newest checkpoint, --resume-from one: use one"),
        (opt.eps > 0, "--eps must be positive"),
        (opt.weight_decay >= 0 and opt.max_grad_norm >= 0, "--weight-decay and --max-grad-norm must not be negative"),
        (opt.precision in ("auto", "fp32", "bf16", "fp16"), "--precision is one of auto, fp32, bf16, fp16"),
        (not Path(out.output_dir).is_file(), f"--output-dir {out.output_dir} is a file; pass a folder path"),
        (not (model.qlora and model.load_in_8bit), "--qlora (4-bit) and --load-in-8bit exclude each other; pick one"),
        (model.rank_lora >= 1, "--rank-lora must be at least 1, e.g. 16"),
        (model.alpha_lora > 0, "--alpha-lora must be positive, e.g. 16"),
        (0 <= model.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (model.dropout is None or 0 <= model.dropout < 1, "--dropout must be in [0, 1), e.g. 0.1 or 0"),
        (not (model.adapters and model.from_scratch), "LoRA freezes the base model: drop --from-scratch"),
        (
            val.eval_steps >= 0 and val.early_stopping_patience >= 0,
            "--eval-steps and --early-stopping-patience must be 0 (off) or more",
        ),
        (val.early_stopping_threshold >= 0, "--early-stopping-threshold must be 0 or more (nats per token)"),
        (
            val.max_copied_8grams is None or samples.eval_style,
            "--max-copied-8grams needs --eval-style (it reads the copy rate of the samples that measures)",
        ),
        (
            val.max_copied_8grams is None or 0 <= val.max_copied_8grams <= 1,
            "--max-copied-8grams is a share in [0, 1], e.g. 0.01 for 1%",
        ),
        ("none" not in val.report_to or val.report_to == ["none"], "--report-to none goes alone"),
    ]
    require(rules)
    for tracker in set(val.report_to) - {"none"}:
        if importlib.util.find_spec(tracker) is None:
            raise UserError(
                f"--report-to {tracker} needs the {tracker} package: pip install {tracker}, or leave it out"
            )
    output = Path(out.output_dir)
    if output.is_dir() and any(output.iterdir()) and not out.overwrite_output_dir:
        raise UserError(f"--output-dir {output} already holds files; pass --overwrite-output-dir or another folder")
