"""Data parallelism: each rank's shard with the reduce hook equals one process on the whole batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import lkref

from .dp_check import check_shards


class ThreadAllReduce:
    """An all-reduce between threads (a stand-in for ranks), built on a barrier."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size
        self.calls = [0] * size

    def hook(self, rank):
        def reduce(total, count):
            self.calls[rank] += 1
            self.slots[rank] = (float(total), float(count))
            self.barrier.wait()
            t = sum(s[0] for s in self.slots)
            c = sum(s[1] for s in self.slots)
            self.barrier.wait()                         # everyone has read before the next call
            return np.asarray(t, getattr(total, "dtype", np.float64)), np.asarray(c, getattr(count, "dtype", np.float64))
        return reduce


def test_shards_equal_the_whole_batch_with_threads_as_ranks():
    ar = ThreadAllReduce(2)
    results = [None, None]

    def rank(r):
        results[r] = check_shards(r, 2, ar.hook(r))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == [] and results[1] == [], results
    assert ar.calls[0] == ar.calls[1] > 0               # the collectives lined up


def test_negative_control_without_the_hook_the_shard_sees_only_itself():
    bad = check_shards(0, 2, None)
    assert any("loss" in b for b in bad) and any("gradient" in b for b in bad)


def test_hook_call_order_is_the_same_on_both_paths():
    z = np.random.default_rng(0).standard_normal((4, 5))
    p = np.full((4, 5), 0.2)
    for name in sorted(lkref.LOSSES):
        seen = {}
        for impl in ("reference", "auto"):
            calls = []
            lkref.LOSSES[name](z, p, impl=impl, reduce=lambda t, c: (calls.append(1), (t, c))[1])
            seen[impl] = len(calls)
        assert seen["reference"] == seen["auto"] == (2 if name == "lk_lambda" else 1)


def _mpiexec():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else shutil.which("mpiexec")


def test_two_mpi_processes_equal_one_process():
    pytest.importorskip("mpi4py")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (python -m pip install '.[mpi]')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([exe, "-n", "2", sys.executable, "-m", "tests.dp_check"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rank 0/2: OK" in out and "rank 1/2: OK" in out
