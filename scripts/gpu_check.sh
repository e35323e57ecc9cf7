#!/usr/bin/env bash
# GPU check: the CUDA tests, then a <= 5-minute GPU benchmark (benchmarks/gpu_bench.py), in < 8 minutes.
#
#   bash scripts/gpu_check.sh                     # figures on stdout, and in $OUT/ when OUT is set
#   MODEL=models/smollm2-135m bash scripts/gpu_check.sh
#
# Needs a CUDA build of torch in .venv (or PYTHON=...): scripts/setup.sh installs the CPU wheel,
# so on a GPU machine install a CUDA torch 2.13.0 first. Without a CUDA device it stops at once with
# one line and exit 2; nothing else in recursa needs a GPU. Without SmolLM2's weights (no network
# for `recursa models fetch`) the benchmark times a random model of the same shape and says so.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODEL=${MODEL:-models/smollm2-135m}
OUTDIR=${OUT:-}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False, or torch is missing); nothing run" >&2
  exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
[ -n "$OUTDIR" ] && mkdir -p "$OUTDIR"
log() { if [ -n "$OUTDIR" ]; then tee -a "$OUTDIR/$1"; else cat; fi; }

start=$(date +%s)
echo "== CUDA tests (tests whose name or file says cuda; 150 s cap)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m "not slow or slow" -k "cuda" tests/ 2>&1 | log gpu_tests.txt
tests_rc=${PIPESTATUS[0]}
echo "CUDA tests exit code: $tests_rc" | log gpu_tests.txt

echo "== GPU benchmark (<= 5 min)"
timeout 300 "$PY" benchmarks/gpu_bench.py --model "$MODEL" --budget 240 \
  ${OUTDIR:+--out "$OUTDIR/gpu_bench.json"} 2>&1 | log gpu_bench.txt
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc, $(( $(date +%s) - start )) s" | log gpu_check.txt
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
