"""Where and in which precision to compute: the device, and --precision resolved to a dtype."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Device and precision


def default_device() -> torch.device:
    """The one device every script computes on: an NVIDIA (or ROCm) GPU, else an Intel GPU (XPU), else Apple's
    MPS, else the CPU, the order Accelerate picks for training. Only CUDA and the CPU are tested (docs/training.md)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); elsewhere bf16 autocast is slower than fp32.

    AUSTEN_GPT_CPU_BF16=0 answers no on any CPU: the tests set it, so that --precision auto computes in fp32
    everywhere and the suite's numbers and times do not depend on which kind of CPU runs it."""
    if os.environ.get("AUSTEN_GPT_CPU_BF16") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """The Accelerator's mixed_precision for --precision ("no" is fp32); auto: bf16 where native."""
    if precision != "auto":
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    device = default_device().type
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "xpu":
        return "bf16"  # native on Intel's data-centre and Arc GPUs
    if device == "mps":
        return "no"  # fp32: Apple GPUs gain little from bf16 autocast, and older macOS lacks it
    return "bf16" if cpu_has_bf16() else "no"


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype matmuls run in under an Accelerator's mixed_precision (also 4-bit layers' compute dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


# ----------------------------------------------------------------------------------------------
# Memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
KEEP_BELOW = 1 << 30  # bytes


def reuse_freed_memory() -> bool:
    """Have the C library keep freed memory for the next allocation rather than return it to the system;
    returns whether it does (glibc only, as on most Linux systems).

    glibc maps each allocation of more than 32 MB afresh and unmaps it when it is freed, so that every step's
    large tensors (a chunk's logits, the embedding's gradient) are page-faulted in and zeroed by the kernel
    again: on a CPU that took a tenth of a GPT-2 124M step. Raising both thresholds to 1 GiB serves them from
    memory the process already holds, which is what jemalloc and tcmalloc, PyTorch's recommended allocators
    for CPUs, do. The price is memory that stays with the process between steps: docs/benchmarks.md."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl (Alpine) has no such thresholds
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
