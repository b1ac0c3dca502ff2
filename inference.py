"""Sample paragraphs from a fine-tuned model.

    python inference.py --model_path GPT2_fine_tuned_Austen --prompt "It was a fine morning"
    python inference.py --model_path Checkpoints/Epoch_2 --prompt "Emma" --n_return_seqs 5 --seed 1

All samples come from one batched `generate` call with the KV cache, using the tokenizer saved with
the model; each starts as a new paragraph and stops at end-of-text.
"""

from __future__ import annotations

import argparse

from cli import ArgumentParser, UserError, add_bool_flag, add_flag, quiet_libraries, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_flag(
        p,
        "--model_path",
        default="GPT2_fine_tuned_Austen",
        help="model folder (train.py's --output-dir or a checkpoint) or Hub id",
    )
    add_flag(p, "--prompt", default="", help="text the samples continue; empty starts a fresh paragraph")
    add_flag(p, "--n_return_seqs", type=int, default=3, help="number of samples")
    add_flag(
        p,
        "--max_length",
        type=int,
        default=300,
        help="tokens per sample, prompt included; capped at the model's context",
    )
    add_flag(
        p,
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate after the prompt; overrides --max_length",
    )
    add_flag(p, "--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 disables")
    add_flag(p, "--top_p", type=float, default=0.95, help="nucleus sampling probability mass")
    add_flag(
        p,
        "--temperature",
        type=float,
        default=1.0,
        help="softmax temperature; lower is more conservative",
    )
    add_flag(
        p,
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalty for repeating tokens, 1.0 = none",
    )
    add_flag(
        p,
        "--seed",
        type=int,
        default=None,
        help="seed that makes the samples reproducible; without it they differ on every run",
    )
    add_bool_flag(
        p, "--qlora", help="load --model_path as QLoRA adapters on --base_model (not available in this version yet)"
    )
    add_flag(p, "--base_model", default=None, help="base model of an adapter folder (used with --qlora)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    rules = [
        (args.n_return_seqs >= 1, "--n_return_seqs must be at least 1"),
        (args.max_length >= 1, "--max_length must be at least 1"),
        (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.top_k >= 0, "--top-k must be 0 (off) or more"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1], e.g. 0.95"),
        (args.temperature > 0, "--temperature must be positive, e.g. 0.8"),
        (args.repetition_penalty > 0, "--repetition-penalty must be positive, e.g. 1.1"),
        (not args.qlora, "--qlora adapters are not supported in this version yet; pass a full model folder"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    quiet_libraries()

    import torch

    from generation import SamplingSettings, generate_paragraphs
    from utils import load_model, load_tokenizer

    model = load_model(args.model_path)
    tokenizer = load_tokenizer(args.model_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    settings = SamplingSettings(
        args.max_length, args.max_new_tokens, args.top_k, args.top_p, args.temperature, args.repetition_penalty
    )
    for number, text in enumerate(
        generate_paragraphs(model, tokenizer, args.prompt, args.n_return_seqs, settings, args.seed), 1
    ):
        print(f"{number}. {text}\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
