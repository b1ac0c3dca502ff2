#!/usr/bin/env bash
# Self-play and reranking at GPT-2 scale on one GPU (docs/style.md#writing-more-like-her-rerank-and-self-play), within
# about 8 minutes of an H100 or H200, on the fine-tuned base that scripts/gpu_pretrain.sh leaves in models/austen-small:
#
#   bash scripts/gpu_pretrain.sh && bash scripts/gpu_self_play.sh [RESULTS_FOLDER]   # default: gpu_results/self-play
#
# 1. three self-play rounds on models/austen-small (the CPU recipe's flags at this model's batch size);
# 2. one style report: the fine-tuned model, each round, and the fine-tuned model reranked among 4 and 16 candidates.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_results/self-play}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
[ -f models/austen-small/model.safetensors ] || { echo "run scripts/gpu_pretrain.sh first (models/austen-small)"; exit 2; }
{ date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$out/machine.txt"
time python train.py --model models/austen-small --self-play-rounds 3 --self-play-pairs 1024 --batch-size 32 \
  --lr 2e-5 --warmup-steps 10 --sample-every 0 --check-dir Checkpoints/self-play-small \
  --output-dir models/austen-small-self-play 2>&1 | tr '\r' '\n' | grep -v "it/s" | tee "$out/self-play.log"
time python style_report.py --models models/austen-small Checkpoints/self-play-small/Round_1 \
  Checkpoints/self-play-small/Round_2 Checkpoints/self-play-small/Round_3 \
  --names "fine-tuned" "self-play round 1" "self-play round 2" "self-play round 3" --rerank 4 16 \
  --max-new-tokens 128 --show-samples 2 --out "$out/report" --overwrite 2>&1 | tee "$out/report.log"
