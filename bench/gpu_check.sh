#!/usr/bin/env bash
# The GPU check, run from the checkout without installing (the device image has CuPy,
# PyTorch, pytest and hypothesis): the GPU tests, then the quick benchmark with peers.
# Results go to $OUT (the device tool's folder) or bench/results/.  Run 2 (H100) took 368 s for
# the warm-up, the tests (117 s, one after another), lkref's rows, the profile and the peers:
# over issue #5's 5 minutes, which LKREF_GPU_CHECK_PEERS=0 (about 110 s less) meets.  The tests
# now run in 4 processes side by side, which should bring the whole near 5 minutes with the
# peers (not yet timed).  Its steps' time limits end it by 8.5
# minutes in the worst case.  The extras at the end run only where they fit in
# LKREF_GPU_CHECK_BUDGET_S seconds (default 300).
# A copy without .git (the device tool's) names its commit with LKREF_GIT_SHA=<sha>.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# the extras at the end (compute-sanitizer, LK^lambda's peers, the profile, torch.compile) run
# only where they fit in this many seconds with the rest: by default the issue's 5 minutes
budget=${LKREF_GPU_CHECK_BUDGET_S:-300}
# compiled kernels (gpu_warm.py fills CuPy's cache for the tests and the benchmark) in /tmp,
# which is writable wherever this runs, unlike a home folder may be
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/lkref-cupy-cache} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lkref-triton-cache}
out=${OUT:-bench/results}
mkdir -p "$out"
# the peers the image lacks, as wheels carried from bench/peer_wheels.sh (run(carry=[".whl"]))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lkref-peers .whl/*.whl \
    && export PYTHONPATH=/tmp/lkref-peers${PYTHONPATH:+:$PYTHONPATH}
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9._-')
card=${card:-unknown-gpu}
{
  echo "== $(date -u +%FT%TZ) git ${LKREF_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} on ${card}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else
    echo "nvidia-smi absent"
  fi
  python3 - <<'PY'
from importlib import metadata
import numpy
try:
    import cupy
    print("cupy", cupy.__version__, "numpy", numpy.__version__)
    try:    # what CuPy's kernel cache is keyed by, beside the source and options (bench/kernel_cache.py)
        print("nvrtc", ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
              "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
    except Exception as exc:
        print("nvrtc/cuda versions not read:", type(exc).__name__, exc)
    try:    # ... and by the include folders CuPy names (full paths): nvrtc_check.py --cache must match them
        from cupy import _environment
        print("cupy at", cupy.__file__.rsplit("/", 2)[0], "CUDA path", _environment.get_cuda_path())
    except Exception as exc:
        print("cupy's paths not read:", type(exc).__name__, exc)
except ImportError:
    print("cupy absent", "numpy", numpy.__version__)
for name in ("torch", "triton", "liger-kernel", "speculators", "nvidia-cuda-nvrtc"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "absent")
PY
  timeout 30 python3 -m lkref info | sed -n '/^  cupy .*: usable/,/^$/p'    # how this GPU runs the kernels
  # the kernels an earlier run compiled, carried as .cupy-cache/ (bench/kernel_cache.py): NVRTC
  # then builds only the sources that changed since, where the image is the same
  # (the last run's, and one built before the run with bench/nvrtc_check.py --cache, if any;
  # LKREF_CUPY_CACHE_IN names another folder)
  for cache_in in "${LKREF_CUPY_CACHE_IN:-.cupy-cache}"/*.tar.*; do
    [ -f "$cache_in" ] && timeout 60 python3 bench/kernel_cache.py unpack "$cache_in" "$CUPY_CACHE_DIR"
  done
} 2>&1 | tee "$out/gpu-$card-env.txt"
echo "== the kernel variants, compiled side by side into CuPy's cache (bench/gpu_warm.py)"
timeout 120 python3 bench/gpu_warm.py 2>&1 | tee "$out/gpu-$card-warm.txt"
# compute-sanitizer's four tools side by side over every kind of launch (bench/gpu_sanitize.py),
# into the tests' file: races, stray accesses, divergent barriers and reads of unwritten memory
# in the code the GPU runs, which the CPU stand-in can only mimic (60 s at most)
san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
sanitize() {
  echo "== compute-sanitizer: memcheck, racecheck, synccheck, initcheck (bench/gpu_sanitize.py)"
  for tool in memcheck racecheck synccheck initcheck; do
    { timeout 60 "$san" --tool "$tool" --print-limit 10 --show-backtrace device python3 bench/gpu_sanitize.py
      rc=$?; [ $rc = 124 ] && echo "(stopped after 60 s)"; echo "exit status $rc"; } > "/tmp/lkref-sanitize-$tool.txt" 2>&1 &
  done
  wait
  pkill -KILL -f bench/gpu_sanitize.py 2>/dev/null    # a program that outlived its sanitizer's timeout
  for tool in memcheck racecheck synccheck initcheck; do
    echo "-- compute-sanitizer --tool $tool"
    head -n 100 "/tmp/lkref-sanitize-$tool.txt"
  done 2>&1 | tee -a "$out/gpu-$card-tests.txt"
}
echo "== GPU tests"
# no -x: one run should show every failure; the benchmark refuses to time a path that is wrong.
# A test that hangs (a kernel that never returns) is stopped after LKREF_GPU_TEST_TIMEOUT_S
# seconds (pytest-timeout, which the device image has; the slowest test takes seconds), and
# then, after compute-sanitizer, the whole check ends: the benchmark would hang the same way,
# and the device minutes left are worth more to a rerun after the fix
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null \
  && per_test=(--timeout "${LKREF_GPU_TEST_TIMEOUT_S:-60}" --timeout-method thread)
# in LKREF_GPU_TEST_WORKERS processes side by side (pytest-xdist, which the device image has; 0:
# one process): run 2's tests took 117 s one after another, most of it NVRTC building CuPy's
# own kernels for the readable path, test by test.  A hung test's worker then dies without its
# stack ("crashed while running" names the test); LKREF_GPU_TEST_WORKERS=0 shows the stack.
workers=${LKREF_GPU_TEST_WORKERS:-4}
side_by_side=()
[ "$workers" != 0 ] && python3 -c "import xdist" 2>/dev/null && side_by_side=(-n "$workers")
timeout 180 python3 -m pytest -q -rfE --durations=15 -m gpu tests -p no:cacheprovider "${per_test[@]}" \
    "${side_by_side[@]}" 2>&1 | tee "$out/gpu-$card-tests.txt"
if grep -q -e '+++ Timeout +++' -e 'crashed while running' "$out/gpu-$card-tests.txt"; then
  echo "== a GPU test hung (above: its stack, or the test its worker died in): no benchmark; compute-sanitizer, to show where" \
    | tee -a "$out/gpu-$card-tests.txt"
  [ -n "$san" ] && sanitize
  echo "== done in $SECONDS s"
  exit 1
fi
# lkref's own rows first (every loss, both goal sizes, the tuning shapes), then the peers beside
# LK^alpha and TV: Triton autotunes the speculators kernels at their first call (some 20 tiles
# per kernel), which must not cost lkref's rows.  Rows reach the CSV block by block.
echo "== quick benchmark: lkref"
timeout 150 python3 -m lkref bench --backend cupy --repeat 20 --no-peers \
  --loss lk_alpha --loss lk_lambda --loss tv --loss kl \
  --csv "$out/gpu-$card-bench.csv" 2>&1 | tee "$out/gpu-$card-bench.txt"
# what the default LK^alpha kernel waits for (Nsight Compute; it replays the kernel per section
# and locks the clocks to base), at V = 32 000, and at V = 128 256 if the run has time for it:
# before the peers, since it says why lkref's own rows are as fast as they are
if command -v ncu >/dev/null; then
  echo "== profile (ncu, lk_rows, LK^alpha N = 4096)"
  for V in 32000 128256; do
    [ "$V" = 32000 ] || [ $((SECONDS + 250)) -le "$budget" ] || continue
    timeout 45 ncu --kernel-name lk_rows --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section InstructionStats --section SourceCounters \
      python3 bench/gpu_profile.py "$V" 2>&1
  done | tee "$out/gpu-$card-profile.txt"
fi
# the peers (about 110 s with their Triton autotuning); LKREF_GPU_CHECK_PEERS=0 leaves them out,
# for a run whose minutes are better spent on lkref's own rows and the extras
if [ "${LKREF_GPU_CHECK_PEERS:-1}" != 0 ]; then
  echo "== quick benchmark: lkref and the peers, same run"
  timeout 120 python3 -m lkref bench --backend cupy --repeat 20 --loss lk_alpha --loss tv --skip-peer torch-compile \
    --csv "$out/gpu-$card-bench.csv" 2>&1 | tee -a "$out/gpu-$card-bench.txt"
fi
# the first extra: compute-sanitizer
if [ -n "$san" ] && [ $((SECONDS + 70)) -le "$budget" ]; then
  sanitize
fi
# LK^alpha with float16 logits, target and gradient, as a half-precision training step has them:
# 2 bytes an entry (float16: CuPy has it without ml_dtypes, and it runs as bfloat16 does)
if [ $((SECONDS + 90)) -le "$budget" ]; then
  echo "== quick benchmark: LK^alpha in float16"
  timeout 90 python3 -m lkref bench --backend cupy --repeat 20 --no-peers --loss lk_alpha --dtype float16 \
    --csv "$out/gpu-$card-bench.csv" 2>&1 | tee -a "$out/gpu-$card-bench.txt"
fi
# LK^lambda beside speculators' lk_hybrid (lambda per token), SpecForge's and PyTorch eager, if
# time is left: a run of its own, after LK^alpha's peers, since it autotunes speculators' KL
# kernel too
if [ $((SECONDS + 60)) -le "$budget" ]; then
  echo "== quick benchmark: LK^lambda and its peers"
  timeout 60 python3 -m lkref bench --backend cupy --repeat 20 --loss lk_lambda --skip-peer torch-compile \
    --csv "$out/gpu-$card-bench.csv" 2>&1 | tee -a "$out/gpu-$card-bench.txt"
fi
# verify's time against K on the device (issue #5: it should not grow with K beyond its gathers)
if [ $((SECONDS + 30)) -le "$budget" ]; then
  echo "== verify against K (bench --sampler)"
  timeout 30 python3 -m lkref bench --sampler --backend cupy --repeat 10 2>&1 | tee -a "$out/gpu-$card-bench.txt"
fi
echo "== the goals (bench/goals.py)"
python3 bench/goals.py "$out/gpu-$card-bench.csv" 2>&1 | tee "$out/gpu-$card-goals.md"
# torch.compile beside LK^alpha (the issue's peers include it; Inductor compiles for each
# shape, so it comes last), and the goals again with its rows
if [ $((SECONDS + 90)) -le "$budget" ]; then
  echo "== quick benchmark: LK^alpha beside torch.compile"
  timeout 90 python3 -m lkref bench --backend cupy --repeat 20 --loss lk_alpha --peer torch-compile \
    --csv "$out/gpu-$card-bench.csv" 2>&1 | tee -a "$out/gpu-$card-bench.txt"
  python3 bench/goals.py "$out/gpu-$card-bench.csv" > "$out/gpu-$card-goals.md" 2>&1
fi
# CuPy's kernel cache as this run used it, for the next run to carry as .cupy-cache/ (a file of
# its own among the 8 that come back; bench/README.md)
echo "== the kernel cache, packed for the next run"
timeout 60 python3 bench/kernel_cache.py pack "$CUPY_CACHE_DIR" "$out/gpu-$card-cupy-cache.tar.xz" 2>&1 \
  | tee -a "$out/gpu-$card-env.txt"
echo "== done in $SECONDS s"
