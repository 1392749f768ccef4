"""python -m lkref bench, on tiny sizes: rows, CSV, and refusing to time a path that is wrong."""

from __future__ import annotations

import csv

import numpy as np

import lkref
from lkref import benchmark, fused


def test_rows_and_csv(tmp_path):
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("lk_alpha",), sizes=[(8, 300)], repeat=2,
                         with_peers=True, say=lines.append, skip_peers=("torch-compile",))
    impls = {r.impl for r in rows}
    assert {"lkref", "lkref out=", "lkref reference", "numpy-naive"} <= impls
    assert all(r.p20_ms <= r.p50_ms <= r.p80_ms for r in rows)
    assert all(r.max_rel_err < 1e-4 for r in rows)
    naive = next(r for r in rows if r.impl == "numpy-naive")
    assert naive.vs_baseline == 1.0
    path = tmp_path / "b.csv"
    benchmark.write_csv(rows, str(path), ["numpy"])
    got = list(csv.DictReader(open(path)))
    assert len(got) == len(rows) and got[0]["machine"] and got[0]["git_sha"] and "numpy=" in got[0]["versions"]


def test_a_fast_path_that_differs_is_not_timed(monkeypatch):
    real = fused.numpy_loss

    def wrong(*a, **k):
        r = real(*a, **k)
        r.grad[...] *= 1.01
        return r
    monkeypatch.setattr(fused, "numpy_loss", wrong)
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("tv",), sizes=[(4, 100)], repeat=2, with_peers=False,
                         say=lines.append)
    assert not any(r.impl.startswith("lkref") and r.impl != "lkref reference" for r in rows)
    assert any("differs from the reference" in line for line in lines)


def test_peers_agree_with_lkref():
    mod = benchmark.load_peers()
    assert mod is not None
    z, p = benchmark.make_problem(np, 6, 50)
    for name in sorted(lkref.LOSSES):
        loss, grad = mod.numpy_naive(name)(z, p)
        ref = lkref.LOSSES[name](z, p, impl="reference")
        np.testing.assert_allclose(grad, ref.grad, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(loss, ref.loss, rtol=1e-5)


def test_verify_scaling_runs():
    lines = []
    rows = benchmark.verify_scaling(B=4, V=50, ks=(1, 3), repeat=2, say=lines.append)
    assert [r[0] for r in rows] == [1, 3] and all(r[1] > 0 and r[2] > 0 for r in rows)
