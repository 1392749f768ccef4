"""CuPy fused kernels for the reduced losses (on by default for CuPy arrays; tested on an H100 at
35dc2c3, changed since: EXP2, VEC (since 2026-12-05 also for 2-byte arrays), FAST_LOG and the
multiply by 1 / T have run on the CPU stand-in only).

Checked without a GPU by tests/test_fused_cupy_host.py: the host code against a NumPy
transcription of the kernel, and this CUDA source itself on the CPU (tests/simt_cpu.h runs
each CUDA thread as a fiber, with barriers, shuffles, shared memory and clusters).

One thread block per row, or 2-8 blocks per row that exchange their partial reductions: on
Hopper and later as a thread-block cluster, through distributed shared memory; on earlier
GPUs through global memory, each block taking its row in the order blocks start (a ticket),
so that it only ever waits for blocks that are running or can start.  The row's blocks
meet twice: once for the max and the sum of exps together (each block's sum taken relative
to its own max, then moved to the row's), once for the statistics; in a cluster the last
barrier is split, so that a block writes its gradient while the others finish reading its
shared memory and waits for them only before it exits.  A row is
read in three phases: (1) max and sum of exp over the logits, (2) alpha, S and the KL sums
over logits and target, (3) the gradient.  For V <= 8 * THREADS * MAX_ITEMS (131 072) the
row stays in registers between the phases (the logits, then q: read once, one exp per
element for TV and LK^alpha, two for the KL sums, which need x = (z - max z) / T as well) and the target entries in shared memory (read once; CACHE_TARGET), so one launch
reads z and p once and writes the gradient once, the least traffic there is.  The target
entries are copied into shared memory asynchronously (cp.async) as the launch starts, so
that they arrive while phase (1) works on the logits instead of after it.  Where every
array's rows start aligned to 4 entries (VEC: V % 4 == 0, no draft_to_target), a thread's
entries come 4 adjacent columns at a time, each 4 read, copied and written with one access
(16 bytes of float32, 8 of float16 or bfloat16); else one column every THREADS.
Each element's exp is one exp2f (EXP2) of (z - m) times log2(e) / T, and the KL sums' log p
one __logf where p < 0.5 (FAST_LOG).  A float16 or
bfloat16 target is read as it is (2 bytes an entry, no float32 copy); with VEC it is copied to
shared memory as a float32 one is, else kept there at its first read, in phase (2): cp.async
copies 4 bytes or more (PAIR_PREFETCH copies it in 4-byte pairs as the launch starts instead,
where its rows are 4-byte aligned).  For larger V
one block per row re-reads the row from memory in each phase (z three times: the max and the
sum of exps in one pass, then the statistics, then the gradient; p twice).
PIPELINE and L2_AHEAD (off) launch a persistent grid instead, whose blocks copy the next rows'
logits and target into shared memory, or ask L2 for their next row, while they work on one;
L2_LEAD (off) keeps a block a row and has each block ask L2 for a later block's share as it starts.
Two-pass losses (LK^lambda with no given lambda,
draft_to_target, a reduce hook) run the kernel once for the row statistics, then again
for the gradient with the statistics as input: z and p are read twice.  The read counts
are checked on the CPU SIMT stand-in (tests/test_fused_cupy_host.py).

With impl="auto", lkref/self_check.py runs each kernel variant once on a probe against the
readable path before a call uses it (check=True here).

A second, one-block kernel (lk_finish) turns the row statistics into the rows' losses and the
sums of their masked mean, and gathers the input flags; the host then reads 8 numbers, its
only wait for the device in a one-pass call.  A one-pass call without a mask asks the device
for nothing else: on a GPU each small CuPy operation costs the host microseconds while the
device idles, and at N = 4096, V = 32 000 the dozens a loss, a mean and the checks take in
CuPy would add about half the kernel's own time (tests/device_ops.py counts them).

The math is that of lkref/fused.py; q = exp((z - max z) / T) * (1 / sum) is formed the same
way (with several blocks per row as exp((z - block max) / T) * exp((block max - max z) / T)),
but the block's summation order differs from CuPy's, so q agrees with the reference to
rounding, not bit for bit (an exact tie q == p may resolve differently).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from . import losses as ref
from . import self_check
from .backend import current_device, namespace, work_dtype
from .fused import MIN_TEMPERATURE, _bounds, check_out
from .validation import (as_array, check_index_map, check_mask, check_real_scalar, check_target_sums,
                         check_vocab_axis, env_flag)

#: Threads per block, and a block's share of a row held on chip (BLOCK_SHARE floats: logits in
#: registers, MAX_ITEMS = BLOCK_SHARE / THREADS per thread; the target in shared memory).  A row
#: longer than BLOCK_SHARE is split over a cluster of 2, 4 or 8 blocks.  A smaller share means
#: fewer registers per thread and more blocks per SM (16 384 at 512 threads: two per SM, at
#: 64 registers), whose phases can overlap.  Tuned on an H100 (bench/results/gpu-NVIDIA-H100-
#: 80GB-HBM3-run2-*): 512 threads and 16 384 floats per block were the fastest of the shapes
#: timed for LK^alpha at N = 4096, at V = 32 000 (1.23 and 1.31 ms in two runs, against 1.72
#: for 32 768) and V = 128 256 (5.0 and 5.2 ms, against 7.2-7.4); `configured` (and
#: LKREF_CUPY_THREADS / LKREF_CUPY_BLOCK_SHARE) try others.
THREADS = 512
BLOCK_SHARE = 16_384
MAX_ITEMS = BLOCK_SHARE // THREADS
#: Keep each block's share of the target row in shared memory (items x THREADS floats, up to
#: 128 KiB) between the statistics and the gradient, so that a one-pass launch reads the
#: target once from memory instead of counting on L2 for the second read; the copy starts
#: with the launch (cp.async) and overlaps the work on the logits.  A GPU whose blocks get less
#: shared memory (99 KiB on sm_86/89/120) keeps as many of each thread's entries as fit (for
#: example 48 of 63 at the default shape) and reads the rest twice.
CACHE_TARGET = True
#: Split a long row over a thread-block cluster where the GPU has them (Hopper and later).
#: False: the row's blocks meet in global memory, as on GPUs without clusters, which lets a
#: Hopper GPU test and time that path (`configured(clusters=False)`, LKREF_CUPY_CLUSTERS=0).
CLUSTERS = True
#: A float16 or bfloat16 target: copy each block's entries into shared memory with cp.async as
#: the launch starts, in 4-byte pairs (where every row starts 4-byte aligned and there is no
#: draft_to_target), as a float32 target's are copied, rather than read them in the statistics'
#: pass.  Off until a GPU has timed both (`configured(pair_prefetch=True)`,
#: LKREF_CUPY_PAIR_PREFETCH=1; the GPU benchmark times it as `fused 2-byte pairs`).  Only where
#: a thread takes one column at a time: with VEC (rows aligned to 4 entries) a 2-byte target is
#: copied as the launch starts anyway, 4 entries a copy.
PAIR_PREFETCH = False
#: Build one kernel per loss and per phase (one launch; or the statistics, then the gradient,
#: of a two-launch call), the mode and the phase compile-time constants, rather than one kernel
#: for all that reads them as arguments.  The row kernel is straight-line code (each thread's
#: items unrolled), and with every mode's and phase's branches in it the first default shape's
#: (512 x 32 768) was 378 KiB of SASS at V = 32 000 (nvcc 13, sm_90), instruction fetch the
#: first suspect: the first GPU run (H100, not profiled) took 2.70 ms for LK^alpha at
#: N = 4096, 21 % of the copy bandwidth; LK^alpha's one-launch kernel alone, about 114 KiB,
#: took 1.72 ms (66 KiB at the default 512 x 16 384: bench/results/kernel-resources-*).
#: (`configured(specialize=False)`, LKREF_CUPY_SPECIALIZE=0: the generic kernel, which the
#: benchmark times beside it as `fused generic-mode`.)
SPECIALIZE = True
#: Stream every row, whatever its length (one block per row, which reads the logits three times
#: and the target twice, mostly from L2), with small looping code instead of the unrolled
#: registers; a tuning option (`configured(stream=True)`, LKREF_CUPY_STREAM=1), timed by the
#: GPU benchmark.  By default only rows longer than 8 x BLOCK_SHARE are streamed.
STREAM = False
#: Take each element's exp as exp2f(u), u = (z - m) * (log2 e / T): a multiply and one
#: instruction of the special-function unit (ex2.approx; CuPy builds with -ftz=true), where
#: expf of (z - m) / T took ten and the IEEE division by T another ten, with a branch to its
#: slow path around each element.  LK^alpha's one-launch kernel at the default shape, SASS
#: instructions per logit a thread holds (nvcc 13 -ftz=true, sm_90; every path in the kernel,
#: bench/kernel_resources.py): 130.2 with expf and the division, 118.5 with expf and the
#: multiply by 1 / T (exp2=False), 105.0 with exp2f.  Both functions are within the CUDA
#: guide's 2 ulp of the exact exp (tests/simt_cpu.h puts that error on every exp); u's own
#: rounding adds up to |x| 2^-23 relative, 1e-6 where q is e^-9 of the row's largest.
#: (`configured(exp2=False)`, LKREF_CUPY_EXP2=0: expf, as the benchmark's `fused expf` row
#: times it; either way with the multiply by 1 / T.)
EXP2 = True
#: Take log p for the KL sums (KL and LK^lambda) by __logf (the SFU's lg2.approx and a multiply;
#: 3 ulp) where p < 0.5, and by logf (some 28 instructions, 1 ulp) from 0.5 up, where __logf is
#: 2^-21.41 off in absolute terms: near p = 1 that is 1e-5 of a KL of 0.02 whose other terms
#: float32 holds exactly (tests/simt_cpu.h models both).  A normalised row has at most two
#: entries from 0.5 up, and ptxas branches past logf, so nearly every warp skips it: LK^lambda's
#: path about 94 SASS instructions an item, 114.5 with logf for every entry (sm_90; LK^alpha 67).
#: The price: a KL of 0.018 on peaked rows of 32 000, 4.9e-6 off at the GPU's documented worst
#: math, 1.6e-6 with logf throughout (the stand-in).  (`configured(fast_log=False)`,
#: LKREF_CUPY_FAST_LOG=0: logf for every entry, as the benchmark's `fused logf` rows time it.)
FAST_LOG = True
#: Where every row of every array starts aligned to 4 entries (V % 4 == 0 and aligned arrays, as
#: CuPy allocates them) and there is no draft_to_target: give each thread its items 4 adjacent
#: columns at a time, read and written 16 bytes at once for float32 (LDG.128, STG.128, a 16-byte
#: cp.async for the target) and 8 bytes for float16 and bfloat16, rather than one column every
#: THREADS.  A 2-byte target is then copied to shared memory as the launch starts, 4 entries a
#: cp.async, as a float32 one is (not read at first use, nor in pairs).  Fewer load and store
#: instructions, and fewer addresses and bounds to compute (one bound a quad), for the same
#: bytes: LK^alpha's one-launch kernel at the default shape, 67.0 SASS instructions per item with
#: 62 registers (105.0 and 64 without; nvcc 13 -ftz=true, sm_90; bench/kernel_resources.py).  A
#: warp's 16-byte accesses cover 512 adjacent bytes, as its 4-byte ones cover 128 (measured on the
#: stand-in).  (`configured(vec=False)`, LKREF_CUPY_VEC=0: one column every THREADS everywhere, as
#: the benchmark's `fused scalar` row times it.)
VEC = True
#: A persistent grid for one-launch calls (`configured(pipeline=True)`, LKREF_CUPY_PIPELINE=1;
#: the benchmark's `fused pipelined` row): as many blocks as fit on the GPU at once, each block
#: (or cluster) going through rows first, first + step, ..., and copying the logits and the
#: target of the next PIPE_STAGES - 1 rows into shared memory (cp.async, one group a row) while
#: it works on this one.  Run 2's profile found a block's phases (read, reduce, statistics,
#: write) one after another with the memory idle between them; with stages in flight the memory
#: streams while a row's phases and exchanges run.  The stages take 8 bytes an entry of a block's
#: share (PIPE_STAGES x 64 KiB at 8 192 floats a block), so it needs a smaller share than the
#: default's 16 384 (`configured(block_share=8192)`: clusters of 4 at V = 32 000; V = 128 256
#: then streams, untouched) and holds one block an SM.  Only where 4 adjacent columns a thread
#: (VEC) and float32 throughout, in clusters or a block a row.  Off until a GPU has timed it.
PIPELINE = False
PIPE_STAGES = 3
#: A persistent grid as with PIPELINE, at the default shape, without stages: at the start of
#: each row one thread has the L2 cache fetch the block's share of the logits and the target of
#: its next row (cp.async.bulk.prefetch.L2, one instruction for each; Hopper and later, in
#: clusters or a block a row), which the block's loads then find there; the memory streams the
#: next row while this one's phases run, with no shared memory for it and the default's two
#: blocks an SM (`configured(l2_ahead=True)`, LKREF_CUPY_L2_AHEAD=1; the benchmark's `fused L2
#: ahead` rows).  Off until a GPU has timed it.
L2_AHEAD = False
#: The same L2 fetch without a persistent grid (`configured(l2_lead=f)`, LKREF_CUPY_L2_LEAD=f; the
#: benchmark's `fused L2 lead` rows): a block a row as by default, and as a block starts, one of
#: its threads has L2 fetch its share of the row `lead` rows on, lead = f x the rows the GPU
#: holds at once (at least 1; a row's blocks, a cluster, take one row).  Blocks start in about
#: the order of their rows, so that row's block starts about when `lead` of the rows running now
#: have ended, and finds its share in L2: the memory is kept busy by the fetches while the blocks
#: run their phases, with none of a persistent loop's registers (L2_AHEAD: 105-127 unbound, or
#: spills) and with f setting how much of L2 the rows fetched ahead hold (f = 1: some 33 MiB of
#: an H100's 50 at V = 32 000, as L2_AHEAD; f = 1/4: a quarter of that).  Float32 throughout
#: with 4 adjacent columns a thread, every phase, Hopper and later.  0 (off) until a GPU has
#: timed it.
L2_LEAD = 0.0
#: L2_LEAD's range: beyond two waves of rows ahead the fetched rows would not fit any L2.
L2_LEAD_MAX = 2.0
#: Above this temperature the kernels' 1 / T (log2 e / T with EXP2) would be a float32 subnormal,
#: which CuPy's -ftz=true makes 0 (and every q equal): such calls run the reference.
MAX_TEMPERATURE = 2.0 ** 126
MODES = {"kl": 0, "tv": 1, "lk_alpha": 2, "lk_lambda": 3}
ALPHA_FLOOR = 1e-30
#: Slots per block where a row's blocks meet in global memory: the max, the sum, the 8 statistics.
SLOTS = 10
#: Shared memory left for lk_rows' static arrays when the target cache is sized to a GPU's
#: limit (they take at most 1 104 bytes: bench/kernel_resources.py).
STATIC_SMEM_ROOM = 2048

_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef INFINITY                                      // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
#define THREADS __THREADS__
#define ITEMS __ITEMS__
#define CLUSTER __CLUSTER__                           // blocks per row
#define DSMEM __DSMEM__                               // 1: the row's blocks are a Hopper thread-block cluster;
                                                      // 0: they meet in global memory (GPUs before Hopper)
#define PCACHE __PCACHE__                             // target entries per thread copied to shared memory (the first
                                                      // PCACHE of its ITEMS: all, or what fits), read from there
#define GLOBAL_XCHG (CLUSTER > 1 && !DSMEM)
#define SLOTS __SLOTS__                               // per block where blocks meet: max, sum, the 8 statistics
#define MODE __MODE__                                 // the loss (MODES), fixed at compile time; -1: the argument mode_arg
#define PHASE __PHASE__                               // the phase (0, 1 or 2 below), fixed at compile time; -1: phase_arg
#if CLUSTER > 1 && DSMEM
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
#endif
#define P_ASYNC __P_ASYNC__                           // how the cached target entries get to shared memory: 1, by
                                                      // cp.async as the launch starts (a float target's, or with VEC
                                                      // any target's, 4 entries a copy); 2, a 2-byte target's the same
                                                      // way, in 4-byte pairs; 0, a 2-byte target's at their first read
typedef __IN_T__ in_t;
typedef __OUT_T__ out_t;
typedef __P_T__ p_t;                                  // the target's type: float, __half or __nv_bfloat16
#define VEC __VEC__                                   // 1: a thread's items come 4 adjacent columns at a time (one
                                                      // load, store or cp.async of 4 entries: 16 bytes of float32, 8
                                                      // of a 2-byte type), where every array's rows start aligned to
                                                      // 4 entries and V % 4 == 0, without draft_to_target;
                                                      // 0: one column every THREADS
#if VEC
#define COL(i) (((i) >> 2) * 4 * THREADS + ((i) & 3))    // item i's column past the thread's first (tid)
#define LANE0 (4 * threadIdx.x)                           // the thread's first column past the block's first
#else
#define COL(i) ((i) * THREADS)
#define LANE0 threadIdx.x
#endif
#define SLOT(i) (LANE0 + COL(i))                          // item i's entry in p_cache (the block's share of the row, in order)
#if PCACHE > 0
// the quad of target entries kept in p_cache from item i on (VEC only): one 16-byte shared
// load (8 bytes for a 2-byte target), where 4 loads of one entry would hit each bank 4 times;
// a quad past the row's end holds zeros (prefetch_target, stage_row store them)
#define KEPT4(i) load4(&p_cache[SLOT(i)])
#else
#define KEPT4(i) make_float4(0.f, 0.f, 0.f, 0.f)          // (not reached: no entry is kept)
#endif
#if VEC
#define IN(i) (tid + COL((i) & ~3) < V)                   // item i in the row: its quad's first column is (V % 4 == 0)
#else
#define IN(i) (tid + COL(i) < V)
#endif
#define PIPE __PIPE__                                 // > 0 (fused_cupy.PIPELINE): each block, or cluster, takes rows
                                                      // first, first + step, ... of the N (a persistent grid), and copies
                                                      // the logits and the target of the PIPE - 1 rows ahead into shared
                                                      // memory (cp.async, PIPE stages) while it works on this one, so
                                                      // the memory streams while the row's phases run; phase 0, VEC,
                                                      // float32, clusters or one block a row only; 0: a block a row
#define AHEAD __AHEAD__                               // 1 (fused_cupy.L2_AHEAD): a persistent grid as with PIPE, without
                                                      // stages: at the start of each row thread 0 has the L2 cache fetch
                                                      // the block's share of the logits and the target of its next row
                                                      // (cp.async.bulk.prefetch.L2, Hopper), which its loads then find
                                                      // there; the rest as without; 0: a block a row
#define LEAD __LEAD__                                 // 1 (fused_cupy.L2_LEAD): a block a row, as without; as it starts,
                                                      // thread 0 has the L2 cache fetch the block's share of the logits
                                                      // and the target of the row `lead` rows on (the argument; Hopper),
                                                      // which the block that takes that row, starting about when `lead`
                                                      // of the rows running now have ended, then finds there; 0: none
#define PERSIST (PIPE > 0 || AHEAD)                   // the block (cluster) goes through rows first, first + step, ...
#define EXP2 __EXP2__                                 // an element's exp: 1, exp2f(u) with u = (z - m) log2(e) / T (a
                                                      // multiply and the SFU's ex2.approx, within 2 ulp); 0, expf(u)
                                                      // with u = (z - m) / T (some ten instructions, within 2 ulp)
#define FAST_LOG __FAST_LOG__                         // log p for sum p log p: 1, __logf where p < 0.5 (3 ulp), logf
                                                      // from 0.5 up (there __logf is 2^-21.41 off, 1e-5 of a KL of
                                                      // 0.02 near p = 1: a stand-in test failed); a normalised row
                                                      // has at most two such entries, and warps branch past logf;
                                                      // 0, logf (some 28 instructions, 1 ulp) everywhere
// p log p for the KL sums, 0 where p = 0 with no select: p is floored at the least normal float
// before its log (where p is subnormal, -ftz=true makes it 0 too)
__device__ __forceinline__ float p_log_p(float p) {
    const float floored = fmaxf(p, 1.17549435e-38f);
#if FAST_LOG
    float lp = __logf(floored);
    if (p >= 0.5f) lp = logf(p);                      // at most two entries of a normalised row
#else
    const float lp = logf(floored);
#endif
    return p * lp;
}
#if EXP2
#define EXP_U(u) exp2f(u)
#define U_PER_X 1.4426950408889634f                   // u = x log2(e), x = (z - m) / T
#define X_PER_U 0.6931471805599453f
#else
#define EXP_U(u) expf(u)
#define U_PER_X 1.f
#define X_PER_U 1.f
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* o, float v) { *o = v; }
__device__ __forceinline__ void store(__half* o, float v) { *o = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* o, float v) { *o = __float2bfloat16_rn(v); }
#ifdef __CUDACC__
// 4 adjacent entries in one access (VEC), as floats: 16 bytes of float32 at a 16-byte aligned
// address, 8 bytes of a 2-byte type (two pairs, the first the lower addresses) at an 8-byte
// aligned one; the CPU stand-in has its own
__device__ __forceinline__ float4 load4(const float* at) { return *reinterpret_cast<const float4*>(at); }
__device__ __forceinline__ void store4(float* at, float4 v) { *reinterpret_cast<float4*>(at) = v; }
__device__ __forceinline__ float4 load4(const __half* at) {
    const uint2 raw = *reinterpret_cast<const uint2*>(at);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(__half* at, float4 v) {
    const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(at) = make_uint2(*reinterpret_cast<const unsigned*>(&a),
                                               *reinterpret_cast<const unsigned*>(&b));
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* at) {
    const uint2 raw = *reinterpret_cast<const uint2*>(at);   // a bfloat16 is a float's upper 16 bits
    return make_float4(__uint_as_float(raw.x << 16), __uint_as_float(raw.x & 0xffff0000u),
                       __uint_as_float(raw.y << 16), __uint_as_float(raw.y & 0xffff0000u));
}
__device__ __forceinline__ void store4(__nv_bfloat16* at, float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(at) = make_uint2(*reinterpret_cast<const unsigned*>(&a),
                                               *reinterpret_cast<const unsigned*>(&b));
}
#endif
// entry j (a constant once unrolled) of 4
__device__ __forceinline__ float part(float4 a, int j) { return j == 0 ? a.x : j == 1 ? a.y : j == 2 ? a.z : a.w; }

// block- and row-wide reductions; every thread gets the results
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = (threadIdx.x < THREADS / 32) ? sh[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
// block-wide sums of K values; every thread gets the results (sh: K * 32 floats)
template <int K> __device__ void block_sum(float* v, float* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int k = 0; k < K; k++) v[k] = warp_sum(v[k]);
    __syncthreads();
    if (lane == 0) for (int k = 0; k < K; k++) sh[k * 32 + warp] = v[k];
    __syncthreads();
    for (int k = warp; k < K; k += THREADS / 32) {    // warp k adds up the warps' partial sums of value k
        float x = (lane < THREADS / 32) ? sh[k * 32 + lane] : 0.f;
        x = warp_sum(x);
        if (lane == 0) sh[k * 32] = x;
    }
    __syncthreads();
    #pragma unroll
    for (int k = 0; k < K; k++) v[k] = sh[k * 32];
    __syncthreads();
}

#ifdef __CUDACC__
// For blocks that meet in global memory (GLOBAL_XCHG): take_ticket, the order in which blocks
// start; publish, a store of a partial result; count_in, one atomic add to a row's count;
// arrivals, a read of the count that no cache keeps stale; load_from_other_blocks, a read
// through L2 (not the SM's own L1); pause_briefly, waiting without taking issue slots from
// the SM's other warps.  The CPU stand-in has its own (its published values become visible
// to other blocks only at the publisher's next __threadfence).
__device__ __forceinline__ int take_ticket(int* counter) { return atomicAdd(counter, 1); }
__device__ __forceinline__ void publish(float* at, float v) { *at = v; }
__device__ __forceinline__ void count_in(int* counter) { atomicAdd(counter, 1); }
__device__ __forceinline__ int arrivals(const int* counter) { return *(const volatile int*)counter; }
__device__ __forceinline__ float load_from_other_blocks(const float* at) { return __ldcg(at); }
__device__ __forceinline__ void pause_briefly() {
#if __CUDA_ARCH__ >= 700
    __nanosleep(64);
#endif
}
#endif
// The block's published partial results, then its count: the fence keeps the GPU from making
// the count visible to another block before the values.
__device__ __forceinline__ void announce(int* counter) {
    __threadfence();
    count_in(counter);
}

// The row's values from its blocks' partial values (part(k, j): block k's value j): lane k of
// each warp takes block k's values, and warp-wide reductions (the same order on every warp of
// every block) give every thread of the row identical values, with few registers: K sums, or
// (SOFTMAX) the max and the sum of exp((z - max) / T) from each block's max and its sum of exps
// relative to that max (the blocks' sums moved to the row's max; a block without finite
// logits, sum 0, adds nothing).  (expf) keeps that exp, one per thread, out of the stand-in's
// count of exps per element.
template <int K, bool SOFTMAX, class Part> __device__ __forceinline__ void combine(Part part, float T, float* v) {
    const int lane = threadIdx.x & 31;
    if constexpr (SOFTMAX) {
        float mk = -INFINITY, sk = 0.f;
        if (lane < CLUSTER) {
            mk = part(lane, 0);
            sk = part(lane, 1);
        }
        if (!(sk > 0.f)) mk = -INFINITY;
        const float m = warp_max(mk);
        v[0] = m;
        v[1] = warp_sum(sk > 0.f ? sk * (expf)((mk - m) / T) : 0.f);
    } else {
        for (int j = 0; j < K; j++) v[j] = warp_sum(lane < CLUSTER ? part(lane, j) : 0.f);
    }
}

// Where the blocks of a row meet when they are not a cluster (GLOBAL_XCHG): the row's
// CLUSTER x SLOTS partial results in global memory (max and sum, then the 8 statistics: one
// slot per value, so no round overwrites another's) and its count of announced partial results.
struct Meet {
    float* parts;
    int* arrived;
    int rank, round;
};

#if GLOBAL_XCHG
// One round of a row-wide reduction over global memory: thread 0 publishes the block's K
// values at parts[rank * SLOTS + at ...], announces them (a fence, then one atomic add on the
// row's count) and waits until every block of the row has announced this round; after the
// block's barrier every thread reads and combines the row's values (combine).
template <int K, bool SOFTMAX> __device__ void meet(float* v, int at, float T, Meet& r) {
    r.round++;
    if (threadIdx.x == 0) {
        for (int j = 0; j < K; j++) publish(&r.parts[r.rank * SLOTS + at + j], v[j]);
        announce(r.arrived);
        while (arrivals(r.arrived) < r.round * CLUSTER) pause_briefly();
        __threadfence();                              // the partial results after their count
    }
    __syncthreads();                                  // the block's reads after thread 0 saw the count
    const float* parts = r.parts + at;
    combine<K, SOFTMAX>([parts](int k, int j) { return load_from_other_blocks(&parts[k * SLOTS + j]); }, T, v);
}
#endif

// The row's max m and sum s of exp((z - m) / T), given the block's max and its sum of exps
// relative to that max: with several blocks per row, one exchange of both, through distributed
// shared memory in a cluster or else through global memory (rather than one for the max and
// another for the sum).  No barrier after the cluster's reads: the statistics' exchange has its
// own buffer, and no block leaves before every block has read that one (leave_row).
__device__ void row_softmax(float& m, float& s, float T, Meet& r) {
#if CLUSTER > 1
    float v[2] = {m, s};
#if DSMEM
    __shared__ float xchg_softmax[2];
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) { xchg_softmax[0] = m; xchg_softmax[1] = s; }
    cluster.sync();
    combine<2, true>([&](int k, int j) { return cluster.map_shared_rank(xchg_softmax, k)[j]; }, T, v);
#else
    meet<2, true>(v, 0, T, r);
#endif
    m = v[0];
    s = v[1];
#endif
}
// Sums of K values over the row: the block's, then (with several blocks per row) over the
// row's blocks (combine), so every block of the row gets identical values.  A block of a
// cluster then says it has read the others' values (a split barrier: it leaves only once all
// have said so, in leave_row), and goes on with the gradient meanwhile.
template <int K> __device__ void row_sum(float* v, float* sh, Meet& r, int at) {
    block_sum<K>(v, sh);
#if CLUSTER > 1 && DSMEM
    __shared__ float xchg_sum[8];                    // K <= 8
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) for (int j = 0; j < K; j++) xchg_sum[j] = v[j];
    cluster.sync();
    combine<K, false>([&](int k, int j) { return cluster.map_shared_rank(xchg_sum, k)[j]; }, 1.f, v);
    cluster.barrier_arrive();
#elif GLOBAL_XCHG
    meet<K, false>(v, at, 1.f, r);
#endif
}
// Before a block of a cluster exits: the other blocks have read its shared memory.
__device__ __forceinline__ void leave_row() {
#if CLUSTER > 1 && DSMEM
    cg::this_cluster().barrier_wait();
#endif
}

// The target entry of draft column v (through draft_to_target with has_idx): its address, its value
__device__ __forceinline__ const p_t* target_at(const p_t* __restrict__ prow, const int* __restrict__ idx,
                                                int has_idx, int v) {
    return has_idx ? prow + idx[v] : prow + v;
}
__device__ __forceinline__ float target(const p_t* __restrict__ prow, const int* __restrict__ idx, int has_idx, int v) {
    return to_f(*target_at(prow, idx, has_idx, v));
}

#ifdef __CUDACC__
// copy_async: one float from global to shared memory, without waiting for it (Ampere and later:
// cp.async, which holds no register while in flight); wait_copies: until this thread's copies
// have landed.  The CPU stand-in (tests/simt_cpu.h) has its own, which copy at the wait.
__device__ __forceinline__ void copy_async(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
#else
    *dst = *src;
#endif
}
// copy_pair_async: two adjacent 2-byte entries (4 bytes, the least cp.async copies) the same way
__device__ __forceinline__ void copy_pair_async(p_t* dst, const p_t* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
#else
    dst[0] = src[0];
    dst[1] = src[1];
#endif
}
// copy_quad_async: 4 adjacent entries (VEC): 16 bytes of float32 (.cg: through L2 only), both
// addresses 16-byte aligned; 8 bytes of a 2-byte type (.ca: .cg copies 16 bytes only), 8-byte aligned
__device__ __forceinline__ void copy_quad_async(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
#else
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
#endif
}
template <class T> __device__ __forceinline__ void copy_quad_async(T* dst, const T* src) {
    static_assert(sizeof(T) == 2, "a quad of 2-byte entries");
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n"
                 :: "r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
#else
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
#endif
}
__device__ __forceinline__ void wait_copies() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
// commit_copies: close a group of this thread's copies; wait_copies_but<N>: until every group
// but the N committed last has landed (PIPE)
__device__ __forceinline__ void commit_copies() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void wait_copies_but() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}
// prefetch_l2: have the L2 cache fetch `bytes` (a multiple of 16) from a 16-byte aligned address
// (AHEAD; a hint, nothing waits for it)
__device__ __forceinline__ void prefetch_l2(const void* at, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" :: "l"(at), "r"(bytes) : "memory");
#endif
}
#endif

#if ITEMS > 0 && PCACHE > 0 && P_ASYNC == 1
// Start the copies of this thread's first PCACHE target entries into shared memory (p_cache[SLOT(i)]
// for column tid + COL(i)).  IDX (through draft_to_target) is a template argument: a loop choosing
// per entry would hold registers that plain addresses do not need.  VEC: 4 entries a copy (16 bytes
// of float32, 8 of a 2-byte target); else a float target's entries one by one.
template <int IDX> __device__ __forceinline__ void prefetch_target(p_t* p_cache, const p_t* __restrict__ pr,
                                                                   const int* __restrict__ idx, int tid, int V) {
#if VEC
    #pragma unroll
    for (int i = 0; i < PCACHE; i += 4) {
        int v = tid + COL(i);
        if (v < V) copy_quad_async(&p_cache[SLOT(i)], pr + v);
        else store4(&p_cache[SLOT(i)], make_float4(0.f, 0.f, 0.f, 0.f));   // past the row: p = 0, read unselected
    }
#else
    #pragma unroll
    for (int i = 0; i < PCACHE; i++) {
        int v = tid + COL(i);
        if (v < V) copy_async(&p_cache[SLOT(i)], target_at(pr, idx, IDX, v));
    }
#endif
}
#elif ITEMS > 0 && PCACHE > 0 && P_ASYNC == 2
// The same for a 2-byte target, two entries per copy: in round r, lane l of a warp copies entries
// 2 (l % 16) and 2 (l % 16) + 1 of the warp's 32 at item 2 r + l / 16, so that a warp copies its
// own entries only and its lanes read each other's after the wait and a __syncwarp.  The host
// takes this variant where every row starts 4-byte aligned and without draft_to_target.
__device__ __forceinline__ void prefetch_pairs(p_t* p_cache, const p_t* __restrict__ pr, const int* __restrict__ idx,
                                               int tid, int V) {
    const int lane = threadIdx.x & 31, k = 2 * (lane & 15);
    #pragma unroll
    for (int r = 0; r < (PCACHE + 1) / 2; r++) {
        const int i = 2 * r + (lane >> 4);
        const int v = tid - lane + k + i * THREADS;          // the warp's first column at item i, plus k
        const int at = i * THREADS + threadIdx.x - lane + k;
        if (i < PCACHE && v + 1 < V) copy_pair_async(&p_cache[at], pr + v);
        else if (i < PCACHE && v < V) p_cache[at] = *target_at(pr, idx, 0, v);   // a row's odd last entry
    }
}
#endif

#if AHEAD || LEAD
// AHEAD, LEAD: the block's share of `row` (columns rank * THREADS * ITEMS on, at most ITEMS a
// thread), logits and target, fetched into L2, by one thread
__device__ __forceinline__ void share_to_l2(const float* z, const float* p, long row, int rank, int V, int Vt) {
    const int c0 = rank * THREADS * ITEMS, end = c0 + THREADS * ITEMS, c1 = end < V ? end : V;
    if (c1 > c0) {
        prefetch_l2(z + row * (long)V + c0, 4u * (unsigned)(c1 - c0));
        prefetch_l2(p + row * (long)Vt + c0, 4u * (unsigned)(c1 - c0));
    }
}
#endif

#if PIPE
// PIPE: start the copies of this thread's entries of `row` (logits, then target) into a stage
// of shared memory (z_cache, p_cache: SLOT(i) each, as the target cache has them), 4 entries a
// copy, and close them as one group; a row past the last (row >= N) copies nothing, but its
// group is still closed, so that every stage is one group and the waits count alike.
__device__ __forceinline__ void stage_row(float* z_cache, float* p_cache, const float* z, const float* p, long row,
                                          long N, int V, int Vt, int tid) {
    if (row < N) {
        const float* zr = z + row * (long)V;
        const float* pr = p + row * (long)Vt;
        #pragma unroll
        for (int i = 0; i < ITEMS; i += 4) {
            int v = tid + COL(i);
            if (v < V) {
                copy_quad_async(&z_cache[SLOT(i)], zr + v);
                copy_quad_async(&p_cache[SLOT(i)], pr + v);
            } else {
                store4(&p_cache[SLOT(i)], make_float4(0.f, 0.f, 0.f, 0.f));   // past the row: p = 0
            }
        }
    }
    commit_copies();
}
#endif

// phase: 0 = statistics and gradient in one launch; 1 = statistics only; 2 = gradient from statistics.
// stats per row (8 floats): max, sum, alpha, S, psum, sum p x, sum p log p, input flags
// (flags: 1 = a non-finite logit, 2 = a negative target, 4 = a non-finite target)
// The row's weight in the mean: d = w[row] (1 without has_w) times 1 / wsum[0] (0 if that is 0)
// with has_wsum, else times scale; 0 for a row without target mass (draft_to_target).
// z and g are not __restrict__: out= may be the logits themselves (each thread reads an entry
// before it writes it), and ld.global.nc, which const __restrict__ allows, needs data that
// nothing writes during the launch.  The code is otherwise the same (nvcc, sm_90: same registers).
// GLOBAL_XCHG only (else not read): counts, 1 + N ints, zero at the launch (a ticket counter,
// then each row's count of announced partial results); parts, N x CLUSTER x SLOTS floats.
// lead: LEAD only (else not read), the rows ahead whose share a block has L2 fetch as it starts.
// One block per SM is said outright where the blocks meet in global memory and a 2-byte target
// is read in the statistics' loop: left to itself, ptxas (nvcc 13, sm_80/86, V = 128 256) gives
// that variant 64 registers and spills 2.8 KB a thread, where it could have 128 (116 bytes of
// spills then).  The gradient launch of a two-launch call (PHASE 2) with 16-byte accesses is
// held to 1024 threads an SM (64 registers at 512): left to itself ptxas hoists every 16-byte
// load of the logits and the target and takes 93-96 registers (nvcc 13, sm_90; 63-64 one column
// at a time), one block per SM, for a pass that only streams (12-28 bytes spilled at 64).
// Blocks of up to 512 threads and 32 entries a thread that keep the target in shared memory and
// read it 4 entries at a time (the default 512 x 16 384, and 256 x 8 192) are held to 1024 threads
// an SM, two or four blocks: left to itself ptxas gives the one-launch kernels of KL and LK^lambda
// 72-73 registers (one block of 512 an SM; at 64 they spill 24 and 8 bytes, LK^alpha and TV 4,
// each value stored and loaded once a row; nvcc 13, sm_90), and LK^alpha 66-68 at 256 threads (3 blocks);
// not with PIPE, whose stages hold one block an SM, nor the kernel for every loss (MODE -1, the
// benchmark's 'fused generic-mode'), which would spill 284 bytes at 64 (85 registers unbound).
// A persistent kernel without stages (AHEAD) is held to the default's two blocks an SM: left to
// itself ptxas keeps each item's addresses across the row loop, 105-127 registers at 512 x 16 384
// (one block an SM); at 64, TV and LK^alpha spill nothing, KL 48-64 bytes, LK^lambda 96-108 (sm_90).
// Elsewhere the hint would only add spills (bench/kernel_resources.py).
#if AHEAD && THREADS <= 512
#define ROWS_BOUNDS __launch_bounds__(THREADS, 1024 / THREADS)
#elif GLOBAL_XCHG && P_ASYNC == 0
#define ROWS_BOUNDS __launch_bounds__(THREADS, 1)
#elif PHASE == 2 && VEC && THREADS <= 512
#define ROWS_BOUNDS __launch_bounds__(THREADS, 1024 / THREADS)
#elif VEC && PCACHE > 0 && THREADS <= 512 && ITEMS > 0 && ITEMS <= 32 && !PIPE && MODE >= 0
#define ROWS_BOUNDS __launch_bounds__(THREADS, 1024 / THREADS)
#else
#define ROWS_BOUNDS __launch_bounds__(THREADS)
#endif
extern "C" __global__ void ROWS_BOUNDS
#if CLUSTER > 1 && DSMEM
__cluster_dims__(CLUSTER, 1, 1)
#endif
lk_rows(const in_t* z, const p_t* __restrict__ p, out_t* g,
        const float* __restrict__ w, int has_w, const float* __restrict__ wsum, int has_wsum, float scale,
        float* __restrict__ stats, const int* __restrict__ idx, int has_idx,
        int V, int Vt, float T, float lam, int mode_arg, int phase_arg, int* __restrict__ counts, float* __restrict__ parts,
        int N, int lead)
{
#if MODE >= 0
    const int mode = MODE;                            // this loss's code only (SPECIALIZE)
#else
    const int mode = mode_arg;
#endif
#if PHASE >= 0
    const int phase = PHASE;                          // this phase's code only (SPECIALIZE)
#else
    const int phase = phase_arg;
#endif
    __shared__ float sh[8 * 32];
#if PERSIST
    // rows first, first + step, ...: the row's blocks (a cluster) go through them together
    const long first = blockIdx.x / CLUSTER, step = gridDim.x / CLUSTER;
    const int rank = blockIdx.x % CLUSTER;            // this block's share of each row's columns
#else
    long row = blockIdx.x / CLUSTER;
    int rank = blockIdx.x % CLUSTER;                  // this block's share of the row's columns
#if GLOBAL_XCHG
    if (phase != 2) {
        // A block that meets others takes its row and rank in the order blocks start, not from
        // blockIdx (whose blocks may start in any order): it then waits only for blocks that
        // have started or start as soon as any block of an earlier row ends, so the blocks of
        // a row never wait for one that cannot start (any GPU holds CLUSTER blocks at once).
        __shared__ int ticket;
        if (threadIdx.x == 0) ticket = take_ticket(counts);
        __syncthreads();
        row = ticket / CLUSTER;
        rank = ticket % CLUSTER;
    }
    Meet meeting = {parts + row * CLUSTER * SLOTS, counts + 1 + row, rank, 0};
#else
    Meet meeting = {nullptr, nullptr, rank, 0};         // not used
#endif
#if LEAD
    if (threadIdx.x == 0 && row + lead < N) share_to_l2(z, p, row + lead, rank, V, Vt);   // a later block's share, into L2
#endif
#endif
    const int tid = LANE0 + rank * THREADS * (ITEMS > 0 ? ITEMS : 0);   // the thread's first column
#if PIPE
    // the stage of row k is stage k % PIPE, copied PIPE - 1 rows ahead (the first PIPE - 1 here)
    extern __shared__ __align__(16) float pipe_smem[];   // PIPE stages of THREADS * ITEMS logits, then as many target entries
    #pragma unroll 1
    for (int k = 0; k < PIPE - 1; k++)
        stage_row(pipe_smem + k * 2 * THREADS * ITEMS, pipe_smem + (2 * k + 1) * THREADS * ITEMS, z, p,
                  first + k * step, N, V, Vt, tid);
#elif ITEMS > 0 && PCACHE > 0
    extern __shared__ __align__(16) p_t p_cache[];    // PCACHE * THREADS entries: each thread's own
                                                      // (16-byte aligned for VEC's 16-byte copies)
#endif
#if PERSIST
    #pragma unroll 1
    for (long k = 0, row = first; row < N; k++, row += step) {
    __syncthreads();                                  // every thread of the block is done with the stage refilled next
#if PIPE
    {
        const int ahead = (int)((k + PIPE - 1) % PIPE);
        stage_row(pipe_smem + ahead * 2 * THREADS * ITEMS, pipe_smem + (2 * ahead + 1) * THREADS * ITEMS, z, p,
                  row + (PIPE - 1) * step, N, V, Vt, tid);
    }
    wait_copies_but<PIPE - 1>();                      // this row's stage has landed (each thread reads its own entries)
    float* z_cache = pipe_smem + (k % PIPE) * 2 * THREADS * ITEMS;
    float* p_cache = z_cache + THREADS * ITEMS;
#else
    if (threadIdx.x == 0 && row + step < N) share_to_l2(z, p, row + step, rank, V, Vt);   // the next row, into L2
#endif
    Meet meeting = {nullptr, nullptr, rank, 0};       // not used
#endif
    const in_t* zr = z + row * (long)V;
    const p_t* pr = p + row * (long)Vt;
    float* st = stats + row * 8;
#if ITEMS > 0
    float xr[ITEMS];
#endif
    float m, s;
    // per element, x = (z - m) / T in the units of EXP_U is u = (z - m) * rT: a multiply, not the
    // IEEE division, which is some ten instructions and a branch to a slow path an element (nvcc
    // 13, sm_90); the KL sums take x = u * X_PER_U, once a thread
    const float rT = U_PER_X / T;
    int flags = 0;
    const bool need_x = mode == 0 || mode == 3;          // KL and LK^lambda: sum p x
#if ITEMS > 0
    float to_row = 1.f;                                  // TV and LK^alpha: q = e * (to_row / s) in one multiply
#endif
    if (phase != 2) {
#if PIPE
        // (the target entries are in this row's stage already)
#elif ITEMS > 0 && PCACHE > 0 && P_ASYNC == 1
        // the block's target entries start for shared memory now and arrive while the logits
        // are worked on; each thread copies, and later reads, its own entries only (cp.async
        // copies 4 bytes or more: a 2-byte target is copied in pairs or kept at its first read)
        if (has_idx) prefetch_target<1>(p_cache, pr, idx, tid, V);
        else prefetch_target<0>(p_cache, pr, idx, tid, V);
#elif ITEMS > 0 && PCACHE > 0 && P_ASYNC == 2
        prefetch_pairs(p_cache, pr, idx, tid, V);
#endif
        float lmax = -INFINITY;
#if ITEMS > 0
        // past the row's end a logit is NaN, which fmaxf and fminf pass by and the exps select away
        float lmin = INFINITY;
#if VEC
        #pragma unroll
        for (int i = 0; i < ITEMS; i += 4) {             // 4 columns a load; a quad is all in the row or all past it
            int v = tid + COL(i);
#if PIPE
            const float4 z4 = v < V ? load4(&z_cache[SLOT(i)]) : make_float4(NAN, NAN, NAN, NAN);
#else
            const float4 z4 = v < V ? load4(zr + v) : make_float4(NAN, NAN, NAN, NAN);
#endif
            xr[i] = z4.x; xr[i + 1] = z4.y; xr[i + 2] = z4.z; xr[i + 3] = z4.w;
        }
#else
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) {
            int v = tid + COL(i);
            xr[i] = v < V ? to_f(zr[v]) : NAN;
        }
#endif
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) {                // the input flag, once a thread (below the exps)
            lmax = fmaxf(lmax, xr[i]);
            lmin = fminf(lmin, xr[i]);
        }
#else
        // streaming: the thread's max and its sum of exps relative to that max in one pass over
        // the logits (a larger logit moves the sum to it: still one exp per element)
        float lsum = 0.f;
        for (int v = tid; v < V; v += THREADS) {
            float zv = to_f(zr[v]);
            if (!isfinite(zv)) {
                flags |= 1;                              // flagged; left out of the sums
            } else if (zv > lmax) {
                lsum = lsum * EXP_U((lmax - zv) * rT) + 1.f;
                lmax = zv;
            } else {
                lsum += EXP_U((zv - lmax) * rT);
            }
        }
#endif
        // the block's max mb and its sum of exps relative to mb; with several blocks per row one
        // exchange (row_softmax) makes them the row's max m and sum s, and the block's values in
        // registers follow: x = (z - m) / T = (z - mb) / T - shift (KL, LK^lambda), and
        // exp(x) = exp((z - mb) / T) * to_row, to_row taken with 1 / s in q's one multiply (TV, LK^alpha)
        float mb = block_max(lmax, sh);
        if (!isfinite(mb)) mb = 0.f;                     // flagged, or no columns; keeps the arithmetic below quiet
        float acc[1] = {0.f};
#if ITEMS > 0
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) {
            float u = IN(i) ? (xr[i] - mb) * rT : 0.f;        // u: x = (z - max z) / T, the block's max
            float e = IN(i) ? EXP_U(u) : 0.f;
            acc[0] += e;
            xr[i] = need_x ? u : e;                          // the KL sums need x; TV and LK^alpha only e
        }
        // a logit of +inf shows in the max, -inf in the min, NaN in the thread's sum of exps (an
        // exp of a finite logit below the max is in [0, 1])
        if (lmax == INFINITY || lmin == -INFINITY || isnan(acc[0])) flags |= 1;
#else
        acc[0] = lsum > 0.f ? lsum * (expf)((lmax - mb) / T) : 0.f;   // the thread's sum moved to the block's max
#endif
        block_sum<1>(acc, sh);
        m = mb;
        s = acc[0];
#if CLUSTER > 1
        row_softmax(m, s, T, meeting);
        if (!isfinite(m)) m = 0.f;                       // no finite logit in the row: flagged
        const float shift = (m - mb) / T, shift_u = shift * U_PER_X;
#if ITEMS > 0
        to_row = acc[0] > 0.f ? (expf)(-shift) : 0.f;    // an exp per block, not per element
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) xr[i] = need_x ? xr[i] - shift_u : xr[i];   // (e: to_row in q's multiply)
#endif
#endif
    } else {
        m = st[0];
        s = st[1];
    }
    const float inv = 1.f / s;
#if ITEMS > 0
    if (phase == 2) {                                    // registers hold q from here on
#if VEC
        #pragma unroll
        for (int i = 0; i < ITEMS; i += 4) {
            int v = tid + COL(i);
            const float4 z4 = v < V ? load4(zr + v) : make_float4(m, m, m, m);
            xr[i] = z4.x; xr[i + 1] = z4.y; xr[i + 2] = z4.z; xr[i + 3] = z4.w;
        }
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) xr[i] = IN(i) ? EXP_U((xr[i] - m) * rT) * inv : 0.f;
#else
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) {
            int v = tid + COL(i);
            xr[i] = v < V ? EXP_U((to_f(zr[v]) - m) * rT) * inv : 0.f;
        }
#endif
    }
#endif
    float alpha, S, psum, px, plogp;
    if (phase != 2) {
        // alpha = sum min(q, p); S = sum q [q < p]; psum; sum p x; sum p log p; and how many
        // threads saw each input problem: one reduction of 8 values
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#if ITEMS > 0 && PCACHE > 0 && P_ASYNC && !PIPE
        wait_copies();
#if P_ASYNC == 2
        __syncwarp();                                    // the pairs the warp's other lanes copied
#endif
#endif
        float pmin = INFINITY, pmax = -INFINITY;         // of the thread's target entries
#if ITEMS > 0
        const float e_to_q = to_row * inv;
#if VEC
        float4 p4 = make_float4(0.f, 0.f, 0.f, 0.f);    // the quad's target entries
#endif
        // no branch per item (straight-line code: the instruction cache holds it better): an item
        // past the row's end reads nothing and adds q = p = 0 to every sum
        #pragma unroll
        for (int i = 0; i < ITEMS; i++) {
            const int v = tid + COL(i);
            const bool in = IN(i);
            {
                float u = need_x ? xr[i] : 0.f;
                // one exp per element for TV and LK^alpha, whose registers hold e (0 past the row's end)
                float q = need_x ? (in ? EXP_U(u) * inv : 0.f) : xr[i] * e_to_q;
#else
        for (int v = tid; v < V; v += THREADS) {
            const bool in = true;
            {
                float u = (to_f(zr[v]) - m) * rT;
                float q = EXP_U(u) * inv;
#endif
#if ITEMS > 0
                xr[i] = q;                               // registers hold q from here on
#endif
#if VEC && ITEMS > 0
                if ((i & 3) == 0) p4 = i < PCACHE ? KEPT4(i) : in ? load4(pr + v) : make_float4(0.f, 0.f, 0.f, 0.f);
                float pv = part(p4, i & 3);                  // 0 past the row's end (kept entries too)
#elif ITEMS > 0 && PCACHE > 0 && P_ASYNC
                float pv = !in ? 0.f : i < PCACHE ? to_f(p_cache[SLOT(i)]) : target(pr, idx, has_idx, v);
#elif ITEMS > 0 && PCACHE > 0
                float pv = 0.f;
                if (in && i < PCACHE) {                  // read now, and kept for the gradient
                    const p_t raw = *target_at(pr, idx, has_idx, v);
                    p_cache[SLOT(i)] = raw;
                    pv = to_f(raw);
                } else if (in) {
                    pv = target(pr, idx, has_idx, v);
                }
#else
                float pv = in ? target(pr, idx, has_idx, v) : 0.f;
#endif
                acc[0] += fminf(q, pv);
                acc[1] += q < pv ? q : 0.f;
                acc[2] += pv;
                if (need_x) {                            // the KL sums
                    acc[3] += pv > 0.f ? pv * u : 0.f;    // 0 where p = 0, also where x = -inf
                    acc[4] += p_log_p(pv);
                }
                pmin = fminf(pmin, pv);                  // the input flags, once a thread (below)
                pmax = fmaxf(pmax, pv);
            }
        }
        // a negative entry shows in the min; -inf in the min, +inf in the max, NaN in the sum
        // (fminf and fmaxf pass it by); a sum that overflows on finite entries is not NaN
        if (pmin < 0.f) flags |= 2;
        if (isnan(acc[2]) || pmin == -INFINITY || pmax == INFINITY) flags |= 4;
        acc[3] *= X_PER_U;                               // sum p u to sum p x
        acc[5] = (flags & 1) ? 1.f : 0.f;
        acc[6] = (flags & 2) ? 1.f : 0.f;
        acc[7] = (flags & 4) ? 1.f : 0.f;
        row_sum<8>(acc, sh, meeting, 2);
        alpha = acc[0]; S = acc[1]; psum = acc[2]; px = acc[3]; plogp = acc[4];
        int f1 = acc[5] > 0.f, f2 = acc[6] > 0.f, f4 = acc[7] > 0.f;
        if (threadIdx.x == 0 && rank == 0) {
            st[0] = m; st[1] = s; st[2] = alpha; st[3] = S; st[4] = psum; st[5] = px; st[6] = plogp;
            st[7] = (float)((f1 ? 1 : 0) | (f2 ? 2 : 0) | (f4 ? 4 : 0));
        }
        if (phase == 1) {
            leave_row();
            return;
        }
    } else {
        alpha = st[2]; S = st[3]; psum = st[4];
    }
    // the gradient: g = q (S - m) c_tv + (q sum p_kl - p_kl) c_kl, with p_kl = p * kls
    float dr = (has_w ? w[row] : 1.f) * (has_wsum ? (wsum[0] > 0.f ? 1.f / wsum[0] : 0.f) : scale);
    if (has_idx && !(psum > 0.f)) dr = 0.f;              // no target mass on the draft vocabulary: dropped
    const float kls = has_idx ? (psum > 0.f ? 1.f / psum : 0.f) : 1.f;
    float c_tv = 0.f, c_kl = 0.f;
    if (mode == 0) c_kl = dr / T;
    if (mode == 1) c_tv = dr / T;
    if (mode == 2) c_tv = alpha >= __ALPHA_FLOOR__ ? dr / (alpha * T) : 0.f;
    if (mode == 3) { c_tv = (1.f - lam) * dr / T; c_kl = lam * dr / T; }
    // = q c_m - p c_p an entry, c_m = c_lt where q < p (m = 1), else c_ge: the products once a
    // thread, three instructions an entry (TV, LK^alpha; four with the KL part).  __fmaf_rn, the
    // fma a * b + c would contract to: written as such, the compiler takes select(q < p, c_lt,
    // c_ge) for c_tv * select(q < p, S - 1, S) + c_q and computes that for every entry
    const bool tv_part = mode != 0, kl_part = mode == 0 || mode == 3;
    const float c_q = c_kl * (psum * kls), c_p = c_kl * kls;
    const float c_lt = __fmaf_rn(c_tv, S - 1.f, c_q), c_ge = __fmaf_rn(c_tv, S, c_q);
    const bool live = c_tv != 0.f || c_kl != 0.f;       // else every entry 0 (a masked or dropped row)
#if ITEMS > 0
#if VEC
    float g4[4];                                         // a quad's gradient, stored together
    float4 p4 = make_float4(0.f, 0.f, 0.f, 0.f);        // the quad's target entries
#endif
    #pragma unroll
    for (int i = 0; i < ITEMS; i++) {
        const int v = tid + COL(i);
        const bool in = IN(i);                           // past the row's end: no read, no store
        {
            float q = xr[i];
#else
    for (int v = tid; v < V; v += THREADS) {
        const bool in = true;
        {
            float q = EXP_U((to_f(zr[v]) - m) * rT) * inv;
#endif
#if VEC && ITEMS > 0
            const bool kept = phase == 0 && i < PCACHE;
            if ((i & 3) == 0) p4 = kept ? KEPT4(i) : in ? load4(pr + v) : make_float4(0.f, 0.f, 0.f, 0.f);
            float pv = part(p4, i & 3);
#elif ITEMS > 0 && PCACHE > 0
            float pv = !in ? 0.f : phase == 0 && i < PCACHE ? to_f(p_cache[SLOT(i)]) : target(pr, idx, has_idx, v);
#else
            float pv = in ? target(pr, idx, has_idx, v) : 0.f;
#endif
            float gv = 0.f;
            if (live) {
                gv = q * (tv_part && q < pv ? c_lt : c_ge);
                if (kl_part) gv = __fmaf_rn(-pv, c_p, gv);   // (one rounding as in every kernel, generic too)
            }
#if VEC && ITEMS > 0
            g4[i & 3] = gv;
            const int v4 = v - 3;                        // the quad's first column
            if ((i & 3) == 3 && in) store4(g + row * (long)V + v4, make_float4(g4[0], g4[1], g4[2], g4[3]));
#else
            if (in) store(g + row * (long)V + v, gv);
#endif
        }
    }
    if (phase == 0) leave_row();
#if PERSIST
    }
#endif
}

// After lk_rows: the rows' losses and the sums of their masked mean, by one block in a fixed
// order (the same result on every run), so that the host waits for the device once per call.
// per[row]: the row's loss.  out: 0 sum w loss (a row of weight 0 adds nothing, even an
// infinite loss), 1 sum w, 2 sum w alpha, 3 the input flags of all rows, 4 the worst
// |psum - 1|, 5 LK^alpha rows with alpha below ALPHA_FLOOR and target mass, 6 the mean
// (sum w loss) (1 / sum w), 0 when sum w = 0, 7 lam.  restricted (draft_to_target): a row
// without target mass on the draft vocabulary weighs 0; the KL uses the renormalised target.
extern "C" __global__ void __launch_bounds__(THREADS)
lk_finish(const float* __restrict__ stats, const float* __restrict__ w, int has_w, int restricted, int N,
          int mode, float lam, float* __restrict__ per, float* __restrict__ out)
{
    __shared__ float sh[8 * 32];
    // sum w loss, sum w, sum w alpha, low rows, rows with each input flag (3)
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float worst = 0.f;
    for (int r = threadIdx.x; r < N; r += THREADS) {
        const float* st = stats + r * 8;
        const float s = st[1], alpha = st[2], psum = st[4], px = st[5], plogp = st[6];
        const int flags = (int)st[7];
        const bool live = !restricted || psum > 0.f;
        const float wr = live ? (has_w ? w[r] : 1.f) : 0.f;
        const float kls = restricted ? (live ? 1.f / psum : 0.f) : 1.f;
        float loss;
        if (mode == 1) {
            loss = 1.f - alpha;
        } else if (mode == 2) {
            loss = -logf(alpha > 0.f ? alpha : 1.f);
        } else {                                         // KL = sum p_kl log p_kl - sum p_kl log q
            float kl = kls * (plogp + psum * logf(kls > 0.f ? kls : 1.f)) - kls * (px - psum * logf(s));
            loss = mode == 0 ? kl : (lam != 0.f ? lam * kl : 0.f) + (1.f - lam) * (1.f - alpha);  // lam = 0: no KL, even inf
        }
        if (!live) loss = 0.f;
        per[r] = loss;
        if (wr > 0.f) {
            acc[0] += wr * loss;
            acc[2] += wr * alpha;
        }
        acc[1] += wr;
        if (mode == 2 && alpha < __ALPHA_FLOOR__ && psum > 0.f) acc[3] += 1.f;
        acc[4] += (flags & 1) ? 1.f : 0.f;
        acc[5] += (flags & 2) ? 1.f : 0.f;
        acc[6] += (flags & 4) ? 1.f : 0.f;
        worst = fmaxf(worst, fabsf(psum - 1.f));
    }
    block_sum<8>(acc, sh);
    worst = block_max(worst, sh);
    if (threadIdx.x == 0) {
        out[0] = acc[0]; out[1] = acc[1]; out[2] = acc[2];
        out[3] = (float)((acc[4] > 0.f ? 1 : 0) | (acc[5] > 0.f ? 2 : 0) | (acc[6] > 0.f ? 4 : 0));
        out[4] = worst; out[5] = acc[3];
        out[6] = acc[0] * (acc[1] > 0.f ? 1.f / acc[1] : 0.f);
        out[7] = lam;
    }
}
"""

_cache: dict = {}             # _kernel's: its key -> Kernels, or the exception its build raised


def plan(V: int):
    """(items, cluster) for a row of V logits: items per thread held in registers and blocks per
    row.  Rows up to THREADS * MAX_ITEMS fit one block; up to 8 times that, 2, 4 or 8 blocks share
    the row (a thread-block cluster on Hopper and later, else blocks that meet in global memory);
    beyond, one block streams the row from memory (items = 0)."""
    if STREAM:
        return 0, 1
    per_thread = -(-V // THREADS)
    for cluster in CLUSTER_CHOICES:
        if per_thread <= MAX_ITEMS * cluster:
            return -(-V // (THREADS * cluster)), cluster
    return 0, 1


THREAD_CHOICES = (64, 128, 256, 512, 1024)
SHARE_CHOICES = (8_192, 16_384, 32_768)
CLUSTER_CHOICES = (1, 2, 4, 8)


#: The on/off settings, by `configured`'s keyword and the module constant it sets (also read
#: from LKREF_CUPY_<constant> at import).
SWITCHES = {"cache_target": "CACHE_TARGET", "clusters": "CLUSTERS", "pair_prefetch": "PAIR_PREFETCH",
            "specialize": "SPECIALIZE", "stream": "STREAM", "exp2": "EXP2", "vec": "VEC",
            "fast_log": "FAST_LOG", "pipeline": "PIPELINE", "l2_ahead": "L2_AHEAD"}
_SETTINGS = ("THREADS", "BLOCK_SHARE", "MAX_ITEMS", "L2_LEAD", *SWITCHES.values())


@contextmanager
def configured(threads=None, block_share=None, cache_target=None, clusters=None, pair_prefetch=None,
               specialize=None, stream=None, exp2=None, vec=None, fast_log=None, pipeline=None, l2_ahead=None,
               l2_lead=None):
    """Run the kernels with another block size or share of a row per block, without the target
    cache (for tuning), without clusters (clusters=False: a row's blocks meet in global memory,
    as on GPUs before Hopper), with a 2-byte target prefetched in pairs (PAIR_PREFETCH), as one
    kernel for every loss (specialize=False), streaming every row (stream=True), with expf
    for each element's exp (exp2=False), without 16-byte accesses (vec=False), with logf for
    every log p of the KL sums (fast_log=False), or with a persistent grid whose blocks copy the
    rows ahead into shared memory (pipeline=True, PIPELINE) or have L2 fetch their next row
    (l2_ahead=True, L2_AHEAD), or with a block a row whose first thread has L2 fetch the share of
    a row ahead (l2_lead=f, L2_LEAD: f of the rows the GPU holds at once, 0 to L2_LEAD_MAX):
    threads in THREAD_CHOICES, block_share in SHARE_CHOICES."""
    switches = {key: value for key, value in locals().items() if key in SWITCHES}
    old = {name: globals()[name] for name in _SETTINGS}
    try:
        for key, value in switches.items():
            if value is not None and not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{key} must be True or False, got {value!r}")
        _set(threads, "threads", block_share, "block_share", switches, l2_lead, "l2_lead")
        yield
    finally:
        globals().update(old)


def _set(threads, threads_name, block_share, share_name, switches, lead=None, lead_name="l2_lead"):
    """Check and apply the launch settings that are not None (MAX_ITEMS follows from them);
    switches: SWITCHES' keywords to True, False or None; lead: L2_LEAD."""
    global THREADS, BLOCK_SHARE, MAX_ITEMS, L2_LEAD
    if lead is not None:
        L2_LEAD = _check_lead(lead, lead_name)
    for key, value in switches.items():
        if value is not None:
            globals()[SWITCHES[key]] = bool(value)
    if threads is not None:
        THREADS = _check_choice(threads, threads_name, THREAD_CHOICES)
    if block_share is not None:
        BLOCK_SHARE = _check_choice(block_share, share_name, SHARE_CHOICES)
    if threads is not None or block_share is not None:
        MAX_ITEMS = BLOCK_SHARE // THREADS


def _check_lead(value, name):
    """L2_LEAD from a number (or its text, from the environment) in [0, L2_LEAD_MAX]."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number from 0 to {L2_LEAD_MAX}, got {value!r}") from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number from 0 to {L2_LEAD_MAX}, got {value!r}")
    if not 0 <= float(value) <= L2_LEAD_MAX:             # (NaN fails too)
        raise ValueError(f"{name} must be from 0 to {L2_LEAD_MAX} (of the rows a GPU holds at once), got {value!r}")
    return float(value)


def _check_choice(value, name, choices):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, one of {choices}; got {value!r}")
    if int(value) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return int(value)


def _configure_from_environment():
    _set(os.environ.get("LKREF_CUPY_THREADS") or None, "LKREF_CUPY_THREADS",
         os.environ.get("LKREF_CUPY_BLOCK_SHARE") or None, "LKREF_CUPY_BLOCK_SHARE",
         {key: env_flag(f"LKREF_CUPY_{name}") for key, name in SWITCHES.items()},
         os.environ.get("LKREF_CUPY_L2_LEAD") or None, "LKREF_CUPY_L2_LEAD")


_configure_from_environment()


def kernel_source(items: int, cluster: int, in_t: str = "float", out_t: str = "float", cache_target=None,
                  dsmem: bool = True, cached=None, p_t: str = "float", pairs: bool = False, mode=None,
                  phase=None, exp2=None, vec=False, fast_log=None, pipe: int = 0, ahead: bool = False,
                  lead: bool = False) -> str:
    """The CUDA source for one (items, cluster, logits' type, gradient's type); cache_target
    (default CACHE_TARGET) keeps the target entries in shared memory between the phases of a
    launch, all `items` of each thread's or the first `cached` of them (a GPU with less shared
    memory); dsmem=False (GPUs before Hopper) has a row's blocks meet in global memory, not in a
    cluster; p_t is the target's type (float, __half or __nv_bfloat16), and pairs has a 2-byte
    target copied into shared memory with cp.async in 4-byte pairs (its rows 4-byte aligned);
    mode (a value of MODES) builds lk_rows for that loss alone, None for all four; phase (0: the
    statistics and the gradient in one launch; 1, 2: the statistics, then the gradient, of a
    two-launch call) for that phase alone, None for the one it is given; exp2 (default EXP2):
    each element's exp by exp2f rather than expf; fast_log (default FAST_LOG): log p by __logf
    where p < 0.5, not logf everywhere; vec: 4 adjacent columns at a time, one access of 4
    entries (16 bytes of float32, 8 of a 2-byte type), a 2-byte target copied 4 entries a cp.async
    whatever pairs says (the caller has checked vec_fits; where a thread's items, or the target
    entries it keeps in shared memory, are not a multiple of 4, the one-column source); pipe:
    PIPELINE's stages (0: none; taken only for one loss's one-launch kernel with 4 adjacent
    columns at a time, float32 throughout and no blocks that meet in global memory, where the
    whole target share is kept); ahead: L2_AHEAD, on the same terms (without stages); lead: L2_LEAD
    (a block a row, any phase, one loss's kernel with 4 adjacent columns at a time and float32
    throughout; not with pipe or ahead)."""
    if mode is not None and mode not in MODES.values():
        raise ValueError(f"mode must be one of {sorted(MODES.values())} or None, got {mode!r}")
    if phase not in (None, 0, 1, 2):
        raise ValueError(f"phase must be 0, 1, 2 or None, got {phase!r}")
    on = bool(CACHE_TARGET if cache_target is None else cache_target) and items > 0
    pcache = min(items, items if cached is None else int(cached)) if on else 0
    dsmem = bool(dsmem) or cluster == 1                # one block per row meets nobody: one source
    pairs = pairs and pcache > 0                       # nothing to copy: the same source as without
    vec = bool(vec) and items > 0 and items % 4 == 0 and pcache % 4 == 0   # (then any target is copied 4 entries a cp.async)
    fetches = vec and mode is not None and (in_t, out_t, p_t) == ("float",) * 3   # rows in L2 or stages ahead
    persists = fetches and phase == 0 and dsmem
    pipe = int(pipe) if (pipe and persists and pcache == items) else 0
    ahead = bool(ahead) and persists and not pipe
    lead = bool(lead) and fetches and not (pipe or ahead)
    return (_SOURCE.replace("__THREADS__", str(THREADS)).replace("__ITEMS__", str(items))
            .replace("__PCACHE__", str(pcache)).replace("__DSMEM__", str(int(bool(dsmem))))
            .replace("__CLUSTER__", str(cluster)).replace("__IN_T__", in_t).replace("__OUT_T__", out_t)
            .replace("__P_T__", p_t).replace("__P_ASYNC__", "1" if p_t == "float" or vec else "2" if pairs else "0")
            .replace("__ALPHA_FLOOR__", f"{ALPHA_FLOOR:e}f").replace("__SLOTS__", str(SLOTS))
            .replace("__MODE__", str(-1 if mode is None else int(mode))).replace("__PHASE__", str(-1 if phase is None else int(phase)))
            .replace("__EXP2__", str(int(bool(EXP2 if exp2 is None else exp2)))).replace("__VEC__", str(int(vec)))
            .replace("__FAST_LOG__", str(int(bool(FAST_LOG if fast_log is None else fast_log))))
            .replace("__PIPE__", str(pipe)).replace("__AHEAD__", str(int(ahead))).replace("__LEAD__", str(int(lead))))


def _ctype(dt):
    """The kernels' C type for a dtype (or its name: bfloat16 is ml_dtypes', which NumPy may not know)."""
    if "bfloat16" in str(dt):
        return "__nv_bfloat16"
    if np.dtype(dt) == np.float32:
        return "float"
    if np.dtype(dt) == np.float16:
        return "__half"
    raise TypeError(f"no fused kernel for dtype {dt}")


class Kernels(NamedTuple):
    """The two kernels of one variant: lk_rows (the rows), lk_finish (the mean), the dynamic
    shared memory lk_rows is launched with, its PIPELINE stages, and whether it fetches the next
    row into L2 (L2_AHEAD).  Either makes lk_rows persistent (any number of rows a block, or
    cluster); else it is launched with a block, or cluster, a row, and `lead` says whether each
    block has L2 fetch its share of a row ahead (L2_LEAD)."""

    rows: Any
    finish: Any
    smem: int
    stages: int = 0
    ahead: bool = False
    lead: bool = False

    @property
    def persistent(self) -> bool:
        return bool(self.stages or self.ahead)


def _kernel(in_dtype, out_dtype, items, cluster, dsmem=True, p_dtype=np.float32, pairs=False, mode=None,
            phase=None, vec=False, pipe=0, ahead=False, lead=False) -> Kernels:
    cp = sys.modules["cupy"]
    dsmem = bool(dsmem) or cluster == 1
    key = (str(in_dtype), str(out_dtype), items, cluster, THREADS, CACHE_TARGET, dsmem, str(p_dtype), bool(pairs), mode,
           phase, EXP2, bool(vec), FAST_LOG, int(pipe), bool(ahead), bool(lead), current_device(cp))
    if key not in _cache:
        p_bytes = np.dtype(p_dtype).itemsize

        def build(cached, pipe):
            src = kernel_source(items, cluster, _ctype(in_dtype), _ctype(out_dtype), dsmem=dsmem, cached=cached,
                                p_t=_ctype(p_dtype), pairs=pairs, mode=mode, phase=phase, vec=vec, pipe=pipe,
                                ahead=ahead, lead=lead)
            stages = defined(src, "PIPE")                # what the source took
            smem = stage_bytes(items) * stages if stages else p_bytes * cached * THREADS
            return src, _build(cp, src), smem

        try:
            cached = items if pipe else cached_items(items, _smem_optin(cp), p_bytes, phase)
            src, kern, smem = build(cached, pipe)
            if smem:                                   # opt in: without it a block gets 48 KiB of static
                try:                                   # and dynamic shared memory together
                    kern.max_dynamic_shared_size_bytes = smem
                except Exception:                      # refused all the same: no cache, no stages
                    src, kern, smem = build(0, 0)
            finish = cp.RawKernel(src, "lk_finish", options=kern.options)     # the same module, compiled once
            _cache[key] = Kernels(kern, finish, smem, defined(src, "PIPE"), bool(defined(src, "AHEAD")),
                                  bool(defined(src, "LEAD")))
        except Exception as exc:                       # NVRTC's error, or the driver's as it loads the module:
            _cache[key] = exc                          # kept, so that the variant's next calls fail at once
    if isinstance(_cache[key], Exception):             # (not after seconds of NVRTC again), with the same object
        raise _cache[key].with_traceback(None)
    return _cache[key]


def cached_items(items, optin=None, p_bytes=4, phase=None):
    """Target entries per thread that a block keeps in shared memory: all its `items` (with
    CACHE_TARGET), or as many entries of p_bytes bytes as fit where a block may opt in to only
    `optin` bytes; none in the gradient launch of a two-launch call (phase 2), which reads each
    entry once and so launches without dynamic shared memory."""
    cached = items if CACHE_TARGET and phase != 2 else 0
    if optin is not None:
        cached = min(cached, max(0, (optin - STATIC_SMEM_ROOM) // (p_bytes * THREADS)))
    return cached


def stage_bytes(items) -> int:
    """Shared memory of one PIPELINE stage: a block's share of a row's float32 logits and target."""
    return 8 * THREADS * items


def pipe_stages(items, optin) -> int:
    """PIPELINE's stages for rows of `items` a thread where a block may have `optin` bytes of
    shared memory (None: the 48 KiB every GPU gives): PIPE_STAGES, or as many as fit; 0 where
    fewer than 2 fit (a stage ahead is the point)."""
    optin = optin or 48 * 1024
    stages = min(PIPE_STAGES, (optin - STATIC_SMEM_ROOM) // stage_bytes(items)) if items else 0
    return stages if stages >= 2 else 0


def defined(src, name) -> int:
    """The value of `#define NAME <integer>` in a kernel source: what kernel_source took."""
    return int(re.search(rf"#define {name} (-?\d+)", src).group(1))


def _resident_clusters(cp, smem, cluster, N, regs=None) -> int:
    """Clusters (of `cluster` blocks; or blocks) of a persistent launch (PIPELINE, L2_AHEAD): as
    many as this GPU holds at once by its SMs' shared memory, threads and (where known) the
    kernel's registers a thread, at most N; N where CuPy cannot say (every row its own
    cluster, which is still right)."""
    try:
        attrs = cp.cuda.Device().attributes
        sms, per_sm = int(attrs["MultiProcessorCount"]), int(attrs["MaxSharedMemoryPerMultiprocessor"])
    except Exception:
        return N
    per_block = [per_sm // (smem + STATIC_SMEM_ROOM), 2048 // THREADS]
    if regs:                                          # allocated 8 a thread at a time, 64 Ki an SM
        per_block.append(65536 // (-(-regs // 8) * 8 * THREADS))
    blocks = sms * max(1, min(per_block))
    return max(1, min(N, blocks // cluster))


def lead_rows(k: Kernels, cluster: int, N: int, cp=None) -> int:
    """The rows ahead whose share a block of k has L2 fetch as it starts (L2_LEAD), 0 without:
    L2_LEAD x the rows this GPU holds at once (by its SMs, the kernel's shared memory and
    registers; N where CuPy cannot say), at least 1."""
    if not k.lead:
        return 0
    cp = cp or sys.modules["cupy"]
    return max(1, round(L2_LEAD * _resident_clusters(cp, k.smem, cluster, N, _regs(k.rows))))


def _regs(kernel):
    """Registers a thread of a compiled kernel (CuPy's num_regs), or None."""
    try:
        return int(kernel.num_regs)
    except Exception:
        return None


def _smem_optin(cp):
    """The most shared memory (bytes) a block of this GPU may opt in to (227 KiB on an H100, 163
    KiB on an A100, 99 KiB on sm_86/89/120 GPUs such as the L4, L40S and RTX cards), or None
    where CuPy cannot say."""
    try:
        return int(cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
    except Exception:
        return None


def _uses_clusters(cp) -> bool:
    """Whether a row's blocks form a cluster here (else they meet in global memory)."""
    return CLUSTERS and _has_clusters(cp)


def _has_clusters(cp) -> bool:
    """Thread-block clusters need compute capability 9.0 (Hopper) or later."""
    try:
        return int(cp.cuda.Device().compute_capability) >= 90
    except Exception:
        return False


def describe(cp) -> str:
    """One line for `python -m lkref info`: whether losses on CuPy arrays take these kernels,
    how this GPU splits a row over blocks, and how much of the target its blocks keep."""
    from .fused import cupy_fused_by_default, cupy_self_check
    try:
        cc = f"sm_{int(cp.cuda.Device().compute_capability)}"
    except Exception:
        cc = "this GPU"
    share = THREADS * MAX_ITEMS
    how = "a thread-block cluster of 2-8 blocks" if _uses_clusters(cp) else \
        f"2-8 blocks that meet in global memory ({'no clusters' if not _has_clusters(cp) else 'clusters off'})"
    when = "on by default" if cupy_fused_by_default() else \
        'off (LKREF_CUPY_FUSED=0; impl="fused" takes them)'
    if cupy_fused_by_default() and cupy_self_check():
        when += ", each variant checked against the readable path at its first use (LKREF_CUPY_SELF_CHECK=0: not)"
    kept4, kept2 = (cached_items(MAX_ITEMS, _smem_optin(cp), p_bytes) for p_bytes in (4, 2))
    words = {n: "all of a block's share" if n == MAX_ITEMS else f"{n} of each thread's {MAX_ITEMS} entries"
             for n in (kept4, kept2)}
    cache = "off" if not CACHE_TARGET else words[kept4] + ("" if kept4 == MAX_ITEMS else " (the rest read twice)") \
        + ("" if kept2 == kept4 else f"; a 2-byte target: {words[kept2]}")
    return (f"fused CuPy kernels: {when}; on {cc} a row of up to {share} logits takes one block, up to "
            f"{max(CLUSTER_CHOICES) * share} {how}, a longer one is streamed by one block; "
            f"target kept in shared memory: {cache}")


def _build(cp, src):
    """Compile now (not at the first launch), with CuPy's own include paths; if the headers
    are not found that way, again with the toolkit's include folders named."""
    kern = cp.RawKernel(src, "lk_rows", options=("-std=c++17",))
    try:
        kern.compile()
    except cp.cuda.compiler.CompileException as first:
        options = _compile_options(cp)
        if len(options) == 1:
            raise
        kern = cp.RawKernel(src, "lk_rows", options=options)
        try:
            kern.compile()
        except cp.cuda.compiler.CompileException:
            raise first from None
    return kern


def _compile_options(cp):
    """NVRTC options with the toolkit's include folders (cuda_fp16.h, cooperative_groups.h and,
    on CUDA 13, the CCCL headers they pull in), for a CuPy that does not pass them itself."""
    options = ["-std=c++17"]
    try:
        root = cp.cuda.get_cuda_path()
    except Exception:
        root = None
    for sub in ("include", os.path.join("include", "cccl")):
        if root and os.path.isdir(os.path.join(root, sub)):
            options.append("-I" + os.path.join(root, sub))
    return tuple(options)


def cupy_loss(name, draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
              eta=3.0, kl_scale=1.0, lam=None, out=None, reduce=None, check=False):
    """The fused CuPy path of a reduced loss (float32 math; float32, float16 or bfloat16 logits,
    the last where CuPy has the ml_dtypes type).

    float64 logits, and temperatures below fused.MIN_TEMPERATURE or above MAX_TEMPERATURE, return None (the caller runs
    the reference).  The value checks run inside the kernels (flags per row, gathered by
    lk_finish) and are raised after them: a one-pass call has written the gradient by then.
    With draft_to_target, the target entries outside the draft vocabulary are checked by two
    reductions (min, max).  Extra memory is O(N) (row statistics, losses, weights) for float32,
    float16 and bfloat16 targets, which the kernels read as they are; a target of another float
    dtype (float64) is first converted to float32 (an N x V copy).

    check: run each kernel variant once on a probe against the readable path first
    (lkref/self_check.py); a variant that fails, or that does not build on this machine,
    returns None (with a warning, once).  Without check, a variant that does not build raises
    the compiler's or the driver's error (the same error object again at each later call).
    """
    cp = sys.modules["cupy"]
    z = as_array(draft_logits, "draft_logits")
    if z.dtype == cp.float64:
        return None
    if z.dtype not in (cp.float32, cp.float16) and np.dtype(z.dtype).name != "bfloat16":
        raise TypeError(f"draft_logits must be float32, float16 or bfloat16 for the fused CuPy path, got {z.dtype}")
    check_vocab_axis(z, "draft_logits")
    lead, V = tuple(z.shape[:-1]), z.shape[-1]
    p = as_array(target_probs, "target_probs")
    work_dtype(p.dtype, "target_probs")                # a float (bfloat16 included), else a TypeError
    if draft_to_target is None and tuple(p.shape) != lead + (V,):
        raise ValueError(f"target_probs must have shape {lead + (V,)}, got {tuple(p.shape)}")
    if tuple(p.shape[:-1]) != lead:
        raise ValueError(f"target_probs must have the leading shape {lead} of draft_logits, got {tuple(p.shape)}")
    idx = None
    if draft_to_target is not None:
        idx = check_index_map(draft_to_target, "draft_to_target", V, p.shape[-1]).astype(cp.int32)
    mask = check_mask(mask, "mask", lead, np.float32)
    T = check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    if T < MIN_TEMPERATURE or T > MAX_TEMPERATURE:    # the reference's (see lkref/fused.py, MAX_TEMPERATURE)
        return None
    namespace(z, p, mask, draft_to_target)             # all on the device (a TypeError otherwise)
    N = int(np.prod(lead)) if lead else 1
    Vt = p.shape[-1]
    z2 = cp.ascontiguousarray(z.reshape(N, V))
    p2 = p.reshape(N, Vt)
    if np.dtype(p2.dtype).name not in ("float32", "float16", "bfloat16"):   # float64: the kernels read 4 bytes
        p2 = p2.astype(cp.float32)
    p2 = cp.ascontiguousarray(p2)
    if idx is not None and p2.size:                    # entries the kernel does not read
        _check_whole_target(cp, p2)
    if out is None:
        out = cp.empty(z.shape, z.dtype)
        alias = False
    else:
        out = check_out(out, z, p, mask, same_backend=True)
        alias = _bounds(out)[0] == _bounds(z)[0]       # out is draft_logits itself
    g2 = out.reshape(N, V)
    w = None if mask is None else mask.reshape(N).astype(cp.float32, copy=False)
    items, cluster = plan(V)
    dsmem = _uses_clusters(cp)
    # two launches where lambda, the weights or the mean need every row first, and where the
    # gradient overwrites the logits that the LK^alpha fallback rows still have to read
    two_pass = (name == "lk_lambda" and lam is None) or idx is not None or reduce is not None \
        or (alias and name == "lk_alpha")
    pairs = _pairs(p2, idx)
    vec = vec_fits(z2, p2, g2, idx)
    persists = SPECIALIZE and not two_pass and vec and (dsmem or cluster == 1) \
        and all(np.dtype(a.dtype) == np.float32 for a in (z2, p2, g2))
    pipe = pipe_stages(items, _smem_optin(cp)) if PIPELINE and persists else 0
    ahead = L2_AHEAD and persists and not pipe and _has_clusters(cp)   # (cp.async.bulk: Hopper and later)
    l2_lead = L2_LEAD > 0 and vec and not (pipe or ahead) and _has_clusters(cp)   # (float32: kernel_source checks)

    phases = (1, 2) if two_pass else (0,)
    try:
        if SPECIALIZE:                                # a kernel for this loss and each phase of the call
            by_phase = {ph: _kernel(z.dtype, out.dtype, items, cluster, dsmem, p2.dtype, pairs, MODES[name], ph, vec,
                                    pipe, ahead, l2_lead) for ph in phases}
        else:                                         # one for every loss and phase
            by_phase = dict.fromkeys(phases, _kernel(z.dtype, out.dtype, items, cluster, dsmem, p2.dtype, pairs,
                                                     vec=vec))
    except Exception as exc:                          # the variant does not build here (NVRTC, the driver)
        if not check:                                 # impl="fused": the error itself
            raise
        self_check.unbuilt(cp, name, exc, z2, p2, g2, idx, w is not None)     # warns, once a variant
        return None                                   # impl="auto": the reference instead
    if check and N and not self_check.passes(cp, name, by_phase, lambda *a: _launch(name, by_phase, cluster, dsmem, *a),
                                             z2, p2, g2, idx, w is not None, T, lam, eta, kl_scale):
        return None                                   # this variant failed its first-use check: the reference instead
    return _launch(name, by_phase, cluster, dsmem, z2, p2, g2, out, lead, w, idx, T, lam, eta, kl_scale, reduce, p.dtype)


def _launch(name, by_phase, cluster, dsmem, z2, p2, g2, out, lead, w, idx, T, lam, eta, kl_scale, reduce, p_dtype):
    """Run a call's kernels, by_phase ({0: one launch}, or {1: the statistics, 2: the gradient}
    of a two-launch call), on its arrays as cupy_loss has prepared them (z2, p2 and g2 2-d, g2 a
    view of out, whose leading shape is lead; w the weights or None; idx the draft_to_target
    map as int32 or None); p_dtype is the target's own dtype.  Returns the LossResult."""
    cp = sys.modules["cupy"]
    N, V = z2.shape
    Vt = p2.shape[1]
    two_pass = 0 not in by_phase
    phases = tuple(by_phase)
    kern = by_phase[phases[0]]
    stats = cp.empty((N, 8), cp.float32)              # every row's 8 entries are written by lk_rows
    per = cp.empty(N, cp.float32)
    summary = cp.empty(8, cp.float32)                 # lk_finish's sums (see its comment)
    absent = cp.empty(1, cp.float32)                  # passed for an array argument that is not given
    w_arg = absent if w is None else w
    absent_int = cp.empty(1, cp.int32)
    idx_arg = absent_int if idx is None else idx
    mode = np.int32(MODES[name])
    meets = cluster > 1 and not dsmem                 # a row's blocks meet in global memory
    counts = cp.zeros(N + 1, cp.int32) if meets else absent_int   # one launch per call meets
    parts = cp.empty(N * cluster * SLOTS, cp.float32) if meets else absent

    def rows(phase, lam_v, wsum=None, scale=0.0):
        if N:
            k = by_phase[phase]
            grid = _resident_clusters(cp, k.smem, cluster, N, _regs(k.rows)) * cluster if k.persistent else N * cluster
            k.rows((grid,), (THREADS,), (
                z2, p2, g2, w_arg, np.int32(w is not None), absent if wsum is None else wsum,
                np.int32(wsum is not None), np.float32(scale), stats, idx_arg, np.int32(idx is not None),
                np.int32(V), np.int32(Vt), np.float32(T), np.float32(lam_v), mode, np.int32(phase),
                counts, parts, np.int32(N), np.int32(lead_rows(k, cluster, N, cp))), shared_mem=k.smem)

    def finish(lam_v):
        kern.finish((1,), (THREADS,), (stats, w_arg, np.int32(w is not None), np.int32(idx is not None),
                                       np.int32(N), mode, np.float32(lam_v), per, summary))

    def sums(*at):                                    # 0-d views of summary entries (no copy)
        return tuple(summary[k:k + 1].reshape(()) for k in at)

    lam_v = float(lam) if lam is not None else 0.0
    if two_pass:
        rows(1, 0.0)
    elif w is None:
        rows(0, lam_v, scale=1 / N if N else 0.0)
    else:
        rows(0, lam_v, wsum=w.sum(keepdims=True))     # the kernel divides: no wait for the sum
    finish(lam_v)
    host = summary.tolist()                           # the one wait for the device (without reduce)
    _raise_flags(cp, host, p2 if idx is not None else None, p_dtype)

    def mean(total_at, count_at):
        """(mean, 1 / count) of summary entries: through the reduce hook on the device, or
        else on the host from the values read already, in float32 as the device would."""
        if reduce is not None:
            return ref.mean_from_sums(*sums(total_at, count_at), reduce)
        count = np.float32(host[count_at])
        scale = np.float32(1) / count if count > 0 else np.float32(0)
        return np.float32(host[total_at]) * scale, scale

    if name == "lk_lambda" and lam is None:
        lam_v = float(ref.lambda_from_alpha(mean(2, 1)[0], eta=eta, kl_scale=kl_scale))
        finish(lam_v)                                 # the rows' losses with this lambda
    fallback = _fallback_losses(cp, z2, p2, idx, stats, T, per) if name == "lk_alpha" and host[5] > 0 else None
    if fallback is not None:                          # per has changed: the mean again
        weights = cp.ones(N, cp.float32) if w is None else w
        if idx is not None:
            weights = cp.where(stats[:, 4] > 0, weights, 0)
        loss, mcache = ref.mean_forward(per, weights, reduce)
        scale = mcache["scale"]
    elif reduce is not None:
        loss, scale = mean(0, 1)
    else:                                             # lk_finish's mean (of the last lambda)
        loss, scale = sums(6)[0], mean(0, 1)[1]
    if two_pass:
        rows(2, lam_v, scale=float(scale))
    if fallback is not None:
        low, cache = fallback
        d = (cp.ones(low.shape, cp.float32) if w is None else w[low]) * scale
        g2[low] = ref.lk_alpha_backward(d, cache).astype(g2.dtype)
    alpha = stats[:, 2].reshape(lead)
    return ref.LossResult(loss, out, alpha, sums(7)[0] if name == "lk_lambda" else None)


def vec_fits(z2, p2, g2, idx) -> bool:
    """Whether the kernels may give each thread 4 adjacent columns at a time (VEC): every row of
    the logits, the target and the gradient aligned to 4 of its entries (V % 4 == 0 and each
    array's start: 16 bytes for float32, 8 for float16 and bfloat16), and the target's columns
    the logits' own (no draft_to_target)."""
    V = z2.shape[-1]
    return VEC and idx is None and V % 4 == 0 and all(_bounds(a)[0] % (4 * a.dtype.itemsize) == 0
                                                      for a in (z2, p2, g2))


def _pairs(p2, idx):
    """Whether a 2-byte target is copied in 4-byte pairs (PAIR_PREFETCH): every row starts 4-byte
    aligned and the entries are its own columns (no draft_to_target)."""
    rows, Vt = p2.shape
    return (PAIR_PREFETCH and np.dtype(p2.dtype).itemsize == 2 and idx is None
            and _bounds(p2)[0] % 4 == 0 and (Vt % 2 == 0 or rows <= 1))


def _check_whole_target(cp, p2):
    """Every entry of the target finite and non-negative, by reductions (no N x V temporary):
    its min and max, or for bfloat16 the max of its bits read as int16 and as uint16 (bfloat16
    reductions need a CuPy with ml_dtypes support for them; integer ones do not)."""
    if "bfloat16" in str(p2.dtype):
        pos, raw = int(p2.view(cp.int16).max()), int(p2.view(cp.uint16).max())
        # bits 0x7f80-0x7fff: +inf or NaN; 0xff80-0xffff: -inf or NaN; 0x8001-0xff7f: negative
        # (0x8000 is -0.0).  The largest int16 is the largest entry of positive sign, if any.
        nonfinite, negative = pos >= 0x7F80 or raw >= 0xFF80, raw > 0x8000
    else:
        lo, hi = float(p2.min()), float(p2.max())
        nonfinite, negative = not (np.isfinite(lo) and np.isfinite(hi)), lo < 0   # a NaN shows in both
    if nonfinite:
        raise ValueError("target_probs contains non-finite values (NaN or inf)")
    if negative:
        raise ValueError("target_probs contains negative probabilities")


def _raise_flags(cp, host, p_full, p_dtype):
    """The input errors lk_finish found (host: its summary as a list), in the reference's order;
    with draft_to_target (p_full given) the row sums are those of the whole target rows; the
    target's own dtype (p_dtype) sets how far they may be from 1."""
    flags = int(host[3])
    if flags & 1:
        raise ValueError("draft_logits contains non-finite values (NaN or inf)")
    if flags & 4:
        raise ValueError("target_probs contains non-finite values (NaN or inf)")
    if flags & 2:
        raise ValueError("target_probs contains negative probabilities")
    err = host[4] if p_full is None else (float(cp.abs(_row_sums(cp, p_full) - 1).max()) if p_full.shape[0] else 0.0)
    check_target_sums(err, p_dtype)


#: A bfloat16 target's rows are widened to float32 for their sums this many bytes at a time.
WIDEN_BYTES = 64 << 20


def _row_sums(cp, p):
    """float32 sums of the rows of a 2-d target.  A bfloat16 one is widened through its bits (a
    bfloat16 is the upper half of a float32), a block of rows at a time, so that no bfloat16
    arithmetic is asked of CuPy."""
    if "bfloat16" not in str(p.dtype):
        return p.sum(axis=1, dtype=cp.float32)
    bits, out = p.view(cp.uint16), cp.empty(p.shape[0], cp.float32)
    step = max(1, WIDEN_BYTES // (4 * p.shape[1]))
    for a in range(0, p.shape[0], step):
        out[a:a + step] = (bits[a:a + step].astype(cp.uint32) << cp.uint32(16)).view(cp.float32).sum(axis=1)
    return out


def _fallback_losses(cp, z2, p2, idx, stats, T, per):
    """LK^alpha rows with alpha below ALPHA_FLOOR: the reference's log-space loss (into per) and
    alpha (into stats) now, the gradient once the rows' weights are known.  Returns (rows, cache)."""
    alpha, psum = stats[:, 2], stats[:, 4]
    low = cp.nonzero((alpha < ALPHA_FLOOR) & (psum > 0))[0]              # lk_finish counted them: not empty
    zr = z2[low].astype(cp.float32)
    pr = (p2[low] if idx is None else cp.take(p2[low], idx, axis=1)).astype(cp.float32, copy=False)
    losses, cache = ref.lk_alpha_forward(zr, pr, temperature=T)
    per[low] = losses
    stats[low, 2] = cache["alpha"]
    return low, cache
