"""The program bench/gpu_check.sh runs under NVIDIA's compute-sanitizer: every kind of launch of
the fused kernels once, on two or three rows, each checked against the readable path.

    compute-sanitizer --tool racecheck python3 bench/gpu_sanitize.py

The SIMT stand-in (tests/simt_cpu.h) finds races, stray writes and divergent barriers in the
kernel source on the CPU; compute-sanitizer finds them in the code the GPU runs: memcheck (out
of bounds, misaligned), racecheck (shared memory hazards), synccheck (barriers) and initcheck
(reads of device memory nothing wrote).  CuPy's memory pool is switched off, so that every array
is its own allocation and a read past its end is caught, not hidden inside a pooled block.
The kernels come from CuPy's cache, filled by bench/gpu_warm.py: one variant per row length
class of tests/test_gpu.py.  Exit status 1 if a result differs from the reference.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lkref  # noqa: E402
from lkref import fused_cupy  # noqa: E402
from lkref.backend import to_numpy  # noqa: E402
from lkref.benchmark import make_problem, rel_err  # noqa: E402

#: (label, loss, N, V, options): one block per row, the 48 KiB cache boundary, clusters of 2,
#: 4 and 8, streaming; the two-launch calls (batch lambda, draft_to_target, gradient into the
#: logits); weights and temperature; float16 logits, and a float16 target too (read as it is:
#: 4 entries an 8-byte access, or one column at a time kept in shared memory at its first read,
#: or copied there in pairs); the persistent grids (PIPELINE, L2_AHEAD, off by default; a grid
#: of 2 blocks or clusters, so that each goes through 2-3 rows and its stages), and L2_LEAD (the
#: rows ahead as a grid of 2 clusters would have them: 1); rows that take LK^alpha's
#: log-space fallback; and blocks that meet in global memory, as on a GPU without clusters.
CASES = (
    ("one block", "lk_alpha", 3, 1000, {}),
    ("48 KiB target cache", "tv", 2, 12_000, {}),
    ("cluster of 2, batch lambda", "lk_lambda", 2, 32_000, {}),
    ("cluster of 4", "lk_alpha", 2, 50_257, {}),
    ("cluster of 8", "kl", 2, 128_256, {}),
    ("streaming", "lk_lambda", 2, 300_000, {"lam": 0.3}),
    ("draft_to_target", "lk_lambda", 3, 3000, {"draft_to_target": 3500}),
    ("weights, temperature", "lk_alpha", 3, 5000, {"mask": "weights", "temperature": 0.7}),
    ("gradient into the logits", "lk_alpha", 3, 2000, {"out": "logits"}),
    ("float16 logits", "tv", 3, 4099, {"dtype": "float16"}),
    ("float16 logits and target", "lk_alpha", 2, 128_256, {"dtype": "float16", "target_dtype": "float16"}),
    ("float16 one column at a time", "lk_alpha", 2, 32_000, {"dtype": "float16", "target_dtype": "float16",
                                                             "vec": False}),
    ("float16 target in pairs", "tv", 2, 32_000, {"dtype": "float16", "target_dtype": "float16", "pairs": True,
                                                  "vec": False}),
    ("pipelined, a block a row", "lk_lambda", 5, 4096, {"pipeline": True, "lam": 0.3}),
    ("pipelined, clusters of 4", "lk_alpha", 5, 32_000, {"pipeline": True}),
    ("L2 ahead, clusters of 2", "tv", 5, 32_000, {"l2_ahead": True}),
    ("L2 lead, clusters of 2, batch lambda", "lk_lambda", 5, 32_000, {"l2_lead": 0.5}),
    ("log-space fallback", "lk_alpha", 3, 300, {"disjoint": True}),
    ("no clusters: 2 blocks meet", "lk_lambda", 3, 32_000, {"clusters": False}),
    ("no clusters: 4 blocks meet", "lk_alpha", 2, 50_257, {"clusters": False}),
)
RTOL = 2e-4                                          # tests/test_gpu.py's


def problem(cp, N, V, options, seed):
    """Host arrays (logits, target) and the keyword arguments of one case, on the device."""
    z, p = make_problem(np, N, V, seed=seed)
    kw = {k: v for k, v in options.items() if k in ("lam", "temperature")}
    if options.get("disjoint"):                      # row 0: alpha = e^-200, below float32's range
        z[0] = 0.0
        z[0, 0] = 200.0
        p[0] = 1 / (V - 1)
        p[0, 0] = 0.0
    if "draft_to_target" in options:
        Vt = options["draft_to_target"]
        _, p = make_problem(np, N, Vt, seed=seed + 1)
        kw["draft_to_target"] = cp.asarray(np.random.default_rng(seed).permutation(Vt)[:V].astype(np.int64))
    if options.get("mask") == "weights":
        kw["mask"] = cp.asarray(np.linspace(0.0, 2.0, N, dtype=np.float32))
    z = z.astype(options.get("dtype", "float32"))
    p = p.astype(options.get("target_dtype", "float32"))
    return z, p, kw


def check(cp, label, name, N, V, options, seed):
    """Run one case on the device (the kernels) and on the host (the readable path); the
    largest gradient error relative to the largest gradient entry, or raise if it is too big."""
    z, p, kw = problem(cp, N, V, options, seed)
    host_kw = {k: to_numpy(v) if hasattr(v, "shape") else v for k, v in kw.items()}
    ref = lkref.LOSSES[name](z.astype(np.float32), p, impl="reference", **host_kw)    # before out= overwrites z
    zd = cp.asarray(z)
    # clusters=False: as on a GPU before Hopper; pairs: a 2-byte target copied in pairs; vec=False:
    # one column at a time; pipeline: the persistent grid, at 512 x 8 192 (the benchmark's)
    pipe = options.get("pipeline")
    grid = fused_cupy._resident_clusters
    try:
        if pipe or options.get("l2_ahead") or options.get("l2_lead"):   # 2 blocks or clusters: 2-3 rows each
            fused_cupy._resident_clusters = lambda cp, smem, cluster, N, regs=None: min(N, 2)
        with fused_cupy.configured(clusters=options.get("clusters"), pair_prefetch=options.get("pairs"),
                                   vec=options.get("vec"), pipeline=pipe, block_share=8192 if pipe else None,
                                   l2_ahead=options.get("l2_ahead"), l2_lead=options.get("l2_lead")):
            fast = lkref.LOSSES[name](zd, cp.asarray(p), impl="fused", **(dict(kw, out=zd) if options.get("out") else kw))
    finally:
        fused_cupy._resident_clusters = grid
    rtol = 5e-3 if z.dtype == np.float16 else RTOL
    err, loss_err = rel_err(fast.grad, ref.grad), rel_err(fast.loss, ref.loss)
    if not (err <= rtol and loss_err <= rtol):
        raise AssertionError(f"{label}: {name} differs from the reference: gradient {err:.2e}, loss {loss_err:.2e}")
    return err


def main(argv):
    if not lkref.cupy_available():
        print("CuPy with a CUDA device is not available: nothing to sanitize")
        return 0
    import cupy as cp
    cp.cuda.set_allocator(None)                      # each array its own allocation (see above)
    failed = 0
    first_meeting = min(k for k, case in enumerate(CASES) if case[4].get("clusters") is False)
    for seed, (label, name, N, V, options) in enumerate(CASES):
        what = f"{label:28s} {name:9s} N={N} V={V:<7d} (items, cluster) = {fused_cupy.plan(V)}"
        if seed == first_meeting:                    # last, so that a tool stuck on them costs nothing else
            print("  (next: blocks that wait for each other in global memory; should a tool not run a row's "
                  "blocks at once, it stops here at its time limit: the tool's way, not a hang on the GPU)",
                  flush=True)
        try:
            err = check(cp, label, name, N, V, options, seed)
            print(f"  ok       {what}  gradient error {err:.1e}", flush=True)   # kept if a timeout kills us
        except Exception as exc:
            failed += 1
            print(f"  FAILED   {what}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print(f"{len(CASES)} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
