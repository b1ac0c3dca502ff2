"""A training run's settings, one group per section of train.py's --help, and the checks they must pass.

From a notebook, with no command line:

    from austen_gpt.settings import ModelSettings
    from austen_gpt.training.settings import TrainSettings, OptimizationSettings
    from austen_gpt.training.loop import train

    train(TrainSettings(model=ModelSettings("configs/base-tiny"),
                        optimization=OptimizationSettings(epochs=1)))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from austen_gpt.cli import UserError, require
from austen_gpt.flags import sampling_rules
from austen_gpt.settings import DEFAULT_PRECISION, PRECISIONS, DataSettings, ModelSettings, SamplingSettings

DEFAULT_PROMPTS = ["", '"I cannot think," said she,', "The ball at"]


@dataclass
class OptimizationSettings:
    """Optimizer, schedule, precision and the step's implementation."""

    epochs: int = 4
    """passes over the training paragraphs"""
    max_steps: int = 0
    """end the run after N optimizer steps, mid-epoch if need be, validated and checkpointed there (Step_N); the
    schedule decays to 0 at that step. 0: --epochs decide. For a budget on a large corpus (pretraining)"""
    batch_size: int = 8
    """examples per batch and device"""
    grad_accum_steps: int = 1
    """batches accumulated into one optimizer step"""
    lr: float = 5e-4
    """peak learning rate of AdamW"""
    eps: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay (never on biases and LayerNorms)"""
    warmup_steps: int = 100
    """linear warm-up steps, then linear decay to 0"""
    max_grad_norm: float = 1.0
    """gradient clipping norm; 0 disables"""
    precision: str = DEFAULT_PRECISION
    """auto, fp32, bf16 or fp16; auto: bf16 where the device supports it, fp16 on older GPUs, else fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, more time"""
    chunked_loss: bool = True
    """compute the output layer and the loss 1,024 tokens at a time, their gradients in the same pass: the logits of
    a whole batch never exist (much less memory with a large vocabulary). Not under FSDP or DeepSpeed, nor where
    the logits are more than a bias-free projection (checked at the start)"""
    fused_activations: bool = True
    """run GPT-2's (and Phi's) tanh GELU, written in transformers as 7 elementwise operations that each keep their
    output for backward, as PyTorch's one fused kernel: the same function within rounding, less memory and time.
    Saved models are unchanged"""
    compile: bool = False
    """torch.compile the model (inductor); pays a compile time at start"""


@dataclass
class TrainingSamplesSettings:
    """Samples and style measures during training."""

    sample_every: int = 100
    """print and log samples every N steps; 0 disables"""
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """their prompts; '' starts a paragraph"""
    max_output_length: int = 200
    """tokens per sample, prompt included"""
    top_k: int = SamplingSettings.top_k
    """sample from the k likeliest tokens; 0 disables"""
    top_p: float = SamplingSettings.top_p
    """nucleus sampling probability mass"""
    eval_style: bool = False
    """at each validation, sample continuations of data/eval_prompts.txt and log how much they read like the author
    (a classifier fitted on half of the held-out text against data/contrast novels), how well a classifier tells
    them from the other half (distinguishability), the share of copied word 8-grams and character names per 1,000
    words (style_report.py gives the full report)"""
    eval_style_samples: int = 24
    """samples of --eval-style, 100 tokens each (10 or more for its two-sample test)"""


@dataclass
class ValidationSettings:
    """When to validate, which model to keep, when to stop, where the numbers go."""

    log_every: int = 10
    """every N optimizer steps (and at each sample, validation, checkpoint and epoch end): read the loss from the
    device, log its mean since the last time, update the progress bar, check for a non-finite loss and a stop
    signal. In between the host never waits for the device"""
    eval_steps: int = 0
    """also validate every N optimizer steps; 0: epoch ends only"""
    load_best_at_end: bool = True
    """export the best validated model (<check-dir>/best/) to --output-dir; False: the last step's model"""
    early_stopping_patience: int = 0
    """stop after K validations in a row without a new best model; 0: never"""
    early_stopping_threshold: float = 0.0
    """a new best must lower the validation loss by more than this (nats per token)"""
    max_copied_8grams: float | None = None
    """with --eval-style: a validation point whose samples copy more than this share of their word 8-grams from the
    training text never becomes the best model (e.g. 0.01 for 1%)"""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """trackers that also get the metrics (logs/metrics.jsonl is always written)"""


@dataclass
class CheckpointSettings:
    """Checkpoints, resume and the final model."""

    check_dir: str = "Checkpoints"
    """folder of the Epoch_N checkpoints and the run logs"""
    save_interval: int = 1
    """checkpoint every N epochs (the last epoch always)"""
    save_steps: int = 0
    """also checkpoint every N optimizer steps (Step_N); 0: off"""
    keep_last: int = 0
    """keep only the newest K Step_N checkpoints, deleting older ones once a new one checks out against its manifest;
    0 keeps all"""
    resume: bool = False
    """continue from the newest complete checkpoint in --check-dir (if any)"""
    resume_from: str | None = None
    """continue from this checkpoint: a name in --check-dir (Epoch_2, Step_300) or a path"""
    output_dir: str = "GPT2_fine_tuned_Austen"
    """where the final model and tokenizer go"""
    overwrite_output_dir: bool = False
    """replace a model already in --output-dir"""


@dataclass
class SelfPlaySettings:
    """Self-play (SPIN) rounds on a fine-tuned model, in place of likelihood epochs (docs/training.md)."""

    self_play_rounds: int = 0
    """rounds of self-play on --model, a fine-tuned model (or its adapters): each samples the model's continuations
    of training openings and trains it to prefer the author's own, against the model as the round found it. Each
    round is validated (held-out perplexity, distinguishability, copying) and checkpointed (Round_N); best/ is the
    least distinguishable round. --epochs is not used. 0: off, ordinary fine-tuning"""
    self_play_pairs: int = 512
    """openings (author's continuation against the model's) a round draws and trains on, once each"""
    self_play_beta: float = 0.1
    """the SPIN (DPO) loss's beta: how far from the round's reference the log-probability gains may go"""
    self_play_likelihood_weight: float = 4.0
    """weight of the author's continuations' own loss per token, beside the SPIN loss (keeps their likelihood from
    falling with the model's); 0: the SPIN loss alone"""
    self_play_prompt_tokens: int = 16
    """tokens of a training paragraph both continuations start from"""
    self_play_new_tokens: int = 112
    """tokens of each continuation: the author's next ones, and as many of the model's (with the opening, the
    length of the style report's 128-token samples, so the model is shown its repetition over a whole sample)"""


@dataclass
class TrainSettings:
    """Everything a training run is told: the groups of train.py's flags."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)
    samples: TrainingSamplesSettings = field(default_factory=TrainingSamplesSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    self_play: SelfPlaySettings = field(default_factory=SelfPlaySettings)


def check_settings(s: TrainSettings) -> None:
    """Reject impossible settings before anything is loaded or written (named by their flags)."""
    data, model, opt, samples, val, out = s.data, s.model, s.optimization, s.samples, s.validation, s.checkpoints
    sp = s.self_play
    rules = [
        (opt.batch_size >= 1, "--batch-size must be at least 1"),
        (opt.epochs >= 1, "--epochs must be at least 1"),
        (opt.max_steps >= 0, "--max-steps must be 0 (off: --epochs decide) or more"),
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
        (opt.precision in PRECISIONS, f"--precision is one of {', '.join(PRECISIONS)}"),
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
        (sp.self_play_rounds >= 0, "--self-play-rounds must be 0 (off) or more"),
        (sp.self_play_pairs >= 1, "--self-play-pairs must be at least 1"),
        (sp.self_play_beta > 0, "--self-play-beta must be positive, e.g. 0.1"),
        (sp.self_play_likelihood_weight >= 0, "--self-play-likelihood-weight must be 0 or more, e.g. 1"),
        (sp.self_play_prompt_tokens >= 1, "--self-play-prompt-tokens must be at least 1"),
        (sp.self_play_new_tokens >= 1, "--self-play-new-tokens must be at least 1"),
        (
            not (sp.self_play_rounds and model.from_scratch),
            "self-play trains a fine-tuned model against its own samples: drop --from-scratch and give the "
            "fine-tuned model as --model",
        ),
        (
            not (sp.self_play_rounds and samples.eval_style_samples < 10),
            "self-play picks best/ by distinguishability, which takes --eval-style-samples 10 or more",
        ),
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
