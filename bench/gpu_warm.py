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
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lkref import fused_cupy  # noqa: E402
from lkref.benchmark import DEFAULT_SIZES, PIPE_SHAPES, STREAM_THREADS, TUNING_SHAPES, _pipelines  # noqa: E402

#: Row lengths of tests/test_gpu.py (float32 logits unless said) and of the benchmark.
TEST_VOCABS = (3, 7, 50, 300, 500, 700, 1000, 1031, 2000, 3000, 5000, 12_000, 32_000, 50_257, 128_256,
               151_936, 300_000)
HALF_VOCABS = {"float16": (4099, 32_000), "bfloat16": (4099,)}
#: ... with a target of the logits' 2-byte type too (4 entries a copy into shared memory where
#: V % 4 == 0, else kept there at its first read; both for each, as every variant is built with
#: and without fused_cupy.VEC), and (PAIR_VOCABS) copied there in pairs as the launch starts
#: (fused_cupy.PAIR_PREFETCH, one column at a time).
HALF_TARGET_VOCABS = {"float16": (32_000, 128_256), "bfloat16": (4099, 32_000)}
PAIR_VOCABS = {"float16": (32_000, 128_256)}
#: Row lengths that tests/test_gpu.py also runs as on a GPU without clusters (blocks meet in global memory).
MEETING_VOCABS = (32_000, 50_257, 128_256)
#: ... and as on a GPU whose blocks may opt in to 99 KiB of shared memory (part of the target
#: cached), at 32 768 floats a block (FIRST_SHAPE), where that happens.
PARTIAL_CACHE_VOCABS = (32_000, 128_256)
SMALL_GPU_OPTIN = 99 * 1024
FIRST_SHAPE = (512, 32_768, True)


class Spec(NamedTuple):
    """One kernel variant: the launch shape (threads, share: floats of a row a block, cache: the
    target cache); dt: the logits' and the gradient's dtype, pdt: the target's; V; dsmem: a row's
    blocks meet in a cluster (else in global memory); optin: a smaller GPU's shared memory per
    block to size the target cache for (None: this GPU's); pairs: a 2-byte target copied in
    pairs; mode: the loss's (fused_cupy.MODES) or None (one kernel for all); phase: 0 (one
    launch), 1 or 2 (the two launches of the others), None with mode None; stream: every row
    streamed; exp2: each element's exp by exp2f (fused_cupy.EXP2), else expf; vec: 4 adjacent
    columns a thread at a time (fused_cupy.VEC); fast_log: log p by __logf below 0.5
    (fused_cupy.FAST_LOG), else logf; pipe: fused_cupy.PIPELINE's stages (0: off); ahead:
    fused_cupy.L2_AHEAD; lead: fused_cupy.L2_LEAD (a block a row, each asking L2 for a row ahead)."""

    threads: int
    share: int
    cache: bool
    dt: str
    pdt: str
    V: int
    dsmem: bool
    optin: Optional[int]
    pairs: bool
    mode: Optional[int]
    phase: Optional[int]
    stream: bool
    exp2: bool
    vec: bool
    fast_log: bool
    pipe: int = 0
    ahead: bool = False
    lead: bool = False


def variants(clusters=True):
    """The distinct Specs to compile: one V per (items, cluster) class, in the launch shapes the
    tests and the benchmark run; clusters: whether the GPU has them (else every variant meets in
    global memory).  The tests' rows take each loss's kernels (fused_cupy.SPECIALIZE: each of the
    four modes, each in phases 0, 1 and 2), float32 ones also one column at a time
    (draft_to_target, misaligned arrays); the benchmark's take LK^alpha's one-launch kernel in its
    launch shapes, streamed, as one kernel for all losses ('fused generic-mode'), with expf
    ('fused expf') and one column at a time ('fused scalar'), and KL's and LK^lambda's with logf
    ('fused logf').  Specs that build the same source are listed once."""
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
    exp2, vec, fast = fused_cupy.EXP2, fused_cupy.VEC, fused_cupy.FAST_LOG
    wanted = [w + kind + (False, exp2, v, fast) for w in wanted for kind in kinds for v in (True, False)]
    goal_vocabs = sorted({V for _, V in DEFAULT_SIZES["cupy"]})
    mode = fused_cupy.MODES if fused_cupy.SPECIALIZE else dict.fromkeys(fused_cupy.MODES)
    alpha = mode["lk_alpha"]
    one = 0 if fused_cupy.SPECIALIZE else None
    wanted += [(shape, f32, f32, V, clusters, None, False, alpha, one, False, exp2, vec, fast) for shape in TUNING_SHAPES
               for V in goal_vocabs]
    wanted += [(default, f32, f32, V, clusters, None, False, None, None, False, exp2, vec, fast)
               for V in goal_vocabs]                                                          # generic-mode
    wanted += [(default, f32, f32, V, clusters, None, False, alpha, one, False, not exp2, vec, fast)
               for V in goal_vocabs]                                                          # expf
    wanted += [(default, f32, f32, V, clusters, None, False, alpha, one, False, exp2, not vec, fast)
               for V in goal_vocabs]                                                          # scalar
    wanted += [(default, f32, f32, V, clusters, None, False, mode[m], one, False, exp2, vec, not fast)
               for m in ("kl", "lk_lambda") for V in goal_vocabs]                            # logf
    wanted += [(default, f32, f32, 32_000, clusters, None, False, mode[m], one, False, not exp2, vec, fast)
               for m in ("kl", "lk_alpha")]                                      # tests/test_gpu.py, expf
    wanted += [(default, f32, f32, V, clusters, None, False, mode[m], phase if fused_cupy.SPECIALIZE else None, False,
                exp2, vec, not fast) for m, phases in (("kl", (0,)), ("lk_lambda", (1, 2))) for phase in phases
               for V in (3, 32_000)]                                            # tests/test_gpu.py, logf (batch lambda)
    wanted += [((threads, default[1], True), f32, f32, V, clusters, None, False, alpha, one, True, exp2, vec, fast)
               for threads in STREAM_THREADS for V in goal_vocabs]
    if fused_cupy.SPECIALIZE and clusters:     # 'fused pipelined' (LK^alpha, LK^lambda with lam=), and its GPU test
        first = PIPE_SHAPES[0] + (True,)               # the GPU test's shape
        wanted += [(shape + (True,), f32, f32, V, clusters, None, False, mode[m], 0, False, exp2, vec, fast,
                    fused_cupy.PIPE_STAGES) for shape in PIPE_SHAPES for m in ("lk_alpha", "lk_lambda")
                   for V in goal_vocabs if _pipelines(V, *shape)]                 # (the rows that would stream: none)
        wanted += [(first, f32, f32, V, clusters, None, False, mode[m], 0, False, exp2, vec, fast,
                    fused_cupy.PIPE_STAGES) for m in fused_cupy.MODES for V in (4096, 32_000)]
        wanted += [(default, f32, f32, V, clusters, None, False, mode[m], 0, False, exp2, vec, fast, 0, True)
                   for m in fused_cupy.MODES for V in goal_vocabs + [4096]]            # 'fused L2 ahead', its test
        wanted += [(default, f32, f32, V, clusters, None, False, mode[m], phase, False, exp2, vec, fast, 0, False, True)
                   for m in fused_cupy.MODES for phase in ((0, 1, 2) if m == "lk_lambda" else (0,))
                   for V in goal_vocabs + [4096]]                                 # 'fused L2 lead', its test
    seen, out = set(), []
    for shape, dt, pdt, V, *rest in wanted:
        spec = Spec(*shape, dt, pdt, V, *rest)
        fits = spec.vec and V % 4 == 0                    # as vec_fits has it for aligned arrays
        src = source(spec._replace(vec=fits))
        spec = spec._replace(vec=bool(fused_cupy.defined(src, "VEC")),   # what the source does (kernel_source's
                             pipe=fused_cupy.defined(src, "PIPE"),     # own conditions)
                             ahead=bool(fused_cupy.defined(src, "AHEAD")),
                             lead=bool(fused_cupy.defined(src, "LEAD")))
        if (dt, src) not in seen:
            seen.add((dt, src))
            out.append(spec)
    return out


def source(spec):
    """The CUDA source lkref builds for one Spec (its target cache sized for spec.optin; None: not limited)."""
    with fused_cupy.configured(threads=spec.threads, block_share=spec.share, cache_target=spec.cache,
                               stream=spec.stream, exp2=spec.exp2, fast_log=spec.fast_log):
        items, cluster = fused_cupy.plan(spec.V)
        kept = fused_cupy.cached_items(items, spec.optin, 2 if spec.pdt != "float32" else 4, spec.phase)
        c = fused_cupy._ctype(spec.dt)
        return fused_cupy.kernel_source(items, cluster, c, c, dsmem=spec.dsmem, cached=items if spec.pipe else kept,
                                        p_t=fused_cupy._ctype(spec.pdt), pairs=spec.pairs, mode=spec.mode,
                                        phase=spec.phase, vec=spec.vec, pipe=spec.pipe, ahead=spec.ahead,
                                        lead=spec.lead)


def _compile(spec):
    """In a worker process: build one variant the way lkref.fused_cupy does (its cache key and
    source), so that CuPy's kernel cache holds what the tests will ask for."""
    import cupy  # noqa: F401
    import numpy as np

    dtype, p_dtype = (np.dtype(d) if d != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
                      for d in (spec.dt, spec.pdt))
    optin = fused_cupy._smem_optin
    if spec.optin is not None:                    # this variant's target cache sized for it (this one only: a
        fused_cupy._smem_optin = lambda cp: spec.optin   # worker process goes on to other variants)
    t0 = time.perf_counter()
    try:
        with fused_cupy.configured(threads=spec.threads, block_share=spec.share, cache_target=spec.cache,
                                   stream=spec.stream, exp2=spec.exp2, fast_log=spec.fast_log):
            items, cluster = fused_cupy.plan(spec.V)
            fused_cupy._kernel(dtype, dtype, items, cluster, spec.dsmem, p_dtype, spec.pairs, spec.mode, spec.phase,
                               spec.vec, spec.pipe, spec.ahead, spec.lead)
    finally:
        fused_cupy._smem_optin = optin
    return time.perf_counter() - t0


def describe(spec):
    """One line for a Spec, as the warm-up and bench/nvrtc_check.py list them."""
    with fused_cupy.configured(threads=spec.threads, block_share=spec.share, stream=spec.stream):
        plan = fused_cupy.plan(spec.V)
    return (f"{spec.dt} ({spec.pdt} target{', in pairs' if spec.pairs else ''}) V={spec.V} (items, cluster) = {plan} "
            f"at {spec.threads}t/{spec.share // 1024}k" + ("" if spec.cache else " nocache")
            + ("" if spec.dsmem else " global-meeting")
            + ("" if spec.optin is None else f" target cache for {spec.optin // 1024} KiB")
            + (" all modes" if spec.mode is None else f" mode {spec.mode}")
            + ("" if spec.phase is None else f" phase {spec.phase}") + (" stream" if spec.stream else "")
            + ("" if spec.exp2 else " expf") + (" vec" if spec.vec else "") + ("" if spec.fast_log else " logf")
            + (f" pipelined ({spec.pipe} stages)" if spec.pipe else "") + (" L2-ahead" if spec.ahead else "")
            + (" L2-lead" if spec.lead else ""))


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
            what = describe(futures[f])
            try:
                print(f"  {f.result():5.1f} s  {what}")
            except Exception as exc:              # the tests will show it again, with context
                failed += 1
                print(f"  failed  {what}: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"{len(specs)} variants, {failed} failed, in {time.perf_counter() - t0:.1f} s with {workers} processes")


if __name__ == "__main__":
    main(sys.argv[1:])
