"""Compile the CuPy kernel variants that bench/gpu_check.sh will use, in parallel processes.

NVRTC takes 1-15 s per variant (one per row length class, dtype and launch shape), and the
GPU tests and the benchmark would compile some twenty of them one after another: most of a
minute of a 15-minute device session.  Compiled here side by side, they land in CuPy's
kernel cache (CUPY_CACHE_DIR, which gpu_check.sh sets; keyed by source, options and GPU),
where the tests and the benchmark find them.  A variant missing from this list is simply
compiled when first used; a failure here is reported and left to the tests to show.

    python3 bench/gpu_warm.py [workers]
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lkref import fused_cupy  # noqa: E402
from lkref.benchmark import DEFAULT_SIZES, STREAM_THREADS, TUNING_SHAPES  # noqa: E402

#: Row lengths of tests/test_gpu.py (float32 logits unless said) and of the benchmark.
TEST_VOCABS = (3, 7, 50, 300, 500, 700, 1000, 1031, 2000, 3000, 5000, 12_000, 32_000, 50_257, 128_256,
               151_936, 300_000)
HALF_VOCABS = {"float16": (4099,), "bfloat16": (4099,)}
#: ... with a target of the logits' 2-byte type too (kept in shared memory at its first read),
#: and (PAIR_VOCABS) copied there in pairs as the launch starts (fused_cupy.PAIR_PREFETCH).
HALF_TARGET_VOCABS = {"float16": (32_000, 128_256), "bfloat16": (4099,)}
PAIR_VOCABS = {"float16": (32_000, 128_256)}
#: Row lengths that tests/test_gpu.py also runs as on a GPU without clusters (blocks meet in global memory).
MEETING_VOCABS = (32_000, 50_257, 128_256)
#: ... and as on a GPU whose blocks may opt in to 99 KiB of shared memory (part of the target
#: cached), at 32 768 floats a block (FIRST_SHAPE), where that happens.
PARTIAL_CACHE_VOCABS = (32_000, 128_256)
SMALL_GPU_OPTIN = 99 * 1024
FIRST_SHAPE = (512, 32_768, True)


def variants(clusters=True):
    """The distinct (threads, block_share, cache_target, dtype, target dtype, V, dsmem, optin,
    pairs, mode, phase, stream, exp2, vec) to compile: one V per (items, cluster) class, in the launch shapes the
    tests and the benchmark run; dtype: the logits' and the gradient's; clusters: whether the GPU
    has them (else every variant meets in global memory); optin: a smaller GPU's shared memory
    per block to size the target cache for (None: this GPU's); pairs: a 2-byte target copied in
    pairs; mode: the loss's (fused_cupy.SPECIALIZE: each of the four for the tests' variants,
    LK^alpha's for the benchmark's launch shapes) or None (one kernel for all, as the
    benchmark's 'fused generic-mode'); phase: 0 (one-launch calls), 1 or 2 (the two launches
    of the others; SPECIALIZE: all three for the tests' variants), None with mode None; stream:
    every row streamed (the benchmark's 'fused stream'); exp2: each element's exp by exp2f
    (fused_cupy.EXP2), else by expf (the benchmark's 'fused expf'); vec: 4 adjacent columns a
    thread at a time (fused_cupy.VEC, where the row allows: V % 4 == 0 and float32), and for the
    tests' float32 rows also without (draft_to_target, misaligned arrays) and for the benchmark's
    'fused scalar'.  Specs that build the same source are listed once."""
    default = (fused_cupy.THREADS, fused_cupy.BLOCK_SHARE, fused_cupy.CACHE_TARGET)
    f32 = "float32"
    wanted = [(default, f32, f32, V, clusters, None, False) for V in TEST_VOCABS]
    wanted += [(default, dt, f32, V, clusters, None, False) for dt, vocabs in HALF_VOCABS.items() for V in vocabs]
    wanted += [(default, dt, dt, V, clusters, None, False) for dt, vocabs in HALF_TARGET_VOCABS.items() for V in vocabs]
    wanted += [(default, dt, dt, V, clusters, None, True) for dt, vocabs in PAIR_VOCABS.items() for V in vocabs]
    wanted += [(default, f32, f32, V, False, None, False) for V in MEETING_VOCABS]
    wanted += [(FIRST_SHAPE, f32, f32, V, False, SMALL_GPU_OPTIN, False) for V in PARTIAL_CACHE_VOCABS]
    kinds = [(mode, phase) for mode in fused_cupy.MODES.values() for phase in (0, 1, 2)] if fused_cupy.SPECIALIZE \
        else [(None, None)]
    wanted = [w + kind + (False, fused_cupy.EXP2, vec) for w in wanted for kind in kinds for vec in (True, False)]
    goal_vocabs = sorted({V for _, V in DEFAULT_SIZES["cupy"]})
    alpha = fused_cupy.MODES["lk_alpha"] if fused_cupy.SPECIALIZE else None
    one = 0 if fused_cupy.SPECIALIZE else None
    exp2, vec = fused_cupy.EXP2, fused_cupy.VEC
    wanted += [(shape, f32, f32, V, clusters, None, False, alpha, one, False, exp2, vec) for shape in TUNING_SHAPES
               for V in goal_vocabs]
    wanted += [(default, f32, f32, V, clusters, None, False, None, None, False, exp2, vec)
               for V in goal_vocabs]                                                          # generic-mode
    wanted += [(default, f32, f32, V, clusters, None, False, alpha, one, False, not exp2, vec) for V in goal_vocabs]  # expf
    wanted += [(default, f32, f32, V, clusters, None, False, alpha, one, False, exp2, not vec) for V in goal_vocabs]  # scalar
    wanted += [(default, f32, f32, 32_000, clusters, None, False, fused_cupy.MODES[m], 0, False, not exp2, vec)
               for m in ("kl", "lk_alpha")]                                      # tests/test_gpu.py, expf
    wanted += [((threads, default[1], True), f32, f32, V, clusters, None, False, alpha, one, True, exp2, vec)
               for threads in STREAM_THREADS for V in goal_vocabs]
    seen, out = set(), []
    for spec in wanted:
        (threads, share, cache), dt, pdt, V, dsmem, optin, pairs, mode, phase, stream, exp2, vec = spec
        vec = bool(vec) and V % 4 == 0 and dt == pdt == "float32"    # as vec_fits has it for aligned arrays
        src = source(*spec[:-1], vec)
        vec = "#define VEC 1" in src                  # what the source does (kernel_source's own conditions)
        key = (dt, src)
        if key not in seen:
            seen.add(key)
            out.append((threads, share, cache, dt, pdt, V, dsmem, optin, pairs, mode, phase, stream, exp2, vec))
    return out


def source(shape, dt, pdt, V, dsmem, optin, pairs, mode, phase, stream, exp2, vec):
    """The CUDA source lkref builds for one spec (its target cache sized for optin; None: not limited)."""
    threads, share, cache = shape
    with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache, stream=stream, exp2=exp2):
        items, cluster = fused_cupy.plan(V)
        kept = fused_cupy.cached_items(items, optin, 2 if pdt != "float32" else 4)
        c = fused_cupy._ctype(dt)
        return fused_cupy.kernel_source(items, cluster, c, c, dsmem=dsmem, cached=kept, p_t=fused_cupy._ctype(pdt),
                                        pairs=pairs, mode=mode, phase=phase, vec=vec)


def _compile(spec):
    """In a worker process: build one variant the way lkref.fused_cupy does (its cache key and
    source), so that CuPy's kernel cache holds what the tests will ask for."""
    import cupy
    import numpy as np

    threads, share, cache, dt, pdt, V, dsmem, optin, pairs, mode, phase, stream, exp2, vec = spec
    dtype, p_dtype = (np.dtype(d) if d != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16) for d in (dt, pdt))
    if optin is not None:                         # this worker process sizes its target caches for it
        fused_cupy._smem_optin = lambda cp: optin
    t0 = time.perf_counter()
    with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache, stream=stream, exp2=exp2):
        items, cluster = fused_cupy.plan(V)
        fused_cupy._kernel(dtype, dtype, items, cluster, dsmem, p_dtype, pairs, mode, phase, vec)
    return time.perf_counter() - t0


def main(argv):
    import lkref
    if not lkref.cupy_available():
        print("CuPy with a CUDA device is not available: nothing to compile")
        return
    workers = int(argv[0]) if argv else min(16, os.cpu_count() or 1)
    import cupy
    specs = variants(clusters=fused_cupy._has_clusters(cupy))
    t0 = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_compile, s): s for s in specs}
        for f in as_completed(futures):
            threads, share, cache, dt, pdt, V, dsmem, optin, pairs, mode, phase, stream, exp2, vec = futures[f]
            with fused_cupy.configured(threads=threads, block_share=share, stream=stream):
                what = f"{dt} ({pdt} target{', in pairs' if pairs else ''}) V={V} (items, cluster) = {fused_cupy.plan(V)} at {threads}t/{share // 1024}k" \
                       + ("" if cache else " nocache") + ("" if dsmem else " global-meeting") \
                       + ("" if optin is None else f" target cache for {optin // 1024} KiB") \
                       + (" all modes" if mode is None else f" mode {mode}") + ("" if phase is None else f" phase {phase}") \
                       + ("" if exp2 else " expf") + (" vec" if vec else "")
            try:
                print(f"  {f.result():5.1f} s  {what}")
            except Exception as exc:              # the tests will show it again, with context
                failed += 1
                print(f"  failed  {what}: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"{len(specs)} variants, {failed} failed, in {time.perf_counter() - t0:.1f} s with {workers} processes")


if __name__ == "__main__":
    main(sys.argv[1:])
