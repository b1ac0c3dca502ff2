"""Training speed and memory of full fine-tuning, LoRA and QLoRA, side by side in one run.

  python bench.py                                              # gpt2-tiny on this machine (CPU or GPU)
  python bench.py --config gpt2-medium --modes qlora --steps 50 # the QLoRA memory check on a CUDA GPU

Each mode runs in its own fresh process (so peak memory is its own) on the same model config with
random weights (the FLOPs are the real ones), the same packed Austen batches and the same precision.
It reports useful (non-pad) tokens/s as the median over the timed steps after warm-up, peak memory
(max allocated on CUDA, peak RSS on CPU) and the ratios to the first mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import ArgumentParser, UserError, add_flag, quiet_libraries, run_cli

REPO = Path(__file__).resolve().parent
PRESETS = {  # GPT-2 sizes by name, so no Hub access is needed; anything else is a config folder
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_flag(p, "--config", default="configs/gpt2-tiny", help=f"model config: {', '.join(PRESETS)} or a config folder")
    add_flag(
        p,
        "--modes",
        nargs="+",
        choices=["full", "lora", "qlora"],
        default=["full", "lora", "qlora"],
        help="what to run",
    )
    add_flag(p, "--steps", type=int, default=12, help="timed optimizer steps per mode")
    add_flag(p, "--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, caches)")
    add_flag(p, "--batch-size", type=int, default=16, help="blocks per step")
    add_flag(p, "--block-size", type=int, default=128, help="tokens per block")
    add_flag(
        p, "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="as train.py's --precision"
    )
    add_flag(p, "--rank-lora", type=int, default=64, help="LoRA rank")
    add_flag(p, "--targets-lora", nargs="+", default=["c_attn"], help="layers with adapters")
    add_flag(p, "--json", default=None, help="also write the results as JSON here")
    add_flag(p, "--one-mode", default=None, help=argparse.SUPPRESS)  # internal: measure one mode, print JSON
    return p.parse_args(argv)


def model_config(name: str):
    from transformers import AutoConfig, GPT2Config

    if name in PRESETS:
        return GPT2Config(n_positions=1024, **PRESETS[name])
    folder = next((f for f in (Path(name), REPO / name) if (f / "config.json").is_file()), None)
    if folder is None:
        raise UserError(f"--config {name}: not a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    return AutoConfig.from_pretrained(folder)


def build(mode: str, args: argparse.Namespace, precision: str, device, workdir: Path):
    """A random-weight model for `mode`; QLoRA goes through a saved copy, as bitsandbytes quantizes on load."""
    import torch
    from transformers import AutoModelForCausalLM

    import lora

    model = AutoModelForCausalLM.from_config(model_config(args.config))
    if mode == "full":
        return model.to(device)
    if mode == "lora":
        return lora.add_lora(
            model.to(device), args.rank_lora, 16, 0.05, args.targets_lora, quantized=False, base_name="bench"
        )
    lora.require_bitsandbytes(device, "qlora")
    model.save_pretrained(workdir)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        workdir, quantization_config=lora.quantization_config(4, compute_dtype), device_map={"": device}
    )
    lora.keep_4bit_weights_trainable(model)
    return lora.add_lora(model, args.rank_lora, 16, 0.05, args.targets_lora, quantized=True, base_name="bench")


def measure(mode: str, args: argparse.Namespace) -> dict:
    """Train `mode` for warm-up + timed steps on packed Austen blocks; runs inside its own process."""
    import resource

    import torch
    from accelerate import Accelerator

    import train
    from dataset import collate, load_paragraphs, tokenize_paragraphs
    from lora import parameter_counts
    from utils import load_tokenizer

    precision = train.resolve_precision(args.precision)
    accelerator = Accelerator(mixed_precision=precision)
    tokenizer = load_tokenizer(str(REPO / "configs/gpt2-tiny"))  # the GPT-2 tokenizer
    n_blocks = args.batch_size * (args.warmup + args.steps)
    paragraphs = load_paragraphs(REPO / "austen_dataset.pkl")
    blocks = tokenize_paragraphs(tokenizer, paragraphs, args.block_size, pack=True)[:n_blocks]
    if len(blocks) < n_blocks:
        raise UserError(f"not enough Austen text for {n_blocks} blocks; lower --steps or --batch-size")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model = build(mode, args, precision, accelerator.device, Path(workdir))
    optimizer = train.make_optimizer(model, train.parse_args(["--lr", "1e-4"]))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        batch = collate(blocks[step * args.batch_size : (step + 1) * args.batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        started = time.perf_counter()
        loss_sum, n_targets = train.lm_loss_sum(model, batch)
        accelerator.backward(loss_sum / n_targets)
        optimizer.step()
        optimizer.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            tokens = int(batch["attention_mask"].sum())
    trainable, total = parameter_counts(accelerator.unwrap_model(model))
    on_cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "tokens_per_s": tokens / statistics.median(times),
        "peak_memory_mib": peak / 2**20,
        "memory_kind": "CUDA max allocated" if on_cuda else "peak RSS",
        "trainable_params": trainable,
        "total_params": total,
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "precision": precision,
    }


def results_table(results: list[dict], args: argparse.Namespace) -> str:
    """A Markdown table of the modes, with ratios to the first one."""
    base = results[0]
    lines = [
        f"{args.config}, batch {args.batch_size} x {args.block_size} tokens, {base['precision']} on {base['device']}, "
        f"median of {args.steps} steps after {args.warmup} warm-up",
        f"| mode | trainable params | tokens/s | vs {base['mode']} | {base['memory_kind']} (MiB) | vs {base['mode']} |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        speed, memory = r["tokens_per_s"] / base["tokens_per_s"], r["peak_memory_mib"] / base["peak_memory_mib"]
        params = f"{r['trainable_params']:,} of {r['total_params']:,}"
        memory_mib = f"{r['peak_memory_mib']:,.0f}"
        lines.append(
            f"| {r['mode']} | {params} | {r['tokens_per_s']:,.0f} | {speed:.2f}x | {memory_mib} | {memory:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.block_size < 2:
        raise UserError("--steps and --batch-size must be at least 1, --warmup at least 0, --block-size at least 2")
    quiet_libraries()
    if args.one_mode:
        print(json.dumps(measure(args.one_mode, args)))
        return 0

    results = []
    for mode in args.modes:
        argv_mode = [*(argv if argv is not None else sys.argv[1:]), "--one-mode", mode]
        done = subprocess.run([sys.executable, str(REPO / "bench.py"), *argv_mode], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(
                f"{mode} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(results_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
