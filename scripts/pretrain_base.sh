#!/usr/bin/env bash
# Rebuilds configs/base-tiny, the offline base, by its recipe (docs/base-model.md): 45 minutes on a 2-core CPU with
# AMX (bf16), about 2 hours on one computing in fp32 (there, --max-steps 7000 on step 2 keeps it to about 90).
#
#   bash scripts/pretrain_base.sh                 # the corpus at ../shared/data/gutenberg
#   CORPUS=my/prose bash scripts/pretrain_base.sh # any folder of .txt works (one file per work, any subfolders)
#
# 1. a 4,096-token BPE and a 2-block GPT-2 config, fit on the corpus's training works (models/base-tiny-init);
# 2. train.py pretrains it from random weights (configs/pretrain-base.yaml: checkpoints in Checkpoints/base-tiny,
#    resumable with --resume; the model in models/base-tiny);
# 3. its weights in bf16 into configs/base-tiny (its README.md stays), about 5.4 MB;
# 4. the README's numbers: bits per character on held-out works and on held-out Austen, and the sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus="${CORPUS:-../shared/data/gutenberg}"
python dataset.py tokenizer --config configs/base-tiny-tokenizer.yaml --data "$corpus"
python train.py --config configs/pretrain-base.yaml --data "$corpus"
staged="$(mktemp -d)/base-tiny"
mkdir -p configs/base-tiny
python export.py --model-path models/base-tiny --out "$staged" --dtype bf16
cp "$staged"/* configs/base-tiny/
AUSTEN_GPT_CPU_BF16=0 python scripts/base_numbers.py configs/base-tiny --corpus "$corpus"  # fp32: the same on any CPU
sha256sum configs/base-tiny/model.safetensors
