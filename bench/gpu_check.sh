#!/usr/bin/env bash
# The GPU check, run from the checkout without installing (the device image has CuPy,
# PyTorch, pytest and hypothesis): the GPU tests, then the quick benchmark with peers.
# Results go to $OUT (the device tool's folder) or bench/results/.  About 4 minutes, at most 8.5.
# A copy without .git (the device tool's) names its commit with LKREF_GIT_SHA=<sha>.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9._-')
card=${card:-unknown-gpu}
{
  echo "== $(date -u +%FT%TZ) git ${LKREF_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} on ${card}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$out/gpu-$card-env.txt"
echo "== GPU tests"
# no -x: one run should show every failure; the benchmark refuses to time a path that is wrong
timeout 240 python3 -m pytest -q -rfE -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu-$card-tests.txt"
echo "== quick benchmark"
timeout 270 python3 -m lkref bench --backend cupy --repeat 20 --skip-peer torch-compile \
  --csv "$out/gpu-$card-bench.csv" 2>&1 | tee "$out/gpu-$card-bench.txt"
