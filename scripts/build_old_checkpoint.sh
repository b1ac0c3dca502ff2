#!/usr/bin/env bash
# Builds tests/fixtures/old_checkpoint: a small checkpoint written by train.py at a given commit, which
# tests/test_layout.py resumes with today's code (a checkpoint must outlive a refactor).
#
#   bash scripts/build_old_checkpoint.sh [COMMIT]    # default: dde111e, the last commit before the package
#
# The model is tiny (a 300-token BPE, one 16-wide layer: 40 KB of weights), trained for two epochs on 48
# Austen paragraphs on one thread. The fixture keeps the checkpoint after epoch 1, as if the run had been
# stopped there, and the final weights of the whole run (final.safetensors), which the resumed run must
# reproduce. Every path in it is relative to the fixture folder, where the test resumes it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
commit="${1:-dde111e}"
out="$repo/tests/fixtures/old_checkpoint"
work="$(mktemp -d)"
git -C "$repo" worktree add -q --detach "$work/code" "$commit"
trap 'git -C "$repo" worktree remove --force "$work/code"' EXIT
rm -rf "$out" && mkdir -p "$out"
cd "$out"
PYTHONPATH="$work/code" python - "$repo/austen_dataset.pkl" <<'PY'
import json, sys
from dataset import load_paragraphs  # the project's own safe reader of its pickle
paragraphs = [p for p in load_paragraphs(sys.argv[1]) if 80 < len(p) < 400][:48]
with open("data.jsonl", "w") as f:
    f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
PY
python "$work/code/dataset.py" tokenizer --data data.jsonl --vocab-size 300 --layers 1 --out model
python - <<'PY'
import json
config = json.load(open("model/config.json"))
config.update(n_embd=16, n_head=2, n_positions=64)
json.dump(config, open("model/config.json", "w"), indent=2)
PY
OMP_NUM_THREADS=1 python "$work/code/train.py" --model model --from-scratch --data data.jsonl --max-input-length 64 \
  --epochs 2 --batch-size 8 --lr 3e-3 --warmup-steps 4 --sample-every 0 --eval-steps 0 --precision fp32 \
  --check-dir Checkpoints --output-dir out
mv out/model.safetensors final.safetensors
rm -rf out Checkpoints/logs Checkpoints/Epoch_2 Checkpoints/best
echo "commit $(git -C "$work/code" rev-parse --short HEAD)" > WRITTEN_BY
du -sh "$out"
