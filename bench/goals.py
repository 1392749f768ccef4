"""Issue #5's speed goals, checked against the CSV rows of `python -m lkref bench`.

    python bench/goals.py bench/results/*.csv

Rows of one run share their machine and `time` stamp; each run is checked on its own, so a
ratio is always between rows measured in the same run.  Printed as markdown tables:

  CPU (numpy, N = 512, V = 32 000)
    LK^alpha p50 <= 0.30 x numpy-naive's p50;  peak extra memory <= 1.25 x the gradient
    (every loss, lkref and lkref out=)
  GPU (cupy, N = 4096)
    LK^alpha ("lkref fused") p50 <= 0.75 ms at V = 32 000 and <= 3.0 ms at V = 128 256;
    LK^lambda p50 <= 1.5 x LK^alpha's (with its batch lambda, and with lam= given);
    extra memory O(N), checked as <= 1 KiB per row (a row of the gradient is 4 V bytes)
  Peers: every peer's p50 beside lkref's in the same run, and their ratio.
  Launch shapes (GPU): LK^alpha's p50 in every shape the run timed ("fused <T>t/<S>k"),
  fastest first, against the default's: the one to make the default if it wins.  "fused
  global-meet" is not a shape but the exchange GPUs without clusters use, timed on a GPU
  with clusters: what meeting in global memory costs against the cluster.

The speed goals are for float32 inputs: rows of another dtype (`--dtype float16`) are checked
for the memory goal only, and compared with peers of their own dtype.
A goal whose rows are missing from a run is not listed for that run.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

CPU_SIZE = (512, 32_000)
GPU_MS = {32_000: 0.75, 128_256: 3.0}
GPU_N = 4096


def read(paths):
    """{(machine, time): [row dicts]} from the CSV files, in file order."""
    runs = defaultdict(list)
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                runs[(row["machine"], row["time"])].append(row)
    return runs


def _dtype(row):
    return row.get("dtype") or "float32"


def _p50(rows, impl, loss, N, V, dtype="float32"):
    for r in rows:
        if r["impl"] == impl and r["loss"] == loss and int(r["N"]) == N and int(r["V"]) == V and _dtype(r) == dtype:
            return float(r["p50_ms"])
    return None


def goals(rows):
    """[(goal, measured, met)] for one run's rows."""
    out = []
    backend = rows[0]["backend"]
    if backend == "numpy":
        N, V = CPU_SIZE
        fast, naive = _p50(rows, "lkref", "lk_alpha", N, V), _p50(rows, "numpy-naive", "lk_alpha", N, V)
        if fast is not None and naive is not None:
            out.append((f"CPU LK^α N={N} V={V}: ≤ 0.30× the direct NumPy translation",
                        f"{fast:.1f} / {naive:.1f} ms = {fast / naive:.3f}×", fast / naive <= 0.30))
        grad_mib = N * V * 4 / 2**20
        for r in rows:
            if r["impl"] in ("lkref", "lkref out=") and (int(r["N"]), int(r["V"])) == CPU_SIZE and _dtype(r) == "float32":
                extra = float(r["peak_extra_MiB"])
                out.append((f"CPU {r['loss']} ({r['impl']}): extra memory ≤ 1.25× the gradient",
                            f"{extra:.1f} MiB = {extra / grad_mib:.3f}×", extra <= 1.25 * grad_mib))
        return out
    for V, limit in GPU_MS.items():
        alpha = _p50(rows, "lkref fused", "lk_alpha", GPU_N, V)
        if alpha is not None:
            out.append((f"GPU LK^α N={GPU_N} V={V}: ≤ {limit} ms", f"{alpha:.3f} ms", alpha <= limit))
            for impl, what in (("lkref fused", "batch λ, two launches"), ("lkref fused lam=", "lam= given")):
                lam = _p50(rows, impl, "lk_lambda", GPU_N, V)
                if lam is not None:
                    out.append((f"GPU LK^λ V={V} ({what}): ≤ 1.5× LK^α",
                                f"{lam:.3f} ms = {lam / alpha:.2f}×", lam / alpha <= 1.5))
    for r in rows:
        if r["impl"].startswith("lkref fused") and int(r["N"]) == GPU_N:
            per_row = float(r["peak_extra_MiB"]) * 2**20 / GPU_N
            kind = "" if _dtype(r) == "float32" else f", {_dtype(r)}"
            out.append((f"GPU {r['loss']} V={r['V']} ({r['impl']}{kind}): extra memory O(N) (≤ 1 KiB per row)",
                        f"{float(r['peak_extra_MiB']):.2f} MiB = {per_row:.0f} B per row", per_row <= 1024))
    return out


def peers(rows):
    """[(loss, N, V, peer, peer p50, lkref p50, peer / lkref)] for one run's rows."""
    mine = {"numpy": "lkref", "cupy": "lkref fused"}
    out = []
    for r in rows:
        if r["impl"].startswith("lkref") or r["impl"].startswith("fused "):
            continue
        N, V = int(r["N"]), int(r["V"])
        base = _p50(rows, mine.get(r["backend"], "lkref"), r["loss"], N, V, _dtype(r))
        if base is not None:
            out.append((r["loss"], N, V, r["impl"], float(r["p50_ms"]), base, float(r["p50_ms"]) / base))
    return out


def shapes(rows):
    """[(V, dtype, shape, p50, p50 / default's p50)] for LK^alpha at N = 4096, fastest first per V
    and dtype (the launch shapes are timed in float32; with 2-byte arrays, one column at a time
    and the 2-byte pairs, beside the default's 4 adjacent entries an 8-byte access)."""
    out = []
    for dtype in sorted({_dtype(r) for r in rows}, key=lambda d: d != "float32"):
        for V in GPU_MS:
            default = _p50(rows, "lkref fused", "lk_alpha", GPU_N, V, dtype)
            timed = sorted((float(r["p50_ms"]), r["impl"]) for r in rows
                           if r["impl"].startswith("fused ") and r["loss"] == "lk_alpha"
                           and int(r["N"]) == GPU_N and int(r["V"]) == V and _dtype(r) == dtype)
            if default is not None:
                out += [(V, dtype, impl, t, t / default) for t, impl in sorted(timed + [(default, "default")])]
    return out


def logs(rows):
    """[(loss, V, default p50, 'fused logf' p50)] at N = 4096: KL, and LK^lambda with lam=, with
    __logf below p = 0.5 (the default) and with logf for every log p."""
    out = []
    for loss, default, logf in (("kl", "lkref fused", "fused logf"), ("lk_lambda", "lkref fused lam=", "fused logf lam=")):
        for V in GPU_MS:
            a, b = _p50(rows, default, loss, GPU_N, V), _p50(rows, logf, loss, GPU_N, V)
            if a is not None and b is not None:
                out.append((loss, V, a, b))
    return out


def _exists(path, say):
    if not os.path.isfile(path):
        say(f"{path}: no such file (did the benchmark run?)")
        return False
    return True


def report(paths, say=print) -> bool:
    """Print every run's goals and peer ratios; True when every goal listed is met."""
    runs = read([p for p in paths if _exists(p, say)])
    if not runs:
        say("no benchmark rows to check")
        return False
    all_met = True
    by_goal = defaultdict(list)                      # (machine, git sha, goal) -> [met] over the runs
    for (machine, stamp), rows in runs.items():
        say(f"\n### {machine}, {stamp}, git {rows[0]['git_sha']}\n")
        checked = goals(rows)
        if checked:
            say("| goal | measured | met |\n|---|---|---|")
            for goal, measured, met in checked:
                say(f"| {goal} | {measured} | {'yes' if met else '**no**'} |")
                all_met &= met
                by_goal[(machine, rows[0]["git_sha"], goal)].append(met)
        logf = logs(rows)
        if logf:
            say(f"\n| loss (N = {GPU_N}) | V | default: __logf below p = 0.5 (ms) | logf for every p (ms) | logf / default |"
                "\n|---|---|---|---|---|")
            for loss, V, a, b in logf:
                say(f"| {loss} | {V} | {a:.3f} | {b:.3f} | {b / a:.2f}× |")
        ratios = peers(rows)
        if ratios:
            say("\n| loss | N | V | peer | peer p50 (ms) | lkref p50 (ms) | peer / lkref |\n|---|---|---|---|---|---|---|")
            for loss, N, V, peer, t, base, ratio in ratios:
                say(f"| {loss} | {N} | {V} | {peer} | {t:.3f} | {base:.3f} | {ratio:.2f}× |")
        timed = shapes(rows)
        if len(timed) > len({(V, dtype) for V, dtype, *_ in timed}):      # more than the defaults alone
            say(f"\n| V | dtype | launch shape (LK^α, N = {GPU_N}) | p50 (ms) | / default |\n|---|---|---|---|---|")
            for V, dtype, impl, t, ratio in timed:
                say(f"| {V} | {dtype} | {impl} | {t:.3f} | {ratio:.2f}× |")
        elif not checked and not ratios and not logf:
            sizes = ", ".join(sorted({f"{r['loss']} N={r['N']} V={r['V']} {_dtype(r)}" for r in rows}))
            say(f"no goal applies to these rows ({sizes}): the goals are for float32 at the goal sizes")
    repeated = {key: mets for key, mets in by_goal.items() if len(mets) > 1}
    if repeated:
        say("\n### Over the runs of each commit\n\n| machine | git | goal | met in |\n|---|---|---|---|")
        for (machine, sha, goal), mets in repeated.items():
            say(f"| {machine} | {sha} | {goal} | {sum(mets)} of {len(mets)} runs |")
    return all_met


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(0 if report(sys.argv[1:]) else 1)
