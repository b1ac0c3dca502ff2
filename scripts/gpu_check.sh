#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, in one command (about 5 minutes on an H100 or H200):
#
#   bash scripts/gpu_check.sh [RESULTS_FOLDER]        # default: gpu_results/
#   STEPS=10 WARMUP=3 bash scripts/gpu_check.sh       # shorter, for a lease of a few minutes
#
# 1. the CUDA tests: the chunked loss (our chunks, and Cut Cross-Entropy's kernel if installed) against the
#    model's own output layer and loss, in bf16 on the GPU;
# 2. GPT-2 124M at 16 x 1024 tokens, bf16: ours, the model as transformers builds it, ours compiled, and
#    Trainer at the same precision on the same batches; MFU against CARD_PEAK_TFLOPS (default 989, the
#    H100/H200 SXM bf16 dense peak; 312 for an A100);
# 3. GPT-2 124M at 8 x 100 (the CPU table's batches), with the original loop, and sampling speed;
# 4. gpt2-medium at 8 x 512: full fine-tuning, LoRA and QLoRA, speed and peak memory.
#
# Needs what requirements.txt installs (bitsandbytes for QLoRA); Cut Cross-Entropy is optional.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
peak=${CARD_PEAK_TFLOPS:-989}
steps=${STEPS:-20}
warmup=${WARMUP:-5}
medium_steps=$((steps * 5 / 2))
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
  python -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "bitsandbytes: none"
  python -c "import cut_cross_entropy; print('cut-cross-entropy installed')" 2>/dev/null || echo "cut-cross-entropy: none"
} | tee "$out/machine.txt"

python -m pytest -q -p no:cacheprovider tests/test_hot_path.py -k cuda -rs 2>&1 | tee "$out/cuda_tests.txt" || echo "CUDA tests FAILED: $out/cuda_tests.txt"  # measure on regardless

python bench.py --modes ours ours-unfused ours-compile trainer-amp --batch-size 16 --block-size 1024 \
  --steps "$steps" --warmup "$warmup" --gen-samples 0 --card-peak-tflops "$peak" --markdown "$out/gpt2_16x1024.md"
python bench.py --modes ours ours-unfused ours-fp32 seed trainer-ours trainer-amp \
  --steps "$steps" --warmup "$warmup" --card-peak-tflops "$peak" --markdown "$out/gpt2_8x100.md"
python bench.py --config gpt2-medium --modes ours lora qlora --batch-size 8 --block-size 512 \
  --steps "$medium_steps" --warmup "$warmup" --gen-samples 0 --markdown "$out/gpt2-medium_8x512.md"
echo "results in $out/"
