"""Sample paragraphs from a fine-tuned model.

  python inference.py --model-path GPT2_fine_tuned_Austen --prompt "It was a fine morning"
  python inference.py --model-path Checkpoints/Epoch_2 --prompt "Emma" --n-return-seqs 5 --seed 1
  python inference.py --model-path my_adapters --load-in-4bit --base-model gpt2-medium --prompt "Emma"

A folder of LoRA/QLoRA adapters (adapter_config.json) is recognised and loaded on its base model.
All samples come from one batched `generate` call with the KV cache, using the tokenizer saved with
the model; each starts as a new paragraph and stops at end-of-text.
"""

from __future__ import annotations

import argparse

from cli import (
    ArgumentParser,
    add_bool_flag,
    add_flag,
    add_original_qlora_flag,
    quiet_libraries,
    read_original_qlora_flag,
    require,
    run_cli,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_flag(p, "--model-path", default="GPT2_fine_tuned_Austen", help="model or adapter folder, or a Hub id")
    add_flag(p, "--prompt", default="", help="text the samples continue; empty starts a fresh paragraph")
    add_flag(p, "--n-return-seqs", type=int, default=3, help="number of samples")
    add_flag(p, "--max-length", type=int, default=300, help="tokens per sample with the prompt, within the context")
    add_flag(p, "--max-new-tokens", type=int, default=None, help="tokens after the prompt; overrides --max-length")
    add_flag(p, "--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 disables")
    add_flag(p, "--top-p", type=float, default=0.95, help="nucleus sampling probability mass")
    add_flag(p, "--temperature", type=float, default=1.0, help="softmax temperature; lower is more conservative")
    add_flag(p, "--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens; 1.0 is none")
    add_flag(p, "--seed", type=int, default=None, help="makes samples reproducible; without it they differ each run")
    add_flag(p, "--base-model", default=None, help="base model of an adapter folder (default: its adapter_config.json)")
    add_bool_flag(p, "--load-in-4bit", help="quantize the (base) model to 4-bit NF4 with bitsandbytes")
    add_original_qlora_flag(p)
    args = p.parse_args(argv)
    read_original_qlora_flag(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    rules = [
        (args.n_return_seqs >= 1, "--n-return-seqs must be at least 1"),
        (args.max_length >= 1, "--max-length must be at least 1"),
        (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.top_k >= 0, "--top-k must be 0 (off) or more"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1], e.g. 0.95"),
        (args.temperature > 0, "--temperature must be positive, e.g. 0.8"),
        (args.repetition_penalty > 0, "--repetition-penalty must be positive, e.g. 1.1"),
    ]
    require(rules)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    quiet_libraries()

    from generation import SamplingSettings, generate_paragraphs
    from utils import load_for_sampling, load_tokenizer

    model = load_for_sampling(args.model_path, args.base_model, args.load_in_4bit)
    tokenizer = load_tokenizer(args.model_path)
    settings = SamplingSettings(
        args.max_length, args.max_new_tokens, args.top_k, args.top_p, args.temperature, args.repetition_penalty
    )
    samples = generate_paragraphs(model, tokenizer, args.prompt, args.n_return_seqs, settings, args.seed)
    for number, text in enumerate(samples, 1):
        print(f"{number}. {text}\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
