// Runs a CUDA kernel's source on the CPU: every CUDA thread is a fiber (its own stack from
// makecontext, switched with _setjmp / _longjmp), and the
// fibers of one thread-block cluster switch at each barrier and shuffle, in a seeded order.
//
// What it models: __syncthreads, __shfl_xor_sync and __syncwarp (all 32 lanes must take part),
// cp.async (copy_async, copy_pair_async / wait_copies: the copy happens at the wait), static and
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
// What it does not model: timing, the memory model beyond barriers and the meeting blocks'
// fences (the two orders above: no other reordering, no stale cache line), register limits,
// launch limits (tests/simt_cpu.py checks those it knows), and the GPU's exact expf/logf
// rounding.
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
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
    unsigned block_base = 0, threads = 0;
    std::function<void()> body;
    std::string error;
    long reads[3] = {0, 0, 0};                // global reads of z and p counted by the harness's rewrite, expf calls
    size_t dynamic_smem = 0;                  // bytes of extern __shared__ memory per block
    size_t static_smem = 0;                   // bytes of static __shared__ memory of the largest block
    bool trace = false;
    std::vector<Access> accesses;             // when tracing
    long store_seq = 0;                       // published stores drained so far in this launch
    std::unordered_map<const float*, std::vector<std::pair<long, float>>> history;   // per address:
                                              // (number of each drained store, the value it replaced)
};
static State S;

template <class T> inline T counted(int which, T value) { S.reads[which]++; return value; }

// A global access at line `line` of kind 0 (logits), 1 (target) or 2 (gradient store): counts
// the reads, records the access when tracing, and returns the address.
__attribute__((noinline)) inline void record(int kind, int line, const void* at, long bytes) {
    auto& ex = S.cur->executions;
    auto it = std::find_if(ex.begin(), ex.end(), [line](const std::pair<int, long>& e) { return e.first == line; });
    if (it == ex.end()) it = ex.insert(ex.end(), {line, 0});
    S.accesses.push_back(Access{{kind, (long)(S.block_base + S.cur->block), (long)(S.cur->tid / 32), line,
                                 it->second++, (long)(reinterpret_cast<uintptr_t>(at) / 32)}, bytes});
}
template <class T> inline T* noted(int kind, int line, T* at) {
    if (kind < 2) S.reads[kind]++;
    if (S.trace) record(kind, line, at, (long)sizeof(T));
    return at;
}

// The traced accesses per kind (0, 1, 2): out[2 kind] the bytes asked for, out[2 kind + 1] the
// 32-byte sectors touched, summed over the warp instructions.
inline void traffic(long* out) {
    auto by_key = [](const Access& a, const Access& b) { return a.key < b.key; };
    std::sort(S.accesses.begin(), S.accesses.end(), by_key);
    std::fill(out, out + 6, 0L);
    for (size_t i = 0; i < S.accesses.size(); i++) {
        const Access& a = S.accesses[i];
        out[2 * a.key[0]] += a.bytes;
        if (i == 0 || a.key != S.accesses[i - 1].key) out[2 * a.key[0] + 1]++;
    }
}

inline void make_ready(unsigned i) {
    Fiber& f = S.fibers[i];
    S.ready.push({S.sticky ? f.priority : (uint32_t)S.rng(), i});
}
inline unsigned self() { return (unsigned)(S.cur - S.fibers.data()); }
// A switch to the scheduler and back: _setjmp / _longjmp, which, unlike swapcontext, leave the
// signal mask alone (two system calls per switch) and so switch some ten times faster; the
// floating-point control state (flush to zero) is the thread's and stays as set.
inline void yield() {
    if (_setjmp(S.cur->jb) == 0) _longjmp(S.sched_jb, 1);
}
inline void fail(const std::string& why) {
    if (S.error.empty()) S.error = why;
    for (;;) yield();                         // the scheduler stops at the first error
}
inline Block& blk() { return S.blocks[S.cur->block]; }

inline void release(Barrier& b) {            // the last arrival ends the phase and frees the waiters
    b.arrived = 0;
    b.phase++;
    for (unsigned i : b.waiters) make_ready(i);
    b.waiters.clear();
}
inline void wait(Barrier& b) {
    if (++b.arrived == b.count) {
        release(b);
        make_ready(self());
    } else {
        b.waiters.push_back(self());
    }
    yield();
}
// A barrier split in two (barrier.cluster.arrive, then .wait): the arrival counts at once, and
// the wait returns once every thread has arrived in that phase.
inline void arrive(Barrier& b) {
    if (S.cur->arrived_at >= 0) fail("barrier_arrive: a second arrival before barrier_wait");
    S.cur->arrived_at = b.phase;
    if (++b.arrived == b.count) release(b);
    make_ready(self());                       // others may run on before this thread goes on
    yield();
}
inline void await(Barrier& b) {
    long at = S.cur->arrived_at;
    if (at < 0) fail("barrier_wait: no barrier_arrive before it");
    S.cur->arrived_at = -1;
    if (b.phase > at) {                       // all have arrived: go on, after letting others run
        make_ready(self());
    } else {
        b.waiters.push_back(self());
    }
    yield();
}

inline float shfl_xor(float v, int lane_mask) {
    Block& B = blk();
    unsigned t = S.cur->tid;
    B.slots[t] = v;
    wait(B.warp_bar[t / 32]);
    float r = B.slots[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)];
    wait(B.warp_bar[t / 32]);                 // nobody writes its slot again before all have read
    return r;
}

// A spin loop's pause: the fiber waits until every ready fiber has had its turn.
inline void spin() {
    S.spinning.push_back(self());
    yield();
}

inline Alloc* find(Block& B, const std::string& name) {
    for (auto& a : B.shared) if (a.name == name) return &a;
    return nullptr;
}

template <class T> T* shared_in(Block& B, const char* name, size_t count, bool dynamic = false) {
    Alloc* a = find(B, name);
    if (a && a->mem.size() < count * sizeof(T))      // two declarations of one name (template instances)
        fail(std::string("shared: '") + name + "' declared again with a larger size");
    if (!a) {
        B.shared.push_back(Alloc{name, std::vector<char>(count * sizeof(T), (char)0xff), dynamic});
        a = &B.shared.back();
    }
    return reinterpret_cast<T*>(a->mem.data());
}
template <class T> T* shared(const char* name, size_t count, bool dynamic = false) {
    return shared_in<T>(blk(), name, count, dynamic);
}
inline void note_static_smem() {              // of the blocks that have run
    for (auto& B : S.blocks) {
        size_t bytes = 0;
        for (auto& a : B.shared) if (!a.dynamic) bytes += a.mem.size();
        S.static_smem = std::max(S.static_smem, bytes);
    }
}

template <class T> T* map_rank(T* p, unsigned rank) {
    if (rank >= S.blocks.size()) fail("map_shared_rank: rank " + std::to_string(rank) + " outside the cluster");
    Block& me = blk();
    for (auto& a : me.shared) {
        char* base = a.mem.data();
        char* c = reinterpret_cast<char*>(p);
        if (c >= base && c < base + a.mem.size()) {
            Block& other = S.blocks[rank];
            if (other.live == 0) fail("map_shared_rank: block " + std::to_string(rank) + " has exited");
            char* ob = reinterpret_cast<char*>(shared_in<char>(other, a.name.c_str(), a.mem.size()));
            return reinterpret_cast<T*>(ob + (c - base));
        }
    }
    fail("map_shared_rank: the pointer is not in this block's shared memory");
    return nullptr;
}

inline void drain_stores() {
    for (auto& st : S.cur->stores) {
        S.history[st.first].push_back({++S.store_seq, *st.first});
        *st.first = st.second;
    }
    S.cur->stores.clear();
}

// A read of another block's published value: what it was when the reading block last fenced
// (the first value replaced by a store drained after that), as a GPU may serve a read that no
// fence orders after the count it follows from before the value arrives.
inline float load_seen(const float* at) {
    auto h = S.history.find(at);
    if (h != S.history.end())
        for (auto& [seq, before] : h->second)
            if (seq > blk().seen) return before;
    return *at;
}
inline void fence() {
    drain_stores();
    blk().seen = S.store_seq;
}

inline void entry() {
    S.body();
    if (S.cur->arrived_at >= 0) fail("a thread exits with a barrier_arrive it never waited for");
    drain_stores();                           // all stores are visible once the kernel ends
    S.cur->done = true;
    blk().live--;
    _longjmp(S.sched_jb, 1);                  // back to the loop that ran it: entry never returns
}

// Single-precision denormals flushed to zero, results and inputs, as on a GPU under
// -ftz=true, for as long as it lives: SSE's FTZ and DAZ bits on x86, FPCR.FZ on AArch64
// (not tried: no such machine here); elsewhere nothing (tests/simt_cpu.py: FLUSHES_DENORMALS).
#if defined(__x86_64__) || defined(__i386__)
struct FlushDenormals {
    unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
    ~FlushDenormals() { _mm_setcsr(saved); }
};
#elif defined(__aarch64__)
struct FlushDenormals {
    uint64_t saved;
    FlushDenormals() {
        asm volatile("mrs %0, fpcr" : "=r"(saved));
        uint64_t on = saved | (1ull << 24);
        asm volatile("msr fpcr, %0" : : "r"(on));
    }
    ~FlushDenormals() { asm volatile("msr fpcr, %0" : : "r"(saved)); }
};
#else
struct FlushDenormals {};
#endif

inline void start_block(unsigned b) {
    for (unsigned t = 0; t < S.threads; t++) make_ready(b * S.threads + t);
}

// Runs body on grid blocks of `threads` threads, `cluster` blocks at a time, or with resident
// > 0 all blocks as one set, at most `resident` at once.  Returns 0, or 1 with the reason in S.error.
inline int run(unsigned grid, unsigned threads, unsigned cluster, unsigned seed, std::function<void()> body,
               unsigned resident = 0) {
    S.body = std::move(body);
    S.threads = threads;
    S.error.clear();
    S.reads[0] = S.reads[1] = S.reads[2] = 0;
    S.accesses.clear();
    S.static_smem = 0;
    S.blocks.clear();
    S.store_seq = 0;
    S.history.clear();
    if (threads == 0 || threads % 32 || threads > 1024 || cluster == 0 || grid % cluster) {
        S.error = "launch: threads must be a multiple of 32 up to 1024, and grid a multiple of the cluster size";
        return 1;
    }
    S.rng.seed(seed);
    S.sticky = seed % 2 == 0;
    FlushDenormals ftz;                       // as CuPy compiles every kernel: -ftz=true
    const size_t stack_bytes = 64 * 1024;
    if (resident) cluster = grid;             // one set: the whole grid
    const size_t n = (size_t)threads * cluster;
    std::unique_ptr<char[]> stacks(new char[n * stack_bytes]);   // not zeroed: pages stay untouched until used
    for (unsigned c0 = 0; c0 < grid; c0 += cluster) {
        S.block_base = c0;
        note_static_smem();
        S.blocks.assign(cluster, Block{});
        for (auto& B : S.blocks) {
            B.bar.count = (int)threads;
            B.warp_bar.assign(threads / 32, Barrier{32, 0, {}});
            B.slots.assign(threads, 0.f);
            B.live = (int)threads;
        }
        S.cluster_bar = Barrier{(int)n, 0, {}};
        S.fibers.assign(n, Fiber{});
        S.ready = {};
        for (size_t i = 0; i < n; i++) {
            Fiber& f = S.fibers[i];
            f.block = (unsigned)(i / threads);
            f.tid = (unsigned)(i % threads);
            f.priority = (uint32_t)S.rng();
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks.get() + i * stack_bytes;
            f.ctx.uc_stack.ss_size = stack_bytes;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, entry, 0);
        }
        std::vector<unsigned> order(cluster);  // the blocks in the order they start
        std::iota(order.begin(), order.end(), 0u);
        if (resident) std::shuffle(order.begin(), order.end(), S.rng);
        size_t started = resident ? std::min<size_t>(resident, cluster) : cluster;
        for (size_t b = 0; b < started; b++) start_block(order[b]);
        S.spinning.clear();
        S.idle_spins = 0;
        size_t finished = 0;
        while (!S.ready.empty() || !S.spinning.empty()) {
            unsigned i;
            if (!S.ready.empty()) {
                i = S.ready.top().second;
                S.ready.pop();
                S.idle_spins = 0;
            } else {                          // only spinning fibers: each gets its turn to look
                i = S.spinning.front();
                S.spinning.pop_front();
                if (++S.idle_spins > 4 * (long)n + 100) {
                    S.error = "deadlock: blocks wait in a spin loop that nothing ends (block "
                              + std::to_string(S.block_base + S.fibers[i].block) + " waits)";
                    return 1;
                }
            }
            S.cur = &S.fibers[i];
            if (_setjmp(S.sched_jb) == 0) {   // the fiber comes back here when it yields or ends
                if (!S.cur->started) {
                    S.cur->started = true;
                    setcontext(&S.cur->ctx);
                } else {
                    _longjmp(S.cur->jb, 1);
                }
            }
            if (!S.error.empty()) return 1;
            if (S.cur->done) {
                finished++;
                if (S.blocks[S.cur->block].live == 0 && started < cluster) start_block(order[started++]);
            }
        }
        if (finished != n) {
            S.error = "deadlock: a barrier or shuffle that not every thread reaches (block "
                      + std::to_string(c0) + ", " + std::to_string(n - finished) + " threads stuck)";
            return 1;
        }
    }
    note_static_smem();
    return 0;
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
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only the full-warp mask is modelled");
    return emu::shfl_xor(v, lane_mask);
}
inline void __syncthreads() { emu::wait(emu::blk().bar); }
#define expf(x) emu::counted(2, ::expf(x))       // counted: the kernels' exp per element

// cp.async: the copy lands at the latest moment the GPU allows, the thread's wait, so a read of
// the destination before the wait sees what was there (fresh shared memory holds NaN).
// copy_pair_async: two 2-byte entries (counted as two reads of the target, traced as one access).
inline void copy_async(float* dst, const float* src) { emu::S.cur->copies.push_back({dst, src}); }
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
