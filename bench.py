"""Training speed, data preparation and memory, side by side in one run: this project's loop against
the seed's way and Hugging Face's Trainer, and full fine-tuning against LoRA and QLoRA.

  python bench.py                                  # GPT-2 124M config: ours vs seed-style vs Trainer (~10 min CPU)
  python bench.py --quick                          # gpt2-tiny, 2 steps each: a smoke run
  python bench.py --config gpt2-tiny --modes ours lora qlora --steps 12   # full vs adapters
  python bench.py --config gpt2-medium --modes qlora --steps 50 --batch-size 8 --block-size 512  # CUDA QLoRA check
  python bench.py --serving                        # serve.py under 1, 4 and 16 concurrent streams

Contenders, each in its own fresh process (so its peak memory is its own), on the same model config with
random weights (the FLOPs are the real ones) and the same Austen paragraphs:
  ours              this project: one batched tokenizer call, packed blocks, --precision (auto: bf16 where native),
                    the output layer and loss in chunks (chunked_loss.py), the GELU fused and, on a CPU,
                    attention with dropout recomputed in backward and, in bf16, dropout masks from random
                    bits (lean_layers.py)
  ours-unfused      the same loop on the model as transformers builds it: its own output layer, GELU and
                    attention, and a whole-batch fp32 log-softmax
  ours-fp32         ours in fp32
  seed              the seed's way: per-paragraph Python tokenization, every example padded to --block-size,
                    pads trained on, fp32
  trainer-ours      transformers.Trainer in fp32, fed our exact packed batches
  trainer-amp       the same at ours' mixed precision (bf16=True, or fp16=True where ours is fp16)
  trainer-collator  transformers.Trainer in fp32 with its usual DataCollatorForLanguageModeling(mlm=False):
                    one paragraph per example, padded per batch
  ours-unchunked    ours with the model's own output layer and a whole-batch loss (the other layers as ours)
  ours-compile      ours with torch.compile (inductor), as train.py --compile; its compile time falls in warm-up
  lora, qlora       our loop training LoRA adapters (on a 4-bit base for qlora)
Generation (unless --gen-samples 0): inference.py's sampling, --gen-samples x --gen-tokens new tokens from one
batched `generate` call with the KV cache, against one call per sample, then one sample of --gen-long-contexts
times the model's context (the window slides), in generated tokens/s.
Reported: whole-corpus data preparation seconds, from reading the pickle to token blocks (ours also again from
its tokenized cache); useful (non-pad) tokens/s, the median over the timed
steps after warm-up; peak memory (max allocated on CUDA, peak RSS on CPU); achieved FLOP/s (6N + 12LdT per
computed token) as a share of a matmul peak measured in the same process at the same precision; and
ratios to the first contender.
--serving measures serve.py instead, in its own process on --model-config's random weights (or
--serving-model): --serving-requests streamed requests of --gen-tokens new tokens at each number of concurrent
streams (each client sends its next request when its last ends), in generated tokens/s against one stream,
and each request's time to its first token (p50, p95).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from austen_gpt.cli import ArgumentParser, UserError, add_bool_flag, add_flag, quiet_libraries, require, run_cli
from austen_gpt.flags import REPO, add_precision_flag
from austen_gpt.settings import ModelSettings

PRESETS = {  # GPT-2 sizes by name, so no Hub access is needed; anything else is a config folder
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
}
CONTENDERS = [  # the first 7 run by default
    "ours", "ours-unfused", "ours-fp32", "seed", "trainer-ours", "trainer-amp", "trainer-collator",
    "ours-unchunked", "ours-compile", "lora", "qlora",
]  # fmt: skip
MIXED_PRECISION = {"ours", "ours-unfused", "ours-unchunked", "ours-compile", "trainer-amp", "lora", "qlora"}
MODEL_AS_BUILT = {"seed", "ours-unfused"}  # the model's own layers: no chunked loss, no lean_layers
MODEL = ModelSettings()  # train.py's defaults for the adapters
QUICK_PARAGRAPHS = 400  # --quick prepares these first paragraphs of the corpus, enough for its few batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(
        p, "--model-config", default="gpt2", help=f"model config: {', '.join(PRESETS)}, gpt2-tiny or a config folder"
    )
    add_flag(
        p, "--modes", nargs="+", choices=CONTENDERS, default=CONTENDERS[:7], help="contenders, first is the baseline"
    )
    add_flag(p, "--steps", type=int, default=4, help="timed optimizer steps per contender")
    add_flag(p, "--warmup", type=int, default=2, help="untimed steps first (allocator, kernels, caches)")
    add_flag(p, "--batch-size", type=int, default=8, help="examples per step")
    add_flag(p, "--block-size", type=int, default=100, help="tokens per example (the seed pads every one to it)")
    add_precision_flag(p, "precision of 'ours': ")
    add_flag(p, "--rank-lora", type=int, default=MODEL.rank_lora, help="LoRA rank")
    add_flag(p, "--targets-lora", nargs="+", default=MODEL.targets_lora, help="layers with adapters, as train.py's")
    add_flag(p, "--gen-samples", type=int, default=3, help="samples in the generation benchmark (0: skip it)")
    add_flag(p, "--gen-tokens", type=int, default=300, help="new tokens per sample in the generation benchmark")
    add_flag(
        p,
        "--gen-long-contexts",
        type=float,
        default=1.5,
        help="then one sample of this many model contexts of new tokens (the window slides); 0 skips it",
    )
    add_flag(
        p,
        "--card-peak-tflops",
        type=float,
        default=None,
        help="the accelerator's datasheet peak at the precision used (e.g. 989 for H100/H200 SXM bf16 dense, 312 for "
        "A100 bf16): adds MFU, achieved FLOP/s over it, to the table",
    )
    add_bool_flag(p, "--profile", help="also profile one step of each of our loops (torch.profiler): where time goes")
    add_bool_flag(
        p,
        "--quick",
        help=f"smoke run: gpt2-tiny, 1 warm-up and 2 timed steps of 4 examples, 20 new tokens, the corpus' first "
        f"{QUICK_PARAGRAPHS} paragraphs prepared, the matmul peak probed on small matrices",
    )
    add_bool_flag(p, "--serving", help="measure serve.py under concurrent streams instead (see above)")
    add_flag(p, "--serving-streams", nargs="+", type=int, default=[1, 4, 16], help="concurrent streams, first the base")
    add_flag(p, "--serving-requests", type=int, default=32, help="streamed requests at each number of streams")
    add_flag(p, "--serving-model", default=None, help="a model folder to serve (default: --model-config, random)")
    add_flag(p, "--json", default=None, help="also write the results as JSON here")
    add_flag(p, "--markdown", default=None, help="also write the table as Markdown here")
    add_flag(p, "--one", default=None, help=argparse.SUPPRESS)  # internal: measure one contender, print JSON
    args = p.parse_args(argv)
    if args.quick:
        args.model_config, args.steps, args.warmup, args.batch_size, args.gen_tokens = "gpt2-tiny", 2, 1, 4, 20
        args.serving_streams, args.serving_requests = args.serving_streams[:2], 4
    return args


def model_config(name: str):
    from transformers import AutoConfig, GPT2Config

    if name in PRESETS:
        return GPT2Config(n_positions=1024, **PRESETS[name])
    candidates = (Path(name), REPO / name, REPO / "configs" / name)
    folder = next((f for f in candidates if (f / "config.json").is_file()), None)
    if folder is None:
        raise UserError(f"--config {name}: not a preset ({', '.join(PRESETS)}) nor a folder with config.json")
    return AutoConfig.from_pretrained(folder)


def build(mode: str, args: argparse.Namespace, precision: str, device, workdir: Path):
    """A random-weight model; QLoRA goes through a saved copy, as bitsandbytes quantizes on load."""
    import torch
    from transformers import AutoModelForCausalLM

    from austen_gpt.models import lora
    from austen_gpt.models.device import compute_dtype

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args.model_config))
    if mode not in ("lora", "qlora"):
        return model.to(device)
    if mode == "lora":
        return lora.add_lora(
            model.to(device), args.rank_lora, 16, 0.05, args.targets_lora, quantized=False, base_name="-"
        )
    lora.require_bitsandbytes(device, "qlora")
    model.save_pretrained(workdir)
    model = AutoModelForCausalLM.from_pretrained(
        workdir, quantization_config=lora.quantization_config(4, compute_dtype(precision)), device_map={"": device}
    )
    lora.keep_4bit_weights_trainable(model)
    return lora.add_lora(model, args.rank_lora, 16, 0.05, args.targets_lora, quantized=True, base_name="-")


def prepare_examples(mode: str, tokenizer, block: int, quick: bool = False) -> tuple[list, float, float | None]:
    """(examples, cold seconds, cached seconds) for the whole corpus (its first QUICK_PARAGRAPHS for a --quick
    smoke run), from reading austen_dataset.pkl to token blocks, each contender its own way; ours again from
    the cache its cold run filled (others have none)."""
    from austen_gpt.data.paragraphs import load_paragraphs
    from austen_gpt.data.tokens import tokenize_cached

    def read_corpus() -> list[str]:
        paragraphs = load_paragraphs(REPO / "austen_dataset.pkl")
        return paragraphs[:QUICK_PARAGRAPHS] if quick else paragraphs

    started = time.perf_counter()
    paragraphs = read_corpus()
    if mode not in ("seed", "trainer-collator"):
        with tempfile.TemporaryDirectory() as cache:
            examples = tokenize_cached(tokenizer, paragraphs, block, True, Path(cache))
            cold = time.perf_counter() - started
            started = time.perf_counter()
            tokenize_cached(tokenizer, read_corpus(), block, True, Path(cache))
            return examples, cold, time.perf_counter() - started
    if mode == "seed":  # one paragraph at a time in Python, padded to the block, overflow kept
        eot = tokenizer.eos_token
        examples = []
        for paragraph in paragraphs:
            encoded = tokenizer(
                eot + paragraph + eot,
                truncation=True,
                max_length=block,
                padding="max_length",
                return_overflowing_tokens=True,
            )
            examples.extend(zip(encoded["input_ids"], encoded["attention_mask"], strict=True))
    elif mode == "trainer-collator":  # the usual recipe: batched tokenization, one paragraph per example
        encoded = tokenizer([p + tokenizer.eos_token for p in paragraphs], truncation=True, max_length=block)
        examples = [{"input_ids": ids} for ids in encoded["input_ids"]]
    return examples, time.perf_counter() - started, None


def batches_for(mode: str, examples: list, n: int, args: argparse.Namespace, tokenizer) -> list[dict]:
    """The first n batches of a contender, as tensors (labels of the seed style include the pads)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    from austen_gpt.data.batches import collate

    chunks = [examples[i * args.batch_size : (i + 1) * args.batch_size] for i in range(n)]
    if mode == "seed":
        return [
            {
                "input_ids": (ids := torch.tensor([e[0] for e in chunk])),
                "attention_mask": torch.tensor([e[1] for e in chunk]),
                "labels": ids.clone(),
            }
            for chunk in chunks
        ]
    if mode == "trainer-collator":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        return [collator(chunk) for chunk in chunks]
    return [collate(chunk, tokenizer.pad_token_id) for chunk in chunks]


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention"}


def profile_step(step) -> dict:
    """Where one training step spends its time: the matmul share and the ten costliest operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    attribute = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    times = {e.key: getattr(e, attribute) for e in prof.key_averages()}
    total = sum(times.values())
    top = sorted(times.items(), key=lambda kv: -kv[1])[:10]
    return {
        "matmul_share_of_step": sum(t for k, t in times.items() if k in MATMUL_OPS) / total,
        "top_ops": {k: t / total for k, t in top},
    }


def train_own_loop(model, batches: list[dict], precision: str, mode: str, profile: bool = False):
    """Seconds per optimizer step of our loop (or the seed-style one: the model's loss over every position),
    and with `profile` a profile of one more step (the last batch, untimed)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import TorchDynamoPlugin

    from austen_gpt.models.device import compute_dtype
    from austen_gpt.training import hot_path
    from austen_gpt.training.settings import OptimizationSettings
    from austen_gpt.training.step import forward_backward, make_optimizer

    dynamo = TorchDynamoPlugin(backend="inductor" if mode == "ours-compile" else "no")
    accelerator = Accelerator(mixed_precision=precision, dynamo_plugin=dynamo)
    if mode not in MODEL_AS_BUILT:  # as train.py does with its default settings
        settings = OptimizationSettings(chunked_loss=mode != "ours-unchunked")
        choices = hot_path.device_choices(accelerator.device, compute_dtype(precision), recorded=None)
        max_tokens = max(batch["input_ids"].shape[1] for batch in batches)
        hot_path.install_lean_layers(model, settings, choices, compute_dtype(precision), max_tokens, sharded=False)
    optimizer = make_optimizer(model, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step(batch: dict, targets: int) -> None:
        if mode == "seed":
            accelerator.backward(model(**batch).loss)
        else:  # train.py's step: the loss over the targets counted on the host beforehand
            forward_backward(model, batch, accelerator, targets, sync=True)
        optimizer.step()
        optimizer.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def targets(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    seconds = []
    for batch in batches[: len(batches) - profile]:
        batch, n = {k: v.to(accelerator.device) for k, v in batch.items()}, targets(batch)
        started = time.perf_counter()
        step(batch, n)
        seconds.append(time.perf_counter() - started)
    if not profile:
        return seconds, None
    last = {k: v.to(accelerator.device) for k, v in batches[-1].items()}
    return seconds, profile_step(lambda: step(last, targets(batches[-1])))


def train_with_trainer(model, batches: list[dict], workdir: Path, precision: str) -> list[float]:
    """Seconds per optimizer step of transformers.Trainer at `precision`, fed exactly `batches` in order."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    class Batches(torch.utils.data.Dataset):  # one item per ready-made batch, collated as is
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    settings = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=1,
        max_steps=len(batches),
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=0,
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=settings, train_dataset=Batches(), data_collator=lambda items: items[0])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(Batches())  # keep our order
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds


def matmul_peak(precision: str, device, quick: bool = False) -> float:
    """FLOP/s of the best of several large square matmuls at `precision`, on this device, now (on small ones
    for a --quick smoke run)."""
    import torch

    from austen_gpt.models.device import compute_dtype

    dtype = compute_dtype(precision)
    n = 512 if quick else 4096 if torch.cuda.is_available() else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One contender, in this process: prepare the corpus, train warm-up + timed steps, report."""
    import torch
    from accelerate import PartialState

    from austen_gpt.models.device import resolve_precision
    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.models.lora import parameter_counts

    own_precision = resolve_precision(args.precision) if mode in MIXED_PRECISION else "no"
    device = PartialState().device
    tokenizer = load_tokenizer(str(REPO / "configs/gpt2-tiny"))  # the GPT-2 tokenizer
    examples, prep_seconds, cached_seconds = prepare_examples(mode, tokenizer, args.block_size, args.quick)
    profile = args.profile and not mode.startswith("trainer")
    n = args.warmup + args.steps + profile
    if len(examples) < n * args.batch_size:
        raise UserError(f"the corpus has too few examples for {n} steps of {args.batch_size}")
    batches = batches_for(mode, examples, n, args, tokenizer)
    peak = matmul_peak(own_precision, device, args.quick)  # again after training: the best of both (shared machine)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak memory is training's alone
    with tempfile.TemporaryDirectory() as workdir:
        model = build(mode, args, own_precision, device, Path(workdir))
        trainable, total = parameter_counts(model)
        config = model_config(args.model_config)
        if mode.startswith("trainer"):
            seconds, profiled = train_with_trainer(model, batches, Path(workdir), own_precision), None
        else:
            seconds, profiled = train_own_loop(model, batches, own_precision, mode, profile)
    timed = list(zip(seconds[args.warmup :], batches[args.warmup : len(seconds)], strict=True))
    useful = statistics.median(int(b["attention_mask"].sum()) / s for s, b in timed)
    computed = statistics.median(b["input_ids"].numel() / s for s, b in timed)
    # FLOPs per computed token: 6 per weight used in a matmul (the tied embedding once, as the output
    # layer) plus attention scores and values (nanoGPT's estimate_mfu); position embeddings excluded.
    weights = total - config.n_positions * config.n_embd
    flops_per_token = 6 * weights + 12 * config.n_layer * config.n_embd * args.block_size
    peak = max(peak, matmul_peak(own_precision, device, args.quick))
    on_cuda = torch.cuda.is_available()
    memory = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "precision": {"no": "fp32"}.get(own_precision, own_precision),
        "data_prep_s": prep_seconds,
        "data_prep_cached_s": cached_seconds,
        "first_step_s": seconds[0],  # with any compilation (--json)
        "useful_tokens_per_s": useful,
        "computed_tokens_per_s": computed,
        "flops_share_of_matmul_peak": computed * flops_per_token / peak,
        "achieved_tflops": computed * flops_per_token / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "peak_memory_mib": memory / 2**20,
        "memory_kind": "CUDA max allocated" if on_cuda else "peak RSS",
        "trainable_params": trainable,
        "total_params": total,
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "profile": profiled,
    }


def measure_generation(args: argparse.Namespace) -> dict:
    """Generated tokens/s of inference.py's sampling: all samples in one batched call, then one call each, then
    one sample longer than the context (the window slides)."""
    import torch
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.device import default_device
    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import context_length, prompt_ids, sample_ids
    from austen_gpt.settings import SamplingSettings

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args.model_config)).to(default_device()).eval()
    tokenizer = load_tokenizer(str(REPO / "configs/gpt2-tiny"))
    ids, eot = prompt_ids(tokenizer, "It is a truth universally acknowledged"), tokenizer.eos_token_id
    long_tokens = int(args.gen_long_contexts * context_length(model))

    def tokens_per_second(n: int, calls: int, tokens: int, static_cache: bool = False) -> float:
        settings = SamplingSettings(max_new_tokens=tokens, paragraphs=None, static_cache=static_cache)
        started, generated = time.perf_counter(), 0
        for call in range(calls):
            generated += sum(len(row) for row in sample_ids(model, [ids] * n, settings, call, eot))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return generated / (time.perf_counter() - started)

    tokens_per_second(1, 1, 8)  # warm-up
    on_cuda = torch.cuda.is_available()
    if on_cuda:  # transformers compiles generation with a static cache: the first call of a shape compiles
        tokens_per_second(args.gen_samples, 1, args.gen_tokens, static_cache=True)
    return {
        "samples": args.gen_samples,
        "new_tokens": args.gen_tokens,
        "batched_tokens_per_s": tokens_per_second(args.gen_samples, 1, args.gen_tokens),
        "one_by_one_tokens_per_s": tokens_per_second(1, args.gen_samples, args.gen_tokens),
        "context": context_length(model),
        "long_tokens": long_tokens,
        "long_tokens_per_s": tokens_per_second(1, 1, long_tokens) if long_tokens else None,
        "static_tokens_per_s": tokens_per_second(args.gen_samples, 1, args.gen_tokens, True) if on_cuda else None,
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
    }


def generation_table(result: dict, args: argparse.Namespace) -> str:
    ratio = result["batched_tokens_per_s"] / result["one_by_one_tokens_per_s"]
    lines = [
        f"Generation, {args.model_config} (fp32, KV cache, top-k 50, top-p 0.95) on {result['device']}: "
        f"{result['samples']} samples x {result['new_tokens']} new tokens",
        "",
        "| sampling | generated tokens/s | vs one by one |",
        "|---|---|---|",
        f"| one batched call (inference.py) | {result['batched_tokens_per_s']:,.0f} | {ratio:.2f}x |",
        f"| one call per sample | {result['one_by_one_tokens_per_s']:,.0f} | 1.00x |",
    ]
    if result["static_tokens_per_s"]:
        static_ratio = result["static_tokens_per_s"] / result["one_by_one_tokens_per_s"]
        lines.append(
            f"| one batched call, static KV cache (compiled; inference.py --static-cache) | "
            f"{result['static_tokens_per_s']:,.0f} | {static_ratio:.2f}x |"
        )
    if result["long_tokens_per_s"]:
        long_ratio = result["long_tokens_per_s"] / result["one_by_one_tokens_per_s"]
        lines.append(
            f"| one sample of {result['long_tokens']:,} tokens, {result['context']:,}-token context (the window "
            f"slides) | {result['long_tokens_per_s']:,.0f} | {long_ratio:.2f}x |"
        )
    return "\n".join(lines)


def measure_serving(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], dict]:
    """serve.py in its own process, under each number of concurrent streams in turn (after one warm-up request),
    then a request that arrives while a batch runs."""
    import asyncio
    import os
    import signal
    import socket

    import httpx

    from austen_gpt.serving.load import late_arrival, load

    model = args.serving_model or str(random_model_folder(args.model_config, workdir / "model"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, streams = f"http://127.0.0.1:{port}", max(args.serving_streams)
    flags = ["--port", str(port), "--model-name", "bench", "--max-batch", str(streams), "--max-tokens"]
    command = [sys.executable, str(REPO / "serve.py"), "--model-path", model, *flags, str(args.gen_tokens)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ)
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise UserError(f"serve.py exited: {(server.stderr.read().strip().splitlines() or ['?'])[-1]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(load(url, "bench", 1, 1, args.gen_tokens))  # warm-up
        requests, tokens = args.serving_requests, args.gen_tokens
        levels = [asyncio.run(load(url, "bench", n, requests, tokens)) for n in args.serving_streams]
        return levels, asyncio.run(late_arrival(url, "bench", tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def random_model_folder(name: str, folder: Path) -> Path:
    """--model-config's model with random weights (seeded) and the gpt2-tiny tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config(name)).save_pretrained(folder)
    load_tokenizer(str(REPO / "configs/gpt2-tiny")).save_pretrained(folder)
    return folder


def serving_table(levels: list[dict], late: dict, args: argparse.Namespace) -> str:
    base = levels[0]
    lines = [
        f"serve.py, {args.serving_model or args.model_config + ' (random weights)'}: {args.serving_requests} streamed "
        f"requests of {args.gen_tokens} new tokens at each number of concurrent streams (--max-batch "
        f"{max(args.serving_streams)})",
        "",
        f"| concurrent streams | generated tokens/s | vs {base['streams']} | time to first token p50 (s) | p95 (s) |",
        "|---|---|---|---|---|",
    ]
    for level in levels:
        ratio = level["tokens_per_s"] / base["tokens_per_s"]
        lines.append(
            f"| {level['streams']} | {level['tokens_per_s']:,.0f} | {ratio:.2f}x "
            f"| {level['ttft_p50_s']:.3f} | {level['ttft_p95_s']:.3f} |"
        )
    lines += [
        "",
        f"No continuous batching: a request sent while a batch of one {late['batch_tokens']}-token request runs got "
        f"its first token after {late['late_ttft_s']:.2f} s (that batch took {late['batch_seconds']:.2f} s).",
    ]
    return "\n".join(lines)


def results_table(results: list[dict], args: argparse.Namespace) -> str:
    """A Markdown table of the contenders, with ratios to the first one."""
    base = results[0]
    mfu = args.card_peak_tflops is not None
    mfu_heading = f"MFU ({args.card_peak_tflops:g} TFLOP/s peak) | " if mfu else ""
    lines = [
        f"{args.model_config}, batches of {args.batch_size} x {args.block_size} tokens on {base['device']}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
        + (f"; data prep of the corpus' first {QUICK_PARAGRAPHS} paragraphs" if args.quick else ""),
        "",
        f"| contender | precision | data prep (s) | from cache (s) | useful tokens/s | vs {base['mode']} "
        f"| FLOP/s share of matmul peak | {mfu_heading}{base['memory_kind']} (MiB) | trainable params |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * mfu,
    ]
    for r in results:
        speed = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        cells = [
            r["mode"],
            r["precision"],
            f"{r['data_prep_s']:.2f}",
            "-" if r["data_prep_cached_s"] is None else f"{r['data_prep_cached_s']:.2f}",
            f"{r['useful_tokens_per_s']:,.0f}",
            f"{speed:.2f}x",
            f"{100 * r['flops_share_of_matmul_peak']:.0f}%",
            *([f"{100 * r['achieved_tflops'] / args.card_peak_tflops:.1f}%"] if mfu else []),
            f"{r['peak_memory_mib']:,.0f}",
            f"{r['trainable_params']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for r in results:
        if r["profile"]:
            ops = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(r["profile"]["top_ops"].items())[:6])
            share = r["profile"]["matmul_share_of_step"]
            lines.append(f"\nProfile of one {r['mode']} step: matmuls {100 * share:.0f}% of the time; costliest: {ops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require(
        [
            (args.steps >= 1 and args.warmup >= 0, "--steps must be at least 1 and --warmup at least 0"),
            (args.batch_size >= 1 and args.block_size >= 2, "--batch-size must be at least 1, --block-size 2"),
            (args.gen_samples >= 0 and args.gen_tokens >= 1, "--gen-samples must be 0 or more, --gen-tokens 1 or more"),
            (args.gen_long_contexts >= 0, "--gen-long-contexts must be 0 (skip) or more"),
            (args.card_peak_tflops is None or args.card_peak_tflops > 0, "--card-peak-tflops must be positive"),
        ]
    )
    quiet_libraries()
    if args.serving:
        require([(min(args.serving_streams) >= 1 and args.serving_requests >= 1, "--serving-streams and "
                  "--serving-requests must be at least 1")])  # fmt: skip
        with tempfile.TemporaryDirectory() as workdir:
            levels, late = measure_serving(args, Path(workdir))
        return report(serving_table(levels, late, args), {"serving": levels, "late_arrival": late}, args)
    if args.one:
        print(json.dumps(measure_generation(args) if args.one == "generation" else measure(args.one, args)))
        return 0

    def in_own_process(mode: str) -> dict:
        command = [sys.executable, str(REPO / "bench.py"), *(argv if argv is not None else sys.argv[1:]), "--one", mode]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"{mode} failed: {(done.stderr.strip().splitlines() or [str(done.returncode)])[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = [in_own_process(mode) for mode in args.modes]
    table = results_table(results, args)
    generation = in_own_process("generation") if args.gen_samples > 0 else None
    if generation:
        table += "\n\n" + generation_table(generation, args)
    return report(table, {"results": results, "generation": generation}, args)


def report(table: str, results: dict, args: argparse.Namespace) -> int:
    """Print the table; write it to --markdown, and the results with the flags to --json, where asked."""
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
