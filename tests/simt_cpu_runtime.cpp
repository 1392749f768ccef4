// The runtime of tests/simt_cpu.h: the scheduler, barriers, shuffles, shared memory, the
// cluster exchange, the meeting blocks' memory model and the traffic count. tests/simt_cpu.py
// builds it once per test process into a shared library that every kernel variant links to,
// so that a variant's build compiles only the kernel and its launcher: 0.27 s on the 2-core CI
// machine, against 1.3 s with all of this inline in the header.  See the header for what it models.
#include "simt_cpu.h"
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace emu {

State S;

// A traced global access (emu::noted when tracing): which warp instruction it is part of, and its sector.
void record(int kind, int line, const void* at, long bytes) {
    auto& ex = S.cur->executions;
    auto it = std::find_if(ex.begin(), ex.end(), [line](const std::pair<int, long>& e) { return e.first == line; });
    if (it == ex.end()) it = ex.insert(ex.end(), {line, 0});
    S.accesses.push_back(Access{{kind, (long)(S.block_base + S.cur->block), (long)(S.cur->tid / 32), line,
                                 it->second++, (long)(reinterpret_cast<uintptr_t>(at) / 32)}, bytes});
}

// The traced accesses per kind (0, 1, 2): out[2 kind] the bytes asked for, out[2 kind + 1] the
// 32-byte sectors touched, summed over the warp instructions.
void traffic(long* out) {
    auto by_key = [](const Access& a, const Access& b) { return a.key < b.key; };
    std::sort(S.accesses.begin(), S.accesses.end(), by_key);
    std::fill(out, out + 6, 0L);
    for (size_t i = 0; i < S.accesses.size(); i++) {
        const Access& a = S.accesses[i];
        out[2 * a.key[0]] += a.bytes;
        if (i == 0 || a.key != S.accesses[i - 1].key) out[2 * a.key[0] + 1]++;
    }
}

static void make_ready(unsigned i) {
    Fiber& f = S.fibers[i];
    S.ready.push({S.sticky ? f.priority : (uint32_t)S.rng(), i});
}
static unsigned self() { return (unsigned)(S.cur - S.fibers.data()); }
// A switch to the scheduler and back: _setjmp / _longjmp, which, unlike swapcontext, leave the
// signal mask alone (two system calls per switch) and so switch some ten times faster; the
// floating-point control state (flush to zero) is the thread's and stays as set.
void yield() {
    if (_setjmp(S.cur->jb) == 0) _longjmp(S.sched_jb, 1);
}
void fail(const std::string& why) {
    if (S.error.empty()) S.error = why;
    for (;;) yield();                         // the scheduler stops at the first error
}
Block& blk() { return S.blocks[S.cur->block]; }

static void release(Barrier& b) {            // the last arrival ends the phase and frees the waiters
    b.arrived = 0;
    b.phase++;
    for (unsigned i : b.waiters) make_ready(i);
    b.waiters.clear();
}
void wait(Barrier& b) {
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
void arrive(Barrier& b) {
    if (S.cur->arrived_at >= 0) fail("barrier_arrive: a second arrival before barrier_wait");
    S.cur->arrived_at = b.phase;
    if (++b.arrived == b.count) release(b);
    make_ready(self());                       // others may run on before this thread goes on
    yield();
}
void await(Barrier& b) {
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

float shfl_xor(float v, int lane_mask) {
    Block& B = blk();
    unsigned t = S.cur->tid;
    B.slots[t] = v;
    wait(B.warp_bar[t / 32]);
    float r = B.slots[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)];
    wait(B.warp_bar[t / 32]);                 // nobody writes its slot again before all have read
    return r;
}

// A spin loop's pause: the fiber waits until every ready fiber has had its turn.
void spin() {
    S.spinning.push_back(self());
    yield();
}

static Alloc* find(Block& B, const std::string& name) {
    for (auto& a : B.shared) if (a.name == name) return &a;
    return nullptr;
}

void* shared_bytes(Block& B, const char* name, size_t bytes, bool dynamic) {
    Alloc* a = find(B, name);
    if (a && a->mem.size() < bytes)           // two declarations of one name (template instances)
        fail(std::string("shared: '") + name + "' declared again with a larger size");
    if (!a) {
        B.shared.push_back(Alloc{name, std::vector<char>(bytes, (char)0xff), dynamic});
        a = &B.shared.back();
    }
    return a->mem.data();
}
static void note_static_smem() {              // of the blocks that have run
    for (auto& B : S.blocks) {
        size_t bytes = 0;
        for (auto& a : B.shared) if (!a.dynamic) bytes += a.mem.size();
        S.static_smem = std::max(S.static_smem, bytes);
    }
}

void* map_rank_bytes(void* p, unsigned rank) {
    if (rank >= S.blocks.size()) fail("map_shared_rank: rank " + std::to_string(rank) + " outside the cluster");
    Block& me = blk();
    for (auto& a : me.shared) {
        char* base = a.mem.data();
        char* c = static_cast<char*>(p);
        if (c >= base && c < base + a.mem.size()) {
            Block& other = S.blocks[rank];
            if (other.live == 0) fail("map_shared_rank: block " + std::to_string(rank) + " has exited");
            char* ob = static_cast<char*>(shared_bytes(other, a.name.c_str(), a.mem.size(), a.dynamic));
            return ob + (c - base);
        }
    }
    fail("map_shared_rank: the pointer is not in this block's shared memory");
}

static void drain_stores() {
    for (auto& st : S.cur->stores) {
        S.history[st.first].push_back({++S.store_seq, *st.first});
        *st.first = st.second;
    }
    S.cur->stores.clear();
}

// A read of another block's published value: what it was when the reading block last fenced
// (the first value replaced by a store drained after that), as a GPU may serve a read that no
// fence orders after the count it follows from before the value arrives.
float load_seen(const float* at) {
    auto h = S.history.find(at);
    if (h != S.history.end())
        for (auto& [seq, before] : h->second)
            if (seq > blk().seen) return before;
    return *at;
}
void fence() {
    drain_stores();
    blk().seen = S.store_seq;
}

static void entry() {
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

static void start_block(unsigned b) {
    for (unsigned t = 0; t < S.threads; t++) make_ready(b * S.threads + t);
}

// Runs body on grid blocks of `threads` threads, `cluster` blocks at a time, or with resident
// > 0 all blocks as one set, at most `resident` at once.  Returns 0, or 1 with the reason in S.error.
int run(unsigned grid, unsigned threads, unsigned cluster, unsigned seed, std::function<void()> body,
        unsigned resident) {
    S.body = std::move(body);
    S.threads = threads;
    S.grid = grid;
    S.error.clear();
    S.reads[0] = S.reads[1] = S.reads[2] = 0;
    S.prefetches.clear();
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
