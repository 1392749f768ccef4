// Runs a CUDA kernel's source on the CPU: every CUDA thread is a fiber (its own stack from
// makecontext, switched with _setjmp / _longjmp), and the
// fibers of one thread-block cluster switch at each barrier and shuffle, in a seeded order.
//
// What it models: __syncthreads, __shfl_xor_sync and __syncwarp (all 32 lanes must take part),
// cp.async (copy_async, copy_pair_async, copy_quad_async / wait_copies, and commit_copies /
// wait_copies_but for groups of them: the copy happens at the wait that covers it), static and
// dynamic __shared__ memory per block (tests/simt_cpu.py rewrites the declarations into
// emu::shared<T>(name, count) calls; fresh memory is filled with NaN bytes), and the
// cooperative-groups cluster API (this_cluster().sync(), its split barrier_arrive and
// barrier_wait, map_shared_rank), blocks that meet
// in global memory (take_ticket, publish, whose stores wait for the publisher's
// __threadfence, count_in, arrivals, load_from_other_blocks, which sees what the reader's
// block had fenced for, and pause_briefly, which lets
// the other fibers run), and float32
// denormals flushed to zero (CuPy compiles every kernel with -ftz=true).  A barrier that
// not every thread reaches is reported as a deadlock, and so is a spin loop that nothing
// ends; DSMEM use of a block that has exited is reported too.  Results that change with the
// seed betray a race on shared or global memory (see the scheduling note below for the
// orders tried).
//
// Blocks run a cluster at a time, or (resident > 0) the whole grid as one set of which at
// most `resident` blocks run at once, started in a seeded random order as earlier ones end:
// a GPU starts blocks in no promised order and holds only so many at once.
//
// Memory traffic (when tracing is on): every global access the harness's rewrite notes (the
// logits, the target, the gradient's stores) is grouped into the warp instruction it belongs
// to, that is the same code line, warp and per-thread count of executions of that line, and
// the 32-byte sectors each group touches are counted: bytes asked for / (32 x sectors) is how
// well a warp's accesses coalesce (1 when 32 lanes read 32 adjacent floats).
//
// The header holds what a kernel's code calls inline (and the CUDA names); the rest, the
// scheduler included, is in tests/simt_cpu_runtime.cpp, which tests/simt_cpu.py builds once
// per process into a library that every kernel variant links to.
//
// What it does not model: timing, the memory model beyond barriers and the meeting blocks'
// fences (the two orders above: no other reordering, no stale cache line), register limits,
// launch limits (tests/simt_cpu.py checks those it knows), and the GPU's exact expf/logf
// rounding (its documented worst is modelled instead: off_by).
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <numeric>
#include <deque>
#include <queue>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

struct emu_dim3 { unsigned x, y, z; };

namespace emu {

struct Barrier { int count = 0, arrived = 0; std::vector<unsigned> waiters; long phase = 0; };
// One traced global access: kind 0 logits, 1 target, 2 gradient; the warp instruction it is
// part of (block, warp, code line, the thread's execution count of that line); its sector.
struct Access {
    std::array<long, 6> key;                  // kind, block, warp, line, execution, sector
    long bytes;
};
struct Fiber {
    ucontext_t ctx;                           // its first start (makecontext: its own stack)
    jmp_buf jb;                               // where it goes on after a switch
    bool started = false;
    unsigned tid = 0, block = 0;
    bool done = false;
    uint32_t priority = 0;
    std::vector<std::pair<int, long>> executions;  // (code line, how often this thread ran it), tracing
    std::vector<std::pair<void*, const void*>> copies;     // copy_async issued (4 bytes each), not yet waited for
    std::vector<size_t> groups;               // where each committed group of copies ends in `copies` (commit_copies)
    std::vector<std::pair<float*, float>> stores;          // published, not yet fenced (visible to others)
    long arrived_at = -1;                     // the cluster barrier's phase of a split arrival not yet waited for
};
struct Alloc { std::string name; std::vector<char> mem; bool dynamic = false; };
struct Block {
    std::vector<Alloc> shared;
    Barrier bar;
    std::vector<Barrier> warp_bar;
    std::vector<float> slots;                 // one per thread, for shuffles
    int live = 0;                             // threads not yet returned
    long seen = 0;                            // the published stores its reads of other blocks see: up to
                                              // the last one drained before its last __threadfence
};

// Scheduling: the fiber with the highest key among the ready ones runs until it reaches a
// barrier.  Odd seeds draw a fresh random key each time a fiber becomes ready (a random
// interleaving); even seeds give each fiber one random key for the whole launch, so some
// threads run as far ahead as the barriers let them while others lag (the adversarial case).
struct State {
    jmp_buf sched_jb;                         // the scheduler's loop, where a fiber that yields returns
    std::vector<Fiber> fibers;
    std::vector<Block> blocks;                // the running cluster's blocks
    Barrier cluster_bar;
    std::priority_queue<std::pair<uint32_t, unsigned>> ready;
    std::deque<unsigned> spinning;            // fibers in pause_briefly, run in turn when nothing else is ready
    long idle_spins = 0;                      // spins since a fiber last ran from `ready`
    std::mt19937 rng;
    bool sticky = false;
    Fiber* cur = nullptr;
    unsigned block_base = 0, threads = 0, grid = 0;
    std::function<void()> body;
    std::string error;
    long reads[3] = {0, 0, 0};                // global reads of z and p counted by the harness's rewrite, expf calls
    std::vector<std::pair<const void*, unsigned>> prefetches;   // each ask of L2 by prefetch_l2 (fused_cupy.L2_AHEAD,
                                              // L2_LEAD): its address and bytes
    size_t dynamic_smem = 0;                  // bytes of extern __shared__ memory per block
    size_t static_smem = 0;                   // bytes of static __shared__ memory of the largest block
    bool trace = false;
    std::vector<Access> accesses;             // when tracing
    long store_seq = 0;                       // published stores drained so far in this launch
    std::unordered_map<const float*, std::vector<std::pair<long, float>>> history;   // per address:
                                              // (number of each drained store, the value it replaced)
};
extern State S;                               // one, in the runtime library

// The runtime (tests/simt_cpu_runtime.cpp, built once per test process; every kernel variant
// links to it, so only the kernel and its launcher are compiled per variant).
void record(int kind, int line, const void* at, long bytes);
void traffic(long* out);
void yield();
[[noreturn]] void fail(const std::string& why);
Block& blk();
void wait(Barrier& b);
void arrive(Barrier& b);
void await(Barrier& b);
float shfl_xor(float v, int lane_mask);
void spin();
void* shared_bytes(Block& B, const char* name, size_t bytes, bool dynamic);
void* map_rank_bytes(void* p, unsigned rank);
float load_seen(const float* at);
void fence();
int run(unsigned grid, unsigned threads, unsigned cluster, unsigned seed, std::function<void()> body,
        unsigned resident = 0);

template <class T> inline T counted(int which, T value) { S.reads[which]++; return value; }

// The GPU's math functions at their documented worst (CUDA C++ Programming Guide, "Mathematical
// Functions": expf and exp2f 2 ulp, logf 1 ulp; __logf 3 ulp, or 2^-21.41 absolute for x in
// [0.5, 2]): the CPU's result moved that far, up or down by a hash of the argument's bits (the
// same every run), so that the tests' tolerances hold for the least accurate results a GPU may
// give, not only for the CPU's correctly rounded ones.
inline float off_by(float value, float x, float ulps, float absolute = 0.f) {
    if (!std::isfinite(value) || (value == 0.f && absolute == 0.f)) return value;
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const float sign = ((bits * 2654435761u) >> 31) ? 1.f : -1.f;
    const float mag = std::fabs(value);
    const float step = absolute > 0.f ? absolute : ulps * (std::nextafter(mag, INFINITY) - mag);
    return value + sign * step;
}
inline float gpu_expf(float x) { return off_by(::expf(x), x, 2.f); }
inline float gpu_exp2f(float x) { return off_by(::exp2f(x), x, 2.f); }
inline float gpu_logf(float x) { return off_by(::logf(x), x, 1.f); }
inline float gpu_fast_logf(float x) { return off_by(::logf(x), x, 3.f, x >= 0.5f && x <= 2.f ? 3.6e-7f : 0.f); }

// A global access at line `line` of kind 0 (logits), 1 (target) or 2 (gradient store): counts
// the reads, records the access when tracing, and returns the address.
// `count` adjacent entries at once (a 16-byte access of 4 floats: fused_cupy.VEC) count as as many reads.
template <class T> inline T* noted(int kind, int line, T* at, int count = 1) {
    if (kind < 2) S.reads[kind] += count;
    if (S.trace) record(kind, line, at, (long)sizeof(T) * count);
    return at;
}

// The block's shared array `name` of `count` T (made at its first declaration, filled with NaN bytes).
template <class T> T* shared(const char* name, size_t count, bool dynamic = false) {
    return static_cast<T*>(shared_bytes(blk(), name, count * sizeof(T), dynamic));
}
// The same place in block `rank`'s shared memory (cluster DSMEM).
template <class T> T* map_rank(T* p, unsigned rank) {
    return static_cast<T*>(map_rank_bytes((void*)p, rank));
}

}  // namespace emu

// The CUDA names the kernels use.
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define threadIdx (emu_dim3{emu::S.cur->tid, 0u, 0u})
#define blockIdx (emu_dim3{emu::S.block_base + emu::S.cur->block, 0u, 0u})
#define blockDim (emu_dim3{emu::S.threads, 1u, 1u})
#define gridDim (emu_dim3{emu::S.grid, 1u, 1u})

typedef _Float16 __half;
struct __nv_bfloat16 { uint16_t bits; };        // bfloat16 by its bits (no compiler type needed)
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half_rn(float v) { return (__half)v; }
inline float __bfloat162float(__nv_bfloat16 x) {
    uint32_t u = (uint32_t)x.bits << 16; float f; std::memcpy(&f, &u, sizeof f); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {    // round to nearest even; NaN stays NaN
    uint32_t u; std::memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
// float4 and the kernels' accesses of 4 adjacent entries (fused_cupy.VEC: 16 bytes of float32, 8 of a
// 2-byte type), which a GPU faults on unless aligned to their size
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
namespace emu {
template <class T> inline void aligned4(const T* at, const char* what) {
    if (reinterpret_cast<uintptr_t>(at) % (4 * sizeof(T)))
        fail(std::string(what) + ": an address not " + std::to_string(4 * sizeof(T)) + "-byte aligned");
}
inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
inline void narrow(float* at, float v) { *at = v; }
inline void narrow(__half* at, float v) { *at = __float2half_rn(v); }
inline void narrow(__nv_bfloat16* at, float v) { *at = __float2bfloat16_rn(v); }
}
template <class T> inline float4 load4(const T* at) {
    emu::aligned4(at, "load4");
    return make_float4(emu::widen(at[0]), emu::widen(at[1]), emu::widen(at[2]), emu::widen(at[3]));
}
template <class T> inline void store4(T* at, float4 v) {
    emu::aligned4(at, "store4");
    emu::narrow(at, v.x); emu::narrow(at + 1, v.y); emu::narrow(at + 2, v.z); emu::narrow(at + 3, v.w);
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
// __fmaf_rn: a * b + c rounded once, as a GPU's fma (the kernels use it where the compiler must
// not rewrite the expression; denormals as the process's floating-point mode has them)
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only the full-warp mask is modelled");
    return emu::shfl_xor(v, lane_mask);
}
inline void __syncthreads() { emu::wait(emu::blk().bar); }
#define expf(x) emu::counted(2, emu::gpu_expf(x))     // counted: the kernels' exp per element
#define exp2f(x) emu::counted(2, emu::gpu_exp2f(x))   // the same (fused_cupy.EXP2)
#define logf(x) emu::gpu_logf(x)
#define __logf(x) emu::gpu_fast_logf(x)

// cp.async: the copy lands at the latest moment the GPU allows, the thread's wait, so a read of
// the destination before the wait sees what was there (fresh shared memory holds NaN).
// copy_pair_async: two 2-byte entries (counted as two reads of the target, traced as one access).
inline void copy_async(float* dst, const float* src) { emu::S.cur->copies.push_back({dst, src}); }
// copy_quad_async: 4 entries, both addresses aligned to their size as cp.async of 16 (float32)
// or 8 bytes (a 2-byte type) needs; copied as 4-byte pieces at the wait
template <class T> inline void copy_quad_async(T* dst, const T* src) {
    emu::aligned4(dst, "copy_quad_async");
    emu::aligned4(src, "copy_quad_async");
    for (size_t j = 0; j < 4 * sizeof(T); j += 4)
        emu::S.cur->copies.push_back({reinterpret_cast<char*>(dst) + j, reinterpret_cast<const char*>(src) + j});
}
#define copy_pair_async(dst, src) emu::copy_pair((dst), (src), __LINE__)
namespace emu {
template <class T> inline void copy_pair(T* dst, const T* src, int line) {
    static_assert(sizeof(T) == 2, "a pair of 2-byte entries");
    S.reads[1] += 2;
    if (S.trace) record(1, line, src, 2 * sizeof(T));
    S.cur->copies.push_back({dst, src});
}
}  // namespace emu
inline void wait_copies() {
    for (auto& c : emu::S.cur->copies) std::memcpy(c.first, c.second, 4);
    emu::S.cur->copies.clear();
    emu::S.cur->groups.clear();
}
// cp.async groups (fused_cupy.PIPELINE): commit_copies closes a group of the thread's copies;
// wait_copies_but<N> lands the copies of every committed group but the N committed last
// (cp.async.wait_group N) and leaves those, and any copy not yet committed, in flight.
// prefetch_l2 (fused_cupy.L2_AHEAD): a hint to a GPU's L2 cache, here only what a GPU asks of it
// checked (a 16-byte aligned address, a positive multiple of 16 bytes) and recorded
inline void prefetch_l2(const void* at, unsigned bytes) {
    if (reinterpret_cast<uintptr_t>(at) % 16 || bytes % 16 || bytes == 0)
        emu::fail("prefetch_l2: an address not 16-byte aligned or a size not a positive multiple of 16");
    emu::S.prefetches.emplace_back(at, bytes);
}
inline void commit_copies() { emu::S.cur->groups.push_back(emu::S.cur->copies.size()); }
template <int N> inline void wait_copies_but() {
    auto& copies = emu::S.cur->copies;
    auto& groups = emu::S.cur->groups;
    if (groups.size() <= (size_t)N) return;
    const size_t landed = groups.size() - N, upto = groups[landed - 1];
    for (size_t k = 0; k < upto; k++) std::memcpy(copies[k].first, copies[k].second, 4);
    copies.erase(copies.begin(), copies.begin() + upto);
    groups.erase(groups.begin(), groups.begin() + landed);
    for (auto& end : groups) end -= upto;
}
// __syncwarp: every lane of the warp (the full mask only), with its memory ordering
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::fail("__syncwarp: only the full-warp mask is modelled");
    emu::wait(emu::blk().warp_bar[emu::S.cur->tid / 32]);
}

// blocks that meet in global memory (one fiber runs at a time: plain reads and writes are
// atomic).  A published value waits in its fiber's store buffer until the fiber's next
// __threadfence (or its end), as a GPU may let a later atomic overtake a store: a count
// announced without a fence before it shows the readers stale values.  And a block reads
// other blocks' values as they were at its own last __threadfence, as a GPU may serve those
// reads before the count they follow from: a reader without a fence after the count sees
// stale values too.
inline int take_ticket(int* counter) { return (*counter)++; }
inline void publish(float* at, float v) { emu::S.cur->stores.push_back({at, v}); }
inline void count_in(int* counter) { ++*counter; }
inline int arrivals(const int* counter) { return *counter; }
inline float load_from_other_blocks(const float* at) { return emu::load_seen(at); }
inline void pause_briefly() { emu::spin(); }
inline void __threadfence() { emu::fence(); }

namespace cooperative_groups {
struct cluster_group {
    void sync() {
        if (emu::S.cur->arrived_at >= 0) emu::fail("cluster.sync while a barrier_arrive is not waited for");
        emu::wait(emu::S.cluster_bar);
    }
    void barrier_arrive() { emu::arrive(emu::S.cluster_bar); }
    void barrier_wait() { emu::await(emu::S.cluster_bar); }
    unsigned block_rank() const { return emu::S.cur->block; }
    template <class T> T* map_shared_rank(T* p, unsigned rank) { return emu::map_rank(p, rank); }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups
