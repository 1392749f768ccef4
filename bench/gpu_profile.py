"""The program Nsight Compute profiles in bench/gpu_check.sh: the fused LK^alpha at the goal
sizes of issue #5, each called twice (the first call compiles and warms up).

    ncu --kernel-name lk_rows --launch-skip 1 --launch-count 1 ... python3 bench/gpu_profile.py 32000

profiles the second launch of lk_rows at N = 4096, V = 32 000: how close it comes to the
memory's speed (SpeedOfLight), how many warps stay resident (Occupancy) and what they wait
for (WarpStateStats), which is what to read when the time misses its goal.  Optional
arguments after V: threads and block share, to profile a launch shape of the benchmark; the
switches come from the environment as lkref reads it (LKREF_CUPY_PIPELINE=1 for the pipelined
grid at 512 8192, LKREF_CUPY_L2_AHEAD=1 for the grid that asks L2 for the next row,
LKREF_CUPY_L2_LEAD=0.25 for the default grid whose blocks ask L2 for a row ahead).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lkref  # noqa: E402
from lkref import fused_cupy  # noqa: E402
from lkref.benchmark import make_problem  # noqa: E402


def main(argv):
    import cupy as cp
    V = int(argv[0]) if argv else 32_000
    threads = int(argv[1]) if len(argv) > 1 else fused_cupy.THREADS
    share = int(argv[2]) if len(argv) > 2 else fused_cupy.BLOCK_SHARE
    z, p = make_problem(cp, 4096, V)
    out = cp.empty_like(z)
    with fused_cupy.configured(threads=threads, block_share=share):
        for _ in range(2):
            lkref.lk_alpha(z, p, impl="fused", out=out)
        cp.cuda.Device().synchronize()
        print(f"profiled: lk_alpha N=4096 V={V} threads={threads} block_share={share} "
              f"(items, cluster) = {fused_cupy.plan(V)} pipeline={fused_cupy.PIPELINE} l2_ahead={fused_cupy.L2_AHEAD} "
              f"l2_lead={fused_cupy.L2_LEAD:g}")


if __name__ == "__main__":
    main(sys.argv[1:])
