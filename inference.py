"""Sample paragraphs from a fine-tuned model.

  python inference.py --model_path GPT2_fine_tuned_Austen --prompt "It was a fine morning"
  python inference.py --model_path Checkpoints/Epoch_2 --prompt "Emma" --n_return_seqs 5 --seed 1
  python inference.py --model_path my_adapters --qlora True --base_model gpt2-medium --prompt "Emma"

A folder of LoRA/QLoRA adapters (adapter_config.json) is recognised and loaded on its base model.
All samples come from one batched `generate` call with the KV cache, using the tokenizer saved with
the model; each starts as a new paragraph and stops at end-of-text.
"""

from __future__ import annotations

import argparse

from cli import ArgumentParser, UserError, add_bool_flag, add_flag, quiet_libraries, require, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_flag(p, "--model_path", default="GPT2_fine_tuned_Austen", help="model or adapter folder, or a Hub id")
    add_flag(p, "--prompt", default="", help="text the samples continue; empty starts a fresh paragraph")
    add_flag(p, "--n_return_seqs", type=int, default=3, help="number of samples")
    add_flag(p, "--max_length", type=int, default=300, help="tokens per sample with the prompt, within the context")
    add_flag(p, "--max-new-tokens", type=int, default=None, help="tokens after the prompt; overrides --max_length")
    add_flag(p, "--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 disables")
    add_flag(p, "--top_p", type=float, default=0.95, help="nucleus sampling probability mass")
    add_flag(p, "--temperature", type=float, default=1.0, help="softmax temperature; lower is more conservative")
    add_flag(p, "--repetition-penalty", type=float, default=1.0, help="penalty on repeated tokens; 1.0 is none")
    add_flag(p, "--seed", type=int, default=None, help="makes samples reproducible; without it they differ each run")
    add_bool_flag(p, "--qlora", help="--model_path holds adapters: load them on a 4-bit base (the seed's spelling)")
    add_flag(p, "--base_model", default=None, help="base model of an adapter folder (default: its adapter_config.json)")
    add_bool_flag(p, "--load-in-4bit", help="quantize the (base) model to 4-bit NF4 with bitsandbytes")
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
    ]
    require(rules)


def load_for_sampling(args: argparse.Namespace):
    """A full model (folder or Hub id), or an adapter folder on its base model, in eval mode."""
    import torch

    import lora
    from utils import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantize = args.qlora or args.load_in_4bit
    kwargs = {}
    if quantize:
        lora.require_bitsandbytes(device, "--load-in-4bit")
        compute_dtype = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        kwargs = {"quantization_config": lora.quantization_config(4, compute_dtype), "device_map": {"": device}}
    if lora.is_adapter_folder(args.model_path):
        base = args.base_model or lora.adapter_base_model(args.model_path)
        try:
            model = load_model(base, **kwargs)
        except UserError as err:
            raise UserError(
                f"the adapters in {args.model_path} need their base model: {err}; or pass --base_model"
            ) from None
        model = lora.load_lora(model, args.model_path, quantized=quantize, trainable=False)
    elif args.qlora:
        raise UserError(f"--qlora expects an adapter folder (with adapter_config.json); {args.model_path} is not one")
    else:
        model = load_model(args.model_path, **kwargs)
    return (model if quantize else model.to(device)).eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    quiet_libraries()

    from generation import SamplingSettings, generate_paragraphs
    from utils import load_tokenizer

    model = load_for_sampling(args)
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
