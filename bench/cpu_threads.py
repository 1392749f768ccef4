"""Where the CPU fast path's second thread goes: the measurements behind the README's "Threads"
point (two threads run about 1.5x faster than one).

    python bench/cpu_threads.py [--repeat R] [--rows N,N,...] [--quick]

1. LK^alpha (N = 512 or each N of --rows, V = 32 000, float32, out=) on one thread, on two, and
   on one thread in each of two processes at once (the same work twice, with no GIL between
   them).  Where the two processes each keep their one-thread time, memory is not what holds
   the two threads back.
2. One NumPy call (np.exp over n float32s) looped in one thread, then in two threads at once,
   each doing the same loop: the share of its one-thread speed each thread keeps, against the
   call's length.  A NumPy call gives the GIL up when its loop starts and takes it back when it
   ends; where the other thread holds it then, the first waits, and is woken late.

Prints the machine and a table; the README's figures come from it.  Medians of R rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lkref import fused  # noqa: E402
from lkref.benchmark import git_sha, machine_name, make_problem  # noqa: E402


def _loss_ms(N, V, threads, repeat, barrier=None):
    """p50 of `repeat` calls of LK^alpha with out=, in ms (after one untimed call), on the
    benchmark's problem."""
    z, p = make_problem(np, N, V)
    out = np.empty_like(z)
    fused.numpy_loss("lk_alpha", z, p, out=out, threads=threads)
    if barrier is not None:
        barrier.wait()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fused.numpy_loss("lk_alpha", z, p, out=out, threads=threads)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _in_process(N, V, repeat, barrier, queue):
    queue.put(_loss_ms(N, V, 1, repeat, barrier))


def two_processes_ms(N, V, repeat):
    """The one-thread p50 of each of two processes that run at the same time."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_in_process, args=(N, V, repeat, barrier, queue)) for _ in range(2)]
    for pr in procs:
        pr.start()
    got = [queue.get(timeout=600) for _ in procs]
    for pr in procs:
        pr.join()
    return got


def call_loop_s(n, calls, threads):
    """Seconds for `threads` threads each running `calls` np.exp over n float32s at once."""
    x = np.random.default_rng(0).random(n, dtype=np.float32)

    def work():
        out = np.empty_like(x)
        for _ in range(calls):
            np.exp(x, out=out)
    ts = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def call_length_us(n):
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    out = np.empty_like(x)
    t0 = time.perf_counter()
    for _ in range(200):
        np.exp(x, out=out)
    return 1e6 * (time.perf_counter() - t0) / 200


def checked_args(ap, argv):
    """ap's arguments, with --repeat (>= 1) and --rows (a list of N >= 1) checked; shared with
    cpu_baseline.py.  Returns (args, rows)."""
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    try:
        rows = [int(x) for x in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        ap.error(f"--rows must be whole numbers of rows, 1 or more, comma-separated, got {args.rows!r}")
    return args, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--rows", default="512", help="part 1's N, comma-separated (default 512)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args, rows = checked_args(ap, argv)
    rows, V = ([16], 4096) if args.quick else (rows, 32_000)
    sizes = (8_000, 48_000) if args.quick else (8_000, 24_000, 48_000, 96_000, 192_000, 384_000)
    calls = 20 if args.quick else 400
    print(f"== {machine_name('numpy')}, Python {platform.python_version()}, NumPy {np.__version__}, "
          f"git {git_sha()}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    for N in rows:
        one = _loss_ms(N, V, 1, args.repeat)
        two = _loss_ms(N, V, 2, args.repeat)
        procs = two_processes_ms(N, V, args.repeat)
        print(f"1. LK^alpha N = {N}, V = {V}, float32, out= (p50 of {args.repeat}, ms)")
        print(f"   one thread                        {one:8.2f}")
        print(f"   two threads                       {two:8.2f}   ({one / two:.2f}x one thread)")
        print(f"   one thread in each of 2 processes {procs[0]:8.2f} {procs[1]:8.2f}   "
              f"(each {one / max(procs):.2f}x of its time alone: the same work twice, no shared GIL)")
    rounds = 2 if args.quick else 7
    print(f"2. np.exp over n float32s, {calls} calls a thread; two threads at once each keep this share "
          f"of one thread's speed (median and range of {rounds} alternating rounds: this VM is noisy)")
    print(f"   {'n':>8s} {'call (us)':>10s} {'kept':>6s}  range")
    for n in sizes:
        kept = []
        for _ in range(rounds):
            t1 = call_loop_s(n, calls, 1)
            kept.append(t1 / call_loop_s(n, calls, 2))
        print(f"   {n:8d} {call_length_us(n):10.1f} {np.median(kept):6.2f}  {min(kept):.2f}-{max(kept):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
