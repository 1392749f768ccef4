#!/usr/bin/env bash
# Wheels of the GPU peers that the device image lacks (Liger-Kernel, vLLM speculators, SpecForge), fetched
# here where pip has a network, for the device tool to carry: run(carry=[".whl"], ...).
# .whl/ is git-ignored.  gpu_check.sh installs them there with --no-deps into a temporary
# folder; both need only torch and Triton for what the benchmark uses (speculators' fused
# losses are loaded alone when its package's other needs are missing: bench/peers.py;
# SpecForge's specforge.core.loss and .lk_loss need nothing more).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 speculators==0.9.0 \
  specforge==0.2.0
ls -l .whl
