#!/usr/bin/env bash
# The offline base at GPT-2 scale on one GPU (docs/base-model.md#on-a-gpu), within about 8 minutes of an H100 or H200:
#
#   bash scripts/gpu_pretrain.sh [RESULTS_FOLDER]        # default: gpu_results/base-small
#   CORPUS=my/prose bash scripts/gpu_pretrain.sh         # any folder of .txt works
#
# 1. configs/base-small's GPT-2-small config with configs/base-tiny's tokenizer (the BPE of the same training works,
#    so no second fit), pretrained from random weights on the corpus (configs/pretrain-base-gpu.yaml);
# 2. fine-tuned on Austen, all weights, as the quickstart's run file says but at this model's scale;
# 3. the style report of the base, the fine-tune and the base prompted with K = 0, 3 and 10 of her excerpts.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus="${CORPUS:-../shared/data/gutenberg}"
out="${1:-gpu_results/base-small}"
mkdir -p "$out" models/base-small-init
export PYTHONUNBUFFERED=1
cp configs/base-small/config.json configs/base-tiny/tokenizer.json configs/base-tiny/tokenizer_config.json models/base-small-init/
{ date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$out/machine.txt"
time python train.py --config configs/pretrain-base-gpu.yaml --data "$corpus" 2>&1 | tr '\r' '\n' | grep -v "it/s" | tee "$out/pretrain.log"
time python train.py --config configs/quickstart.yaml --model models/base-small --max-input-length 256 --batch-size 32 \
  --lr 1e-4 --check-dir Checkpoints/austen-small --output-dir models/austen-small 2>&1 | tr '\r' '\n' | grep -v "it/s" | tee "$out/fine-tune.log"
python style_report.py --models models/base-small models/austen-small --names "base-small" "base-small fine-tuned" \
  --few-shot-models models/base-small --few-shot 0 3 10 --max-new-tokens 150 --show-samples 2 --out "$out/report" --overwrite
