"""What the CPU goal's baseline, the direct NumPy translation (bench/peers.py, numpy-naive),
spends its time on: the README's "The ratio rests on the direct translation's time".

    python bench/cpu_baseline.py [--rows N,N,...] [--repeat R] [--quick]

1. LK^alpha's direct translation at each N (V = 32 000, float32), timed right after each of
   several neighbours (lkref's default, lkref out=, itself, a 20 ms sleep), in a seeded
   shuffled order: whether what ran before it moves its time.
2. The direct translation, lkref and lkref out= at each N, in this process and in a child
   process whose glibc keeps freed memory for reuse (MALLOC_MMAP_THRESHOLD_ and
   MALLOC_TRIM_THRESHOLD_ at 4 GiB: the translation's temporaries are then not fresh pages
   at every call): the time per row and lkref's ratio to it, both ways.

Medians of R calls; prints the machine and two tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from lkref import fused  # noqa: E402
from lkref.benchmark import git_sha, machine_name, make_problem  # noqa: E402
from cpu_threads import checked_args  # noqa: E402
from peers import numpy_naive  # noqa: E402

V = 32_000
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def _ms(f):
    t0 = time.perf_counter()
    f()
    return 1e3 * (time.perf_counter() - t0)


def _calls(N, V):
    """The three calls both parts time, on the benchmark's problem: the direct translation,
    lkref and lkref out=."""
    z, p = make_problem(np, N, V)
    out = np.empty_like(z)
    naive = numpy_naive("lk_alpha")
    return {"translation": lambda: naive(z, p),
            "lkref": lambda: fused.numpy_loss("lk_alpha", z, p),
            "lkref out=": lambda: fused.numpy_loss("lk_alpha", z, p, out=out)}


def after_neighbours(N, repeat, V=V):
    """{neighbour: p50 ms of the direct translation called right after it}."""
    calls = _calls(N, V)
    naive = calls["translation"]
    before = {"lkref": calls["lkref"], "lkref out=": calls["lkref out="], "itself": naive,
              "sleep 20 ms": lambda: time.sleep(0.02)}
    got = {k: [] for k in before}
    order = np.random.default_rng(0)
    for _ in range(repeat):
        for k in order.permutation(list(before)):
            before[k]()
            got[k].append(_ms(naive))
    return {k: float(np.median(v)) for k, v in got.items()}


def three_ms(N, repeat, V=V):
    """p50 ms of (direct translation, lkref, lkref out=), interleaved in shuffled rounds."""
    calls = list(_calls(N, V).values())
    for c in calls:
        c()
    got = [[] for _ in calls]
    order = np.random.default_rng(0)
    for _ in range(repeat):
        for i in order.permutation(len(calls)):
            got[i].append(_ms(calls[i]))
    return [float(np.median(t)) for t in got]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64,128,256,512", help="the N to time, comma-separated")
    ap.add_argument("--repeat", type=int, default=15, help="calls a median is of (default 15)")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rows = checked_args(ap, argv)
    v = 4096 if args.quick else V
    if args.child:                  # part 2's other process: one line per N
        for N in rows:
            print(N, *three_ms(N, args.repeat, v))
        return 0
    print(f"== {machine_name('numpy')}, NumPy {np.__version__}, git {git_sha()}, "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    print(f"1. the direct translation of LK^alpha (V = {v}), p50 ms right after each neighbour")
    names = None
    for N in rows:
        got = after_neighbours(N, args.repeat, v)
        if names is None:
            names = list(got)
            print(f"   {'N':>6s} " + " ".join(f"{k:>12s}" for k in names))
        print(f"   {N:6d} " + " ".join(f"{got[k]:12.2f}" for k in names))
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rows", args.rows,
                            "--repeat", str(args.repeat)] + (["--quick"] if args.quick else []),
                           env={**os.environ, **KEEP_FREED}, capture_output=True, text=True, check=True)
    kept = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in child.stdout.splitlines()}
    print(f"2. p50 ms (direct translation: us a row; lkref: x the translation), this process and one "
          f"whose glibc keeps freed memory ({' '.join(f'{k}={v}' for k, v in KEEP_FREED.items())})")
    print(f"   {'N':>6s} {'':6s} {'translation':>18s} {'lkref':>14s} {'lkref out=':>14s}")
    for N in rows:
        for label, (t_naive, t_lk, t_out) in (("here", three_ms(N, args.repeat, v)), ("kept", kept[N])):
            print(f"   {N:6d} {label:6s} {t_naive:8.2f} ({1e3 * t_naive / N:5.0f} us) "
                  f"{t_lk:7.2f} ({t_lk / t_naive:.2f}x) {t_out:7.2f} ({t_out / t_naive:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
