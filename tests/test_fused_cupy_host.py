"""The CuPy fused path, run on the CPU: NumPy stands in for CuPy, and two stand-ins for the
compiled kernel:

- "transcription": a NumPy transcription of lk_rows (one row per block, the same phases,
  formulas and stats layout), which checks the host logic: the launch arguments, the phase
  logic, the row losses, lambda, the reduce hook, draft_to_target, the LK^alpha fallback and
  the input flags;
- "simt": the kernel's own CUDA source, built with g++ against tests/simt_cpu.h, which runs
  every CUDA thread as a fiber with real barriers, warp shuffles, shared memory,
  thread-block clusters and blocks that meet in global memory (those run as a GPU may run
  them: few blocks live, started in a random order) under two schedules, with guard zones
  around the arrays, launched through fused_cupy's own _kernel with each argument checked
  against its parameter's C type as CuPy passes it and its shared memory as CUDA counts it,
  and with its global reads and stores counted and, where asked, grouped into warp accesses
  to measure how they coalesce.  This checks the kernel's indexing, reductions and exchanges
  between blocks without a GPU; the schedule, timing and rounding of a real GPU are checked by
  tests/test_gpu.py.
"""

from __future__ import annotations

import re
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lkref
from lkref import fused_cupy, self_check

from . import simt_cpu
from .bounds import grad_terms, kl_terms
from .strategies import make_logits, make_probs

REDUCED = sorted(lkref.LOSSES)


@np.errstate(all="ignore")                               # a GPU does not warn: bad input is flagged, not raised here
def kernel_on_the_cpu(grid, block, args, shared_mem=0):
    """lk_rows, transcribed: each row is one block."""
    z2, p2, g2, w, has_w, wsum, has_wsum, scale, stats, idx, has_idx, V, Vt, T, lam, mode, phase, _, _, _, _ = args
    T, lam, mode, phase = float(T), float(lam), int(mode), int(phase)
    z = z2.astype(np.float32)
    p = (p2[:, idx] if int(has_idx) else p2).astype(np.float32)   # the kernel reads a 2-byte target as float
    if phase != 2:
        flags = ((~np.isfinite(z)).any(1) * 1 | (p < 0).any(1) * 2 | (~np.isfinite(p)).any(1) * 4)
        m = np.fmax.reduce(np.where(np.isnan(z), -np.inf, z), axis=1)        # fmaxf ignores NaN
        m = np.where(np.isfinite(m), m, 0).astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            x = (z - m[:, None]) / np.float32(T)
            s = np.exp(x).sum(1)
            q = np.exp(x) * (1 / s)[:, None]
        alpha = np.minimum(q, p).sum(1)
        S = np.where(q < p, q, 0).sum(1)
        psum = p.sum(1)
        kl_sums = mode in (0, 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            px = np.where(p > 0, p * x, 0).sum(1) if kl_sums else 0 * psum
            plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1) if kl_sums else 0 * psum
        stats[:, :8] = np.stack([m, s, alpha, S, psum, px, plogp, flags.astype(np.float32)], 1)
        if phase == 1:
            return
    else:
        m, s, alpha, S, psum = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], stats[:, 4]
        q = np.exp((z - m[:, None]) / np.float32(T)) * (1 / s)[:, None]
    kls = np.where(psum > 0, 1 / np.where(psum > 0, psum, 1), 0) if int(has_idx) else np.ones_like(psum)
    if int(has_wsum):
        scale = 1 / wsum[0] if wsum[0] > 0 else np.float32(0)
    d = (w if int(has_w) else np.ones_like(psum)) * np.float32(scale)
    if int(has_idx):
        d = np.where(psum > 0, d, 0)
    c_tv = np.zeros_like(d)
    c_kl = np.zeros_like(d)
    if mode == 0:
        c_kl = d / T
    if mode == 1:
        c_tv = d / T
    if mode == 2:
        c_tv = np.where(alpha >= fused_cupy.ALPHA_FLOOR, d / (np.where(alpha > 0, alpha, 1) * T), 0)
    if mode == 3:
        c_tv, c_kl = (1 - lam) * d / T, lam * d / T
    g = np.where(q < p, (q * c_tv[:, None]) * (S - 1)[:, None], q * (S * c_tv)[:, None])
    g = g + c_kl[:, None] * (q * (psum * kls)[:, None] - p * kls[:, None])
    g2[...] = g.astype(g2.dtype)


def finish_on_the_cpu(grid, block, args, shared_mem=0):
    """lk_finish, transcribed."""
    stats, w, has_w, restricted, N, mode, lam, per, out = args
    mode, lam = int(mode), np.float32(lam)
    s, alpha, psum, px, plogp = (stats[:, k] for k in (1, 2, 4, 5, 6))
    flags = stats[:, 7].astype(int)
    live = psum > 0 if int(restricted) else np.ones(len(psum), bool)
    wr = np.where(live, w if int(has_w) else 1, 0).astype(np.float32)
    kls = np.where(live, 1 / np.where(live, psum, 1), 0) if int(restricted) else np.ones_like(psum)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = kls * (plogp + psum * np.log(np.where(kls > 0, kls, 1))) - kls * (px - psum * np.log(s))
        loss = {0: kl, 1: 1 - alpha, 2: -np.log(np.where(alpha > 0, alpha, 1)),
                3: (lam * kl if lam != 0 else 0) + (1 - lam) * (1 - alpha)}[mode]
    loss = np.where(live, loss, 0).astype(np.float32)
    per[...] = loss
    total, count = np.where(wr > 0, wr * loss, 0).sum(), wr.sum()
    bits = np.bitwise_or.reduce(flags) if len(flags) else 0
    out[...] = [total, count, np.where(wr > 0, wr * alpha, 0).sum(), bits,
                np.fmax.reduce(np.abs(psum - 1), initial=0),
                ((alpha < fused_cupy.ALPHA_FLOOR) & (psum > 0)).sum() if mode == 2 else 0,
                total * (1 / count if count > 0 else 0), lam]


SIMT_KERNEL = fused_cupy._kernel        # fused_cupy's own, run with CuPy's compiler replaced (simt_stand_in)

needs_cxx = pytest.mark.skipif(simt_cpu.compiler() is None, reason="no C++ compiler for the SIMT stand-in")


def stand_in(monkeypatch, cupy, kernel):
    """CuPy replaced by `cupy`, a Hopper GPU assumed (clusters, and the shared memory a block
    may opt in to as the stand-in allows it), and fused_cupy._kernel by `kernel`."""
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: True)
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: simt_cpu.SMEM_OPTIN_MAX)
    monkeypatch.setattr(fused_cupy, "_kernel", kernel)


def built_kernels(monkeypatch, trace=False):
    """The kernels fused_cupy._kernel builds from now on (on the stand-in), in a list that
    fills as they are built; with trace, lk_rows records its memory traffic."""
    kernels = []

    def build(*a, **kw):
        kernels.append(SIMT_KERNEL(*a, **kw))
        kernels[-1].rows.trace = trace
        return kernels[-1]
    monkeypatch.setattr(fused_cupy, "_kernel", build)
    return kernels


def simt_stand_in(monkeypatch):
    """CuPy's compiler replaced by the CPU build of the kernels' source (tests/simt_cpu.py), so
    that fused_cupy's own _kernel runs: its shared-memory opt-in and its lk_finish from the same
    source and options; every launch is checked as CuPy and CUDA would check it."""
    stand_in(monkeypatch, np, SIMT_KERNEL)
    monkeypatch.setattr(fused_cupy, "_cache", {})
    monkeypatch.setattr(fused_cupy, "_build", lambda cp, src: simt_cpu.CpuKernel(src, options=("-std=c++17",)))
    monkeypatch.setattr(np, "RawKernel", simt_cpu.CpuKernel, raising=False)


@pytest.fixture(params=["transcription", pytest.param("simt", marks=needs_cxx)])
def numpy_as_cupy(request, monkeypatch):
    if request.param == "transcription":
        stand_in(monkeypatch, np, lambda *a: fused_cupy.Kernels(kernel_on_the_cpu, finish_on_the_cpu, 0))
    else:                        # small blocks keep the fibers few; the real size is tested below
        small_blocks(monkeypatch)
        simt_stand_in(monkeypatch)
    return request.param


def small_blocks(monkeypatch):
    """64 threads and up to 4 registers per thread: clusters from V = 257, streaming beyond V = 2048."""
    monkeypatch.setattr(fused_cupy, "THREADS", 64)
    monkeypatch.setattr(fused_cupy, "MAX_ITEMS", 4)


@pytest.fixture
def simt(monkeypatch):
    if simt_cpu.compiler() is None:
        pytest.skip("no C++ compiler for the SIMT stand-in")
    simt_stand_in(monkeypatch)


def no_clusters(monkeypatch, resident=None):
    """As on a GPU before Hopper: a row's blocks meet in global memory.  The stand-in then runs
    the grid as a GPU may, CLUSTER + 1 blocks live at a time started in a random order, or
    `resident` at a time (a number, or a function of CLUSTER)."""
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: False)
    if resident is not None:
        build = fused_cupy._build

        def with_resident(cp, src):
            kern = build(cp, src)
            cluster = simt_cpu.meeting_blocks(src)
            if cluster:
                kern.resident = resident(cluster) if callable(resident) else resident
            return kern
        monkeypatch.setattr(fused_cupy, "_build", with_resident)


def run(name, z, p, **kw):
    return fused_cupy.cupy_loss(name, z, p, **kw)


def close(fast, ref, rtol=2e-5):
    scale = max(np.abs(ref.grad.astype(np.float64)).max(), 1e-30)
    np.testing.assert_allclose(fast.grad.astype(np.float64), ref.grad, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(fast.loss, ref.loss, rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(fast.alpha, ref.alpha, rtol=rtol, atol=1e-7)
    if ref.lam is not None:
        np.testing.assert_allclose(float(fast.lam), float(ref.lam), rtol=rtol)


def case_options(rng, name, case, N):
    """The options of a host-logic case: a mask and a temperature ("mask_T"), or a given lambda
    ("lam", LK^lambda's only: the case is skipped for the others)."""
    if case == "mask_T":
        return {"mask": rng.random(N) < 0.6, "temperature": 0.7}
    if case == "lam":
        if name != "lk_lambda":
            pytest.skip("lam is LK^lambda's")
        return {"lam": 0.3}
    return {}


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("case", ["plain", "mask_T", "d2t", "lam", "reduce"])
def test_host_logic_matches_the_reference(numpy_as_cupy, name, case):
    rng = np.random.default_rng(zlib.crc32(case.encode()) % 1000)      # str hash() varies per process
    N, V, Vt = 12, 40, 45
    z = make_logits(rng, (N, V), dtype=np.float32)
    kw = {}
    if case == "d2t":
        p = make_probs(rng, (N, Vt), dtype=np.float32)
        kw["draft_to_target"] = rng.permutation(Vt)[:V]
        p[3] = 0
        p[3, np.setdiff1d(np.arange(Vt), kw["draft_to_target"])] = 0.2
    else:
        p = make_probs(rng, (N, V), dtype=np.float32)
    kw.update(case_options(rng, name, case, N))
    if case == "reduce":
        calls = []
        kw["reduce"] = lambda t, c: (calls.append(1), (t, c))[1]
    if name == "lk_lambda":
        kw.setdefault("eta", 3.0)
        kw.setdefault("kl_scale", 1.0)
    fast = run(name, z, p, **kw)
    ref = lkref.LOSSES[name](z.astype(np.float64), p.astype(np.float64), impl="reference",
                             **{k: v for k, v in kw.items() if k != "reduce"})
    close(fast, ref)
    if case == "reduce":
        assert len(calls) == (2 if name == "lk_lambda" else 1)


@pytest.fixture
def first_use(monkeypatch):
    """lkref/self_check.py with no verdicts yet, on the stand-in's one device; returns the
    list of the probes it runs (the loss of each)."""
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(self_check, "_device", lambda cp: 0)
    probes, probe = [], self_check._probe

    def counted(cp, name, *args):
        probes.append(name)
        return probe(cp, name, *args)
    monkeypatch.setattr(self_check, "_probe", counted)
    return probes


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("case", ["plain", "mask_T", "d2t", "lam", "float16"])
def test_first_use_check_passes_a_right_kernel_once(numpy_as_cupy, first_use, name, case):
    """check=True (impl="auto" on CuPy): the first call of a variant runs it on the probe and
    compares it with the readable path; a right kernel passes, its result is the kernel's,
    and the next calls of the variant probe no more."""
    rng = np.random.default_rng(zlib.crc32(case.encode()) % 1000)
    N, V, Vt = 5, 300, 320
    dtype = np.float16 if case == "float16" else np.float32
    z = make_logits(rng, (N, V), dtype=dtype)
    kw = {"eta": 2.0, "kl_scale": 0.8} if name == "lk_lambda" else {}
    if case == "d2t":
        p = make_probs(rng, (N, Vt), dtype=np.float32)
        kw["draft_to_target"] = rng.permutation(Vt)[:V]
    else:
        p = make_probs(rng, (N, V), dtype=dtype)
    kw.update(case_options(rng, name, case, N))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # a right kernel raises no warning
        fast = run(name, z, p, check=True, **kw)
        again = run(name, z[::-1].copy(), p[::-1].copy(), check=True, **kw)
    assert first_use == [name]
    assert list(self_check.verdicts().values()) == [True]
    want = reference(name, z, p, **kw)
    if dtype == np.float16:
        np.testing.assert_allclose(fast.grad.astype(np.float64), want.grad, rtol=5e-3,
                                   atol=5e-3 * np.abs(want.grad).max())
    else:
        close(fast, want)
    close(run(name, z[::-1].copy(), p[::-1].copy(), **kw), again, rtol=0)     # as without the check


def planted_transcription(grad=1.0, loss=1.0):
    """The transcribed kernels with a bug: each gradient entry times `grad`, each row's loss times `loss`."""
    def rows(grid, block, args, shared_mem=0):
        kernel_on_the_cpu(grid, block, args, shared_mem)
        if int(args[16]) != 1:                        # (phase 1 writes no gradient)
            args[2][...] = (args[2] * np.float32(grad)).astype(args[2].dtype)

    def finish(grid, block, args, shared_mem=0):
        finish_on_the_cpu(grid, block, args, shared_mem)
        per, out = args[7], args[8]
        per *= np.float32(loss)
        out[0] *= np.float32(loss)
        out[6] *= np.float32(loss)
    return lambda *a: fused_cupy.Kernels(rows, finish, 0)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("bug, fails", [((1 + 1e-5, 1.0), False), ((1 + 3e-3, 1.0), True), ((-1.0, 1.0), True),
                                        ((np.nan, 1.0), True), ((1.0, 1 + 1e-5), False), ((1.0, 1 + 3e-3), True),
                                        ((1.0, np.nan), True)])
def test_first_use_check_bounds(monkeypatch, first_use, name, bug, fails):
    """Negative controls on the transcription: a gradient or a loss 0.3 % off, or NaN, fails the
    probe (its bounds: 1e-3 of the largest entry, 1e-3 of the loss); 1e-5 off, some rounding, passes.
    A failed variant warns once and returns None (the caller then runs the readable path), and
    is not probed again; impl="fused" (check=False) still runs it."""
    stand_in(monkeypatch, np, planted_transcription(*bug))
    rng = np.random.default_rng(7)
    z = make_logits(rng, (4, 200), dtype=np.float32)
    p = make_probs(rng, (4, 200), dtype=np.float32)
    if fails:
        with pytest.warns(RuntimeWarning, match=f"kernel for {name} .* disagrees with the readable path"):
            assert run(name, z, p, check=True) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run(name, z, p, check=True) is None          # no second probe, no second warning
        assert run(name, z, p) is not None                      # impl="fused"
        assert list(self_check.verdicts().values())[0] is not True
    else:
        assert run(name, z, p, check=True) is not None
        assert list(self_check.verdicts().values()) == [True]
    assert first_use == [name]


@pytest.mark.parametrize("name", REDUCED)
def test_first_use_check_sees_entries_left_unwritten(monkeypatch, first_use, name):
    """A kernel that leaves the gradient's first row unwritten fails the probe even where the
    memory it gets already holds the right answer (a pool handing back what an earlier,
    identical computation left): the probe fills its gradient with NaN first.  (Without
    that fill this passes the probe: the negative control.)"""
    def rows(grid, block, args, shared_mem=0):
        before = args[2][:1].copy()
        kernel_on_the_cpu(grid, block, args, shared_mem)
        args[2][:1] = before                          # row 0: as the memory held it
    stand_in(monkeypatch, np, lambda *a: fused_cupy.Kernels(rows, finish_on_the_cpu, 0))
    zp, pp, _ = self_check.probe_problem(200, 200, np.float32, np.float32)
    stale = reference(name, zp, pp).grad.astype(np.float32)

    def holding_the_answer(shape, dtype=float, *args, **kwargs):     # (not NaN, as the tests' empty is)
        a = np.zeros(shape, dtype, *args, **kwargs)
        if a.shape == stale.shape and a.dtype == stale.dtype:
            a[...] = stale
        return a
    monkeypatch.setattr(np, "empty", holding_the_answer)
    rng = np.random.default_rng(3)
    z = make_logits(rng, (4, 200), dtype=np.float32)
    p = make_probs(rng, (4, 200), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="disagrees with the readable path .*200 gradient entries NaN"):
        assert run(name, z, p, check=True) is None
    assert first_use == [name]


@needs_cxx
@pytest.mark.parametrize("bug", ["exp2: u without the factor log2 e", "vec: the target's quad read at its last column",
                                 "the mean misses the last row", "stats written off by one"])
def test_first_use_check_catches_planted_kernel_bugs(simt, monkeypatch, first_use, bug):
    """The CUDA source with one of PLANTED's bugs, on the SIMT stand-in: the probe catches it
    (a wrong result, or a launch that fails) and the call returns None; the unchanged source passes."""
    small_blocks(monkeypatch)
    old, new, *_ = PLANTED[bug]
    rng = np.random.default_rng(12)
    z = make_logits(rng, (4, 1000), dtype=np.float32)
    p = make_probs(rng, (4, 1000), dtype=np.float32)
    assert run("lk_lambda", z, p, check=True) is not None
    monkeypatch.setattr(fused_cupy, "_SOURCE", fused_cupy._SOURCE.replace(old, new))
    fused_cupy._cache.clear()
    with pytest.warns(RuntimeWarning, match="disagrees with the readable path"):
        assert run("lk_lambda", z, p, check=True) is None
    assert first_use == ["lk_lambda", "lk_lambda"]


class CompileException(Exception):
    """Stands in for cupy.cuda.compiler.CompileException."""


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("error", [CompileException("catastrophic error: cannot open source file \"cuda_fp16.h\""),
                                   RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled "
                                                "with an unsupported toolchain.")])
def test_a_variant_that_does_not_build_takes_the_readable_path(monkeypatch, first_use, name, error):
    """A variant whose kernels do not build on this machine (NVRTC's error, as on a CuPy without
    the CUDA headers the kernels include, or the driver's as it loads the module): with
    impl="auto" (check=True) the call warns once, naming the error, and returns None, so that
    the caller runs the readable path; the build is tried once a process, not at every call
    (seconds of NVRTC each); impl="fused" raises the error itself, at once from then on."""
    stand_in(monkeypatch, np, fused_cupy._kernel)         # fused_cupy's own _kernel, whose build fails
    monkeypatch.setattr(fused_cupy, "_cache", {})
    builds = []

    def build(cp, src):
        builds.append(src)
        raise error
    monkeypatch.setattr(fused_cupy, "_build", build)
    rng = np.random.default_rng(5)
    z = make_logits(rng, (3, 300), dtype=np.float32)
    p = make_probs(rng, (3, 300), dtype=np.float32)
    with pytest.warns(RuntimeWarning, match=f"kernel for {name} .* could not be used .*{type(error).__name__}: "
                                            f"{re.escape(str(error)[:30])}"):
        assert run(name, z, p, check=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no second warning
        assert run(name, z, p, check=True) is None
        with pytest.raises(type(error), match=re.escape(str(error))):
            run(name, z, p)                           # impl="fused"
    assert len(builds) == 1 and first_use == []       # built once; nothing to probe
    assert [v.startswith("it does not build here") for v in self_check.verdicts().values()] == [True]


def test_auto_checks_and_fused_does_not(monkeypatch):
    """lkref's dispatch asks cupy_loss for the first-use check with impl="auto" only, unless
    LKREF_CUPY_SELF_CHECK=0."""
    from lkref import backend, fused
    asked = []
    monkeypatch.setattr(backend, "is_cupy_array", lambda x: True)
    monkeypatch.setattr(fused_cupy, "cupy_loss", lambda *a, check, **kw: asked.append(check))
    z, p = np.zeros((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32)
    monkeypatch.delenv("LKREF_CUPY_SELF_CHECK", raising=False)
    monkeypatch.delenv("LKREF_CUPY_FUSED", raising=False)
    fused.dispatch("tv", z, p)
    fused.dispatch("tv", z, p, required=True)
    monkeypatch.setenv("LKREF_CUPY_SELF_CHECK", "0")
    fused.dispatch("tv", z, p)
    assert asked == [True, False, False]


def test_probe_problem():
    """The probe's rows: its dtypes, target rows that sum to 1 as the dtype holds them, entries
    of p from 0.5 up (the peaked row), both q < p and q > p in every row, and few near ties."""
    z, p, w = self_check.probe_problem(1000, 1000, np.float16, np.float16, weighted=True)
    assert z.shape == p.shape == (3, 1000) and z.dtype == p.dtype == np.float16
    assert np.abs(p.astype(np.float64).sum(1) - 1).max() <= lkref.target_sum_atol(np.float16)
    assert (p.max(1) >= 0.5).any() and w.tolist() == [1.0, 0.0, 0.5]
    assert self_check.off_ties("tv", z, p).mean() > 0.99
    x = z.astype(np.float64)
    q = np.exp(x - x.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    pp = p.astype(np.float64)
    assert ((q < pp).any(1) & (q > pp).any(1)).all()


def test_lk_alpha_fallback_rows(numpy_as_cupy):
    z = np.zeros((3, 50), np.float32)
    z[0, 0] = 150.0
    p = np.full((3, 50), 1 / 49, np.float32)
    p[0, 0] = 0
    p[1:] = 1 / 50
    fast = run("lk_alpha", z, p)
    ref = lkref.lk_alpha(z.astype(np.float64), p.astype(np.float64), impl="reference")
    close(fast, ref, rtol=1e-4)
    assert float(fast.loss) > 40


def test_lk_alpha_fallback_rows_with_draft_to_target_and_a_row_without_target_mass(numpy_as_cupy):
    """The fallback's mean again drops, as the reference does, a row whose target has no mass
    on the draft vocabulary (weight 0, not the mask's 1): here with a fallback row beside it."""
    index = np.arange(50) + 10                          # draft token v is target token v + 10
    z = np.zeros((4, 50), np.float32)
    z[0, 0] = 150.0                                     # the draft sits where the target is 0
    p = np.full((4, 60), 1 / 59, np.float32)
    p[0, 10] = 0
    p[1] = 0
    p[1, :10] = 1 / 10                                  # all its mass outside the draft vocabulary
    p[2:] = 1 / 60
    mask = np.array([1.0, 1.0, 0.5, 1.0], np.float32)
    fast = run("lk_alpha", z, p, mask=mask, draft_to_target=index)
    ref = lkref.lk_alpha(z.astype(np.float64), p.astype(np.float64), mask=mask, draft_to_target=index,
                         impl="reference")
    close(fast, ref, rtol=1e-4)
    assert float(fast.loss) > 40 and not np.asarray(fast.grad)[1].any()


@pytest.mark.parametrize("numpy_as_cupy", ["transcription"], indirect=True)
def test_cupy_loss_checks_what_it_reads_first(numpy_as_cupy):
    """On CuPy the reduced losses reach cupy_loss before the reference's checks: its own name the
    argument; a float64 target is read as float32 (the kernels read 4 bytes an entry)."""
    rng = np.random.default_rng(8)
    z = make_logits(rng, (3, 40), dtype=np.float32)
    p = make_probs(rng, (3, 40), dtype=np.float64)
    with pytest.raises(TypeError, match="draft_logits must be float32, float16 or bfloat16"):
        run("lk_alpha", z.astype(np.int32), p)
    with pytest.raises(ValueError, match=r"target_probs must have shape \(3, 40\)"):
        run("lk_alpha", z, p[:, :30])
    with pytest.raises(ValueError, match=r"target_probs must have the leading shape \(3,\)"):
        run("lk_alpha", z, p[:2], draft_to_target=np.arange(40))
    fast = run("lk_alpha", z, p)
    assert fast.grad.dtype == np.float32
    close(fast, lkref.lk_alpha(z.astype(np.float64), p.astype(np.float32).astype(np.float64), impl="reference"))


def test_float16_logits(numpy_as_cupy):
    rng = np.random.default_rng(3)
    z = make_logits(rng, (6, 30), dtype=np.float16)
    p = make_probs(rng, (6, 30), dtype=np.float32)
    fast = run("tv", z, p)
    assert fast.grad.dtype == np.float16 and fast.loss.dtype == np.float32
    ref = lkref.tv(z.astype(np.float64), p.astype(np.float64), impl="reference")
    np.testing.assert_allclose(fast.grad.astype(np.float64), ref.grad, rtol=2e-3, atol=1e-6)


def test_bfloat16_logits(numpy_as_cupy):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(5)
    z = make_logits(rng, (6, 300), dtype=np.float32).astype(ml_dtypes.bfloat16)
    p = make_probs(rng, (6, 300), dtype=np.float32)
    fast = run("lk_alpha", z, p)
    assert fast.grad.dtype == z.dtype and fast.loss.dtype == np.float32
    ref = lkref.lk_alpha(z.astype(np.float64), p.astype(np.float64), impl="reference")
    np.testing.assert_allclose(fast.loss, ref.loss, rtol=1e-5)
    np.testing.assert_allclose(fast.grad.astype(np.float64), ref.grad, rtol=1e-2,      # bf16 gradient: 8 bits
                               atol=1e-2 * np.abs(ref.grad).max())


def two_byte(name):
    """np.float16, or ml_dtypes' bfloat16 (skipped without ml_dtypes, as CuPy needs it too)."""
    return np.float16 if name == "float16" else pytest.importorskip("ml_dtypes").bfloat16


def spy_on_the_target(monkeypatch):
    """The target arrays lk_rows is launched with, in a list that fills as it runs."""
    seen, inner = [], fused_cupy._kernel

    def kernel(*a):
        k = inner(*a)

        def rows(grid, block, args, **kw):
            seen.append(args[1])
            return k.rows(grid, block, args, **kw)
        return fused_cupy.Kernels(rows, k.finish, k.smem)
    monkeypatch.setattr(fused_cupy, "_kernel", kernel)
    return seen


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["mask_T", "d2t"])
def test_two_byte_targets_are_read_as_they_are(numpy_as_cupy, monkeypatch, name, p_dtype, case):
    """A float16 or bfloat16 target goes to the kernels as it is, not as an N x V float32 copy
    (the caller's own memory), and gives the loss of its values; with draft_to_target too,
    whose checks of the entries outside the draft vocabulary and of the row sums read it."""
    dt = two_byte(p_dtype)
    seen = spy_on_the_target(monkeypatch)
    rng = np.random.default_rng(17)
    N, V = 5, 300                                 # simt: a cluster of 2 small blocks
    Vt = V + 7 if case == "d2t" else V
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, Vt), dtype=np.float32).astype(dt)
    kw = {"draft_to_target": rng.permutation(Vt)[:V]} if case == "d2t" else \
        {"mask": np.array([1, 0, 1, 1, 1], bool), "temperature": 0.8}
    close(run(name, z, p, **kw), reference(name, z, p, **kw))
    assert seen and all(a.dtype == dt and np.shares_memory(a, p) for a in seen)


def test_row_sums_of_a_bfloat16_target_through_its_bits(monkeypatch):
    """With draft_to_target the whole rows' sums are taken on the host side; a bfloat16 target's
    through its bits widened to float32, a block of rows at a time: the float32 sums of its values."""
    bf16 = two_byte("bfloat16")
    rng = np.random.default_rng(23)
    p = make_probs(rng, (7, 300), dtype=np.float32).astype(bf16)
    p[2, 5], p[4, 0] = -0.0, 2.0 ** -133          # -0.0 and a subnormal widen exactly too
    want = p.astype(np.float32).sum(axis=1)
    monkeypatch.setattr(fused_cupy, "WIDEN_BYTES", 3 * 4 * 300)      # blocks of 3 rows: 3 + 3 + 1
    got = fused_cupy._row_sums(np, p)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(fused_cupy._row_sums(np, p.astype(np.float16)), p.astype(np.float16).sum(1, dtype=np.float32))


@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("V, N, clusters, kept", [(40, 5, True, None), (300, 4, True, None), (999, 1, True, None),
                                                  (2000, 2, True, None), (1000, 3, False, None), (1000, 3, True, 3)])
def test_simt_two_byte_target_prefetched_in_pairs(simt, monkeypatch, p_dtype, V, N, clusters, kept):
    """PAIR_PREFETCH: a 2-byte target copied with cp.async as the launch starts, in 4-byte pairs,
    each warp its own entries: one block, a cluster of 2 with an odd number of entries per
    thread, a row of odd length (its last entry copied alone), a cluster of 8, blocks that meet
    in global memory, and room for 3 of 4 entries per thread; each entry read once (counted).
    (One column at a time: with VEC, rows of 4 entries a quad copy them 4 at a time.)"""
    dt = two_byte(p_dtype)
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "PAIR_PREFETCH", True)
    monkeypatch.setattr(fused_cupy, "VEC", False)
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    if kept is not None:
        monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: fused_cupy.STATIC_SMEM_ROOM + kept * 2 * 64)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(V + N)
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, V), dtype=np.float32).astype(dt)
    close(run("lk_alpha", z, p, temperature=0.8), reference("lk_alpha", z, p, temperature=0.8))
    code = kernels[-1].rows.code
    assert "#define P_ASYNC 2" in code and f"#define PCACHE {kept or fused_cupy.plan(V)[0]}" in code
    items = fused_cupy.plan(V)[0]
    kept_cols = (np.arange(V) % (64 * items)) // 64 < (kept or items)
    assert kernels[-1].rows.reads[-1][1] == N * (V + int((~kept_cols).sum()))


def test_pairs_only_where_every_row_is_aligned(numpy_as_cupy, monkeypatch):
    """The host takes the pair copies for a 2-byte target whose rows all start 4-byte aligned,
    with no draft_to_target, and only with PAIR_PREFETCH; else the read at first use."""
    seen = []
    inner = fused_cupy._kernel
    monkeypatch.setattr(fused_cupy, "_kernel", lambda *a: seen.append(a[6]) or inner(*a))   # its pairs argument
    rng = np.random.default_rng(29)
    z = make_logits(rng, (3, 50), dtype=np.float32)
    p = make_probs(rng, (3, 50), dtype=np.float32).astype(np.float16)
    run("tv", z, p)
    monkeypatch.setattr(fused_cupy, "PAIR_PREFETCH", True)
    run("tv", z, p)                                         # even rows, aligned: pairs
    run("tv", z, p.astype(np.float32))                      # a float32 target: cp.async entry by entry
    shifted = np.empty(3 * 50 + 1, np.float16)[1:].reshape(3, 50)
    shifted[...] = p                                        # rows 2 bytes off 4-byte alignment
    run("tv", z, shifted)
    z1, p1 = z[:, :49].copy(), (p[:, :49] / p[:, :49].astype(np.float32).sum(1, keepdims=True)).astype(np.float16)
    run("tv", z1, p1)                                       # odd rows: every other row misaligned
    run("tv", z1[:1], p1[:1])                               # ... unless there is one row
    run("tv", z, np.pad(p, ((0, 0), (0, 2))), draft_to_target=np.arange(50))   # two launches, two kernels
    assert seen == [False, True, False, False, False, True, False, False]


@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16"])
def test_whole_target_checks_of_two_byte_targets(p_dtype):
    """With draft_to_target the entries outside the draft vocabulary are checked by reductions
    alone; for bfloat16 by the max of its bits as int16 and as uint16.  Each non-finite or
    negative value is found wherever it is, -0.0 and the extremes of a valid target are not."""
    dt = two_byte(p_dtype)
    rng = np.random.default_rng(19)
    good = make_probs(rng, (3, 40), dtype=np.float32).astype(dt)
    good[0, 3] = 0.0
    good[1, 5] = -0.0
    good[2, 7] = 1.0
    fused_cupy._check_whole_target(np, good)
    finfo = np.finfo if dt == np.float16 else pytest.importorskip("ml_dtypes").finfo
    tiny = np.array([finfo(dt).smallest_subnormal], dt)[0]
    for value, match in [(np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite"),
                         (-np.nan, "non-finite"), (-tiny, "negative"), (-1.0, "negative"),
                         (-float(finfo(dt).max), "negative")]:
        for at in [(0, 0), (2, 39)]:
            bad = good.copy()
            bad[at] = value
            with pytest.raises(ValueError, match=f"target_probs contains {match}"):
                fused_cupy._check_whole_target(np, bad)
    bad = good.copy()
    bad[1, 1], bad[2, 2] = -0.5, np.nan           # both: the reference names the non-finite first
    with pytest.raises(ValueError, match="non-finite"):
        fused_cupy._check_whole_target(np, bad)
    fused_cupy._check_whole_target(np, -np.zeros((2, 3), dt))    # -0.0 everywhere (the int16 max is -0.0's)


@pytest.mark.parametrize("V", [10, 12])                 # one column at a time; 4 adjacent ones (VEC)
@pytest.mark.parametrize("bad, match", [
    ("nan_logit", "draft_logits contains non-finite"), ("inf_logit", "draft_logits contains non-finite"),
    ("neg_inf_logit", "draft_logits contains non-finite"), ("neg_target", "target_probs contains negative"),
    ("nan_target", "target_probs contains non-finite"), ("inf_target", "target_probs contains non-finite"),
    ("neg_inf_target", "target_probs contains non-finite"), ("sum", "rows must sum to 1"),
    ("huge_target", "rows must sum to 1"),
])
def test_input_flags(numpy_as_cupy, bad, match, V):
    """The kernels flag the inputs by each thread's min, max and sum of its entries (of the
    logits' exps): +inf shows in the max, -inf and negatives in the min, NaN in the sum; finite
    target entries whose sum overflows are a wrong sum, as the reference says, not a non-finite
    entry."""
    rng = np.random.default_rng(4)
    z = make_logits(rng, (4, V), dtype=np.float32)
    p = make_probs(rng, (4, V), dtype=np.float32)
    if bad in ("nan_logit", "inf_logit", "neg_inf_logit"):
        z[2, 3] = {"nan_logit": np.nan, "inf_logit": np.inf, "neg_inf_logit": -np.inf}[bad]
    elif bad == "neg_target":
        p[1, 1] = -0.01
        p[1, 2] += 0.01
    elif bad in ("nan_target", "inf_target", "neg_inf_target"):
        p[0, 0] = {"nan_target": np.nan, "inf_target": np.inf, "neg_inf_target": -np.inf}[bad]
    elif bad == "huge_target":
        p[3, :] = np.finfo(np.float32).max / 2          # every thread's sum overflows to +inf
    else:
        p *= 1.01
    with pytest.raises(ValueError, match=match):
        run("lk_alpha", z, p)
    with pytest.raises(ValueError, match=match):        # the reference says the same
        lkref.lk_alpha(z, p, impl="reference")


@pytest.mark.parametrize("bad, match", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-0.1, "negative")])
def test_input_flags_outside_the_draft_vocabulary(numpy_as_cupy, bad, match):
    """With draft_to_target the kernel reads only the mapped columns; the others are checked too."""
    rng = np.random.default_rng(6)
    z = make_logits(rng, (4, 10), dtype=np.float32)
    p = make_probs(rng, (4, 12), dtype=np.float32)
    p[1, 11] = bad                                       # column 11 is not in the map
    with pytest.raises(ValueError, match=match):
        run("kl", z, p, draft_to_target=np.arange(10))


def test_float64_stays_on_the_reference(numpy_as_cupy):
    assert run("kl", np.zeros((2, 3)), np.full((2, 3), 1 / 3)) is None


def test_overflowing_logits_give_no_nan(numpy_as_cupy):
    """The kernel's sum p x skips p = 0, where x = (z - max z) / T may be -inf (0 log q = 0).
    Row 0's KL is 0 in float32, and its log 1 must be too: __logf's 2^-21.41 absolute error on
    [0.5, 2] (tests/simt_cpu.h) would be 1.2e-5 of the mean KL; this fails where the kernel
    takes __logf for every entry of sum p log p, not only those below 0.5 (checked)."""
    import warnings
    big = np.finfo(np.float32).max * 0.9
    z = np.array([[big, -big, 0.0], [0.1, 0.2, 0.3]], np.float32)
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in ("kl", "lk_lambda"):
            fast, ref = run(name, z, p), lkref.LOSSES[name](z, p, impl="reference")
            assert np.isfinite(fast.loss) and not np.isnan(fast.grad).any()
            np.testing.assert_allclose(float(fast.loss), float(ref.loss), rtol=1e-5)
            np.testing.assert_allclose(fast.grad, ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", REDUCED)
def test_tiny_temperatures_stay_on_the_reference(numpy_as_cupy, name):
    """As on NumPy (lkref/fused.py, MIN_TEMPERATURE): d / (alpha T) could overflow float32."""
    from lkref import fused
    z, p = np.zeros((2, 3), np.float32), np.full((2, 3), 1 / 3, np.float32)
    assert run(name, z, p, temperature=fused.MIN_TEMPERATURE / 10) is None
    assert run(name, z, p, temperature=fused.MIN_TEMPERATURE) is not None


@pytest.mark.parametrize("name", ["kl", "lk_alpha"])          # with x kept for the KL sums, and without
def test_huge_temperatures_stay_on_the_reference(numpy_as_cupy, name):
    """Above MAX_TEMPERATURE (2^126) the kernels' 1 / T would flush to 0 (CuPy: -ftz=true) and
    make every q equal: the reference runs.  At 2^126 itself, with logits 1e38 apart (x of order
    1), the kernels run and agree with it."""
    from lkref import fused_cupy
    z = np.array([[1e38, 0.0, -1e38], [3e37, -2e37, 0.0]], np.float32)
    p = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], np.float32)
    assert run(name, z, p, temperature=fused_cupy.MAX_TEMPERATURE * 2) is None
    T = fused_cupy.MAX_TEMPERATURE
    for exp2 in (True, False):
        with fused_cupy.configured(exp2=exp2):
            fast = run(name, z, p, temperature=T)
        close(fast, reference(name, z, p, temperature=T))


def test_compile_options_name_the_toolkit_headers(tmp_path):
    import types
    (tmp_path / "include" / "cccl").mkdir(parents=True)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(get_cuda_path=lambda: str(tmp_path)))
    opts = fused_cupy._compile_options(fake)
    assert opts == ("-std=c++17", f"-I{tmp_path}/include", f"-I{tmp_path}/include/cccl")
    fake.cuda.get_cuda_path = lambda: None                  # no toolkit found: CuPy's own paths only
    assert fused_cupy._compile_options(fake) == ("-std=c++17",)


def test_build_retries_with_the_toolkit_headers(tmp_path):
    """A CuPy whose NVRTC does not find cuda_fp16.h gets the toolkit's include folders."""
    import types
    (tmp_path / "include").mkdir()

    class CompileException(Exception):
        pass
    built = []

    class RawKernel:
        def __init__(self, src, name, options):
            self.options = options
            built.append(options)

        def compile(self):
            if not any(o.startswith("-I") for o in self.options):
                raise CompileException("cannot open source file cuda_fp16.h")
    fake = types.SimpleNamespace(RawKernel=RawKernel, cuda=types.SimpleNamespace(
        get_cuda_path=lambda: str(tmp_path), compiler=types.SimpleNamespace(CompileException=CompileException)))
    kern = fused_cupy._build(fake, "src")
    assert kern.options == ("-std=c++17", f"-I{tmp_path}/include") and len(built) == 2
    fake.cuda.get_cuda_path = lambda: None                  # nowhere else to look: the first error
    with pytest.raises(CompileException, match="cuda_fp16"):
        fused_cupy._build(fake, "src")


def test_clusters_only_from_hopper_on():
    import types

    def device(cc):
        return types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability=cc)))
    assert fused_cupy._has_clusters(device("90")) and fused_cupy._has_clusters(device("100"))
    assert not fused_cupy._has_clusters(device("80")) and not fused_cupy._has_clusters(np)


@pytest.mark.parametrize("cc, clusters, how", [("90", True, "a thread-block cluster of 2-8"),
                                               ("80", True, "2-8 blocks that meet in global memory (no clusters)"),
                                               ("90", False, "2-8 blocks that meet in global memory (clusters off)")])
@pytest.mark.parametrize("flag, when", [(None, "on by default"), ("0", "off (LKREF_CUPY_FUSED=0"), ("1", "on by default")])
def test_info_says_how_this_gpu_runs_the_kernels(monkeypatch, cc, clusters, how, flag, when):
    """python -m lkref info's line on the kernels: on or off, and how this GPU splits rows
    (clusters from Hopper on, unless switched off with configured(clusters=False))."""
    import types
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability=cc)))
    if flag is None:
        monkeypatch.delenv("LKREF_CUPY_FUSED", raising=False)
    else:
        monkeypatch.setenv("LKREF_CUPY_FUSED", flag)
    with fused_cupy.configured(clusters=clusters):
        line = fused_cupy.describe(cp)
        assert fused_cupy._uses_clusters(cp) == (cc == "90" and clusters)
    assert how in line and when in line and f"sm_{cc}" in line
    assert "up to 16384 logits takes one block, up to 131072 " in line and fused_cupy.CLUSTERS is True
    assert line.endswith("target kept in shared memory: all of a block's share")     # optin unknown here
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: 99 * 1024)
    assert fused_cupy.describe(cp).endswith("target kept in shared memory: all of a block's share")  # 64 KiB
    with fused_cupy.configured(block_share=32_768):                 # 128 KiB a block: not on such a GPU
        assert fused_cupy.describe(cp).endswith("48 of each thread's 64 entries (the rest read twice); "
                                                "a 2-byte target: all of a block's share")
    with fused_cupy.configured(cache_target=False):
        assert fused_cupy.describe(cp).endswith("target kept in shared memory: off")


def test_plan_covers_every_vocabulary():
    assert fused_cupy.plan(7) == (1, 1)
    assert fused_cupy.plan(32_000) == (32, 2)
    assert fused_cupy.plan(128_256) == (32, 8)
    assert fused_cupy.plan(10**6) == (0, 1)
    with fused_cupy.configured(block_share=32_768):
        assert fused_cupy.plan(32_000) == (63, 1) and fused_cupy.plan(128_256) == (63, 4)
    for V in (1, 512, 16_384, 16_385, 32_768, 50_257, 131_072, 131_073, 262_145):
        items, cluster = fused_cupy.plan(V)
        assert items == 0 or items * fused_cupy.THREADS * cluster >= V
        assert items <= fused_cupy.MAX_ITEMS and cluster in (1, 2, 4, 8)


@pytest.mark.parametrize("V, in_t, out_t, arch", [(32_000, "float", "float", "sm_90"),
                                                  (128_256, "__half", "__half", "sm_90"),
                                                  (300_000, "float", "__half", "sm_90"),
                                                  (128_256, "float", "float", "sm_80")])
def test_kernel_source_compiles(tmp_path, V, in_t, out_t, arch):
    """nvcc (when the machine has it) must build every variant without errors: for sm_90 with
    clusters, for sm_80 (A100) with blocks that meet in global memory."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    items, cluster = fused_cupy.plan(V)
    src = tmp_path / "k.cu"
    src.write_text(fused_cupy.kernel_source(items, cluster, in_t, out_t, dsmem=arch == "sm_90"))
    r = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def reference(name, z, p, **kw):
    return lkref.LOSSES[name](z.astype(np.float64), p.astype(np.float64), impl="reference", **kw)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V, plan", [(300, (3, 2)), (1000, (4, 4)), (2000, (4, 8)), (3000, (0, 1))])
def test_simt_every_plan(simt, monkeypatch, name, V, plan):
    """The kernel source itself, in clusters of 2, 4 and 8 blocks and streaming, with a mask, a
    temperature, a target vocabulary of its own and (LK^lambda) the two-pass lambda."""
    small_blocks(monkeypatch)
    assert fused_cupy.plan(V) == plan
    rng = np.random.default_rng(V)
    N, Vt = 5, V + 7
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, Vt), dtype=np.float32)
    kw = dict(mask=np.array([1, 1, 0, 1, 1], bool), temperature=0.7, draft_to_target=rng.permutation(Vt)[:V])
    close(run(name, z, p, **kw), reference(name, z, p, **kw))
    kw.pop("draft_to_target")
    p = make_probs(rng, (N, V), dtype=np.float32)
    close(run(name, z, p, **kw), reference(name, z, p, **kw))


@pytest.mark.parametrize("name", REDUCED)
def test_simt_one_kernel_per_loss_generic_and_streamed(simt, monkeypatch, name):
    """SPECIALIZE (the default) builds lk_rows for one loss and one phase (0, or 1 and 2 for LK^lambda's
    two launches), compile-time constants; specialize=False one kernel for all, reading both
    from its arguments (the benchmark's 'fused generic-mode'): the same arithmetic, bit for bit.  stream=True streams a
    row that would fit registers (items 0): as the reference, to rounding."""
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(41)
    z = make_logits(rng, (5, 300), dtype=np.float32)
    p = make_probs(rng, (5, 300), dtype=np.float32)
    kw = dict(mask=np.array([1, 1, 0, 1, 1], bool), temperature=0.7)
    one = run(name, z, p, **kw)
    specialized = len(kernels)
    with fused_cupy.configured(specialize=False):
        every = run(name, z, p, **kw)

    def define(kern, name):
        return int(re.search(rf"#define {name} (-?\d+)", kern.rows.code).group(1))
    assert [(define(k, "MODE"), define(k, "PHASE")) for k in kernels] == \
        [(fused_cupy.MODES[name], phase) for phase in ((1, 2) if name == "lk_lambda" else (0,))] + [(-1, -1)]
    assert specialized == len(kernels) - 1
    for a, b in ((one.grad, every.grad), (one.loss, every.loss), (one.alpha, every.alpha)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with fused_cupy.configured(stream=True):
        assert fused_cupy.plan(300) == (0, 1)
        streamed = run(name, z, p, **kw)
    assert define(kernels[-1], "ITEMS") == 0
    close(streamed, reference(name, z, p, **kw))


def _aligned_at(a, offset_bytes):
    """A contiguous copy of `a` that starts `offset_bytes` past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 64 + offset_bytes, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset_bytes
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _on_and_off(kernels, rng, name, shape, kw, define, **off):
    """Float32 logits and target of `shape`: the loss with the kernels' default (its `define` 1)
    and with configured(**off) (0), each the reference's result.  Returns (z, p)."""
    z = make_logits(rng, shape, dtype=np.float32)
    p = make_probs(rng, shape, dtype=np.float32)
    want = reference(name, z, p, **kw)
    close(run(name, z, p, **kw), want)
    assert f"#define {define} 1" in kernels[-1].rows.code
    with fused_cupy.configured(**off):
        close(run(name, z, p, **kw), want)
    assert f"#define {define} 0" in kernels[-1].rows.code
    return z, p


@pytest.mark.parametrize("name", ["lk_alpha", "lk_lambda"])   # one launch; the KL sums, TV, two launches
def test_simt_four_adjacent_columns_a_thread(simt, monkeypatch, name):
    """VEC: where every array is float32 with 16-byte aligned rows and there is no
    draft_to_target, each thread takes 4 adjacent columns at a time (16-byte loads, stores and
    copies); configured(vec=False) one column every THREADS.  Both give the reference, in one
    block, in a cluster of two launches (a mask: the gradient's launch reads the logits and the
    target again), and with part of the target kept in shared memory (4 of 8 entries a
    thread; none in the gradient launch of two, which launches without dynamic shared memory).
    The stand-in fails any 16-byte access that is not 16-byte aligned.  (The rest of
    this file runs VEC wherever a row allows it, which is most rows.)"""
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(47)
    for V, kw in ((200, {"temperature": 0.6}), (1000, {"mask": np.array([1, 0, 1], bool)})):
        z, p = _on_and_off(kernels, rng, name, (3, V), kw, "VEC", vec=False)
    monkeypatch.setattr(fused_cupy, "MAX_ITEMS", 8)       # 64 threads x 8: 4 entries kept of 8 (partial cache)
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: fused_cupy.STATIC_SMEM_ROOM + 4 * 4 * 64 + 100)
    fused_cupy._cache.clear()
    before = len(kernels)
    close(run(name, z, p), reference(name, z, p))
    built = kernels[before:]                  # LK^alpha: one launch; LK^lambda (batch lambda): statistics, gradient
    assert all("#define VEC 1" in k.rows.code and "#define ITEMS 8" in k.rows.code for k in built)
    assert "#define PCACHE 4" in built[0].rows.code and built[0].smem == 4 * 4 * 64
    if name == "lk_lambda":                   # the gradient launch reads each target entry once: no cache
        assert len(built) == 2 and "#define PCACHE 0" in built[1].rows.code and built[1].smem == 0


@pytest.mark.parametrize("dtypes", [("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "float16"),
                                    ("bfloat16", "float32")])
@pytest.mark.parametrize("name", ["lk_alpha", "lk_lambda"])   # one launch; two (statistics, gradient)
def test_simt_four_adjacent_two_byte_entries(simt, monkeypatch, name, dtypes):
    """VEC with float16 or bfloat16 logits (and so gradient) or target: 4 adjacent entries a
    thread in one 8-byte access, a 2-byte target copied to shared memory 4 entries a cp.async as
    the launch starts (P_ASYNC 1: not read at first use, nor in pairs), in one block and in a
    cluster of 4, each entry read once (counted); configured(vec=False) one column at a time.
    Both give the reference to the 2-byte types' rounding.  The stand-in fails an 8-byte access
    that is not 8-byte aligned."""
    z_dt, p_dt = (two_byte(d) if d != "float32" else np.float32 for d in dtypes)
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(49)
    for V in (200, 1000):
        z = make_logits(rng, (3, V), dtype=np.float32).astype(z_dt)
        p = make_probs(rng, (3, V), dtype=np.float32).astype(p_dt)
        want = reference(name, z, p, temperature=0.7)
        g_tol = 2e-5 if z_dt == np.float32 else 8e-3      # the gradient rounded to 8 or 11 bits
        results = []
        for vec in (True, False):
            with fused_cupy.configured(vec=vec):
                before = len(kernels)
                got = run(name, z, p, temperature=0.7)
            code = kernels[-1].rows.code
            assert f"#define VEC {int(vec)}" in code
            if vec:
                assert "#define P_ASYNC 1" in kernels[before].rows.code
                assert all(k.rows.reads[-1][:2] == (3 * V, 3 * V) for k in kernels[before:])   # once each
            np.testing.assert_allclose(got.grad.astype(np.float64), want.grad, rtol=g_tol,
                                       atol=g_tol * np.abs(want.grad).max())
            np.testing.assert_allclose(got.loss, want.loss, rtol=2e-5)
            np.testing.assert_allclose(got.alpha, want.alpha, rtol=2e-5, atol=1e-7)
            results.append(got)
        assert results[0].grad.dtype == z.dtype


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V, cluster, stages, resident", [(200, 1, 3, 2), (1000, 4, 3, 8), (1000, 4, 2, 4),
                                                          (1000, 4, 3, 1000)])
def test_simt_pipelined_rows(simt, monkeypatch, name, V, cluster, stages, resident):
    """PIPELINE: a persistent grid of `resident` blocks (or as many clusters of them as fit, at
    most N), each block or cluster going through rows first, first + step, ..., with the
    logits and the target of the next stages - 1 rows copied into shared memory while it works
    on this one; with one block a row and with clusters of 4, 2 or 3 stages, and 1 to 4 rows a
    cluster (7 rows).  Each the reference's result (LK^lambda with lam=, one launch), each
    logit and target entry read once (counted), the grid as small as said."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "PIPE_STAGES", stages)
    monkeypatch.setattr(fused_cupy, "_resident_clusters", lambda cp, smem, cl, N, regs=None: max(1, min(N, resident // cl)))
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(V + stages)
    N = 7
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, V), dtype=np.float32)
    kw = {"temperature": 0.8, "mask": rng.random(N).astype(np.float32)}
    if name == "lk_lambda":
        kw["lam"] = 0.3
    want = reference(name, z, p, **kw)
    with fused_cupy.configured(pipeline=True):
        assert fused_cupy.plan(V)[1] == cluster
        got = run(name, z, p, **kw)
    close(got, want)
    k = kernels[-1]
    assert f"#define PIPE {stages}" in k.rows.code and k.stages == stages
    assert k.smem == stages * fused_cupy.stage_bytes(fused_cupy.plan(V)[0])
    assert k.rows.reads[-1][:2] == (N * V, N * V)                 # once each
    assert k.rows.grids[-1] == min(N, resident // cluster) * cluster
    with fused_cupy.configured(pipeline=True, vec=False):    # one column at a time: no stages
        close(run(name, z, p, **kw), want)
    assert "#define PIPE 0" in kernels[-1].rows.code and kernels[-1].stages == 0


def _rows_held(monkeypatch, resident, V, seed, N=7):
    """Small blocks, a GPU that holds `resident` blocks at once, the list the kernels built go
    to, and an N x V float32 problem: (kernels, z, p)."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "_resident_clusters", lambda cp, smem, cl, N, regs=None: max(1, min(N, resident // cl)))
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(seed)
    return kernels, make_logits(rng, (N, V), dtype=np.float32), make_probs(rng, (N, V), dtype=np.float32)


def rows_fetched(kernel, V):
    """The rows whose logits (argument 0) and target (1) the last launch of a stand-in kernel
    asked L2 for, {argument: [rows, in order]}, each row's entries asked for exactly once (the
    asks of its blocks' shares together; an AssertionError otherwise)."""
    shares = {}
    for arg, first, n in kernel.rows.fetched[-1]:
        assert arg in (0, 1) and first % V + n <= V, (arg, first, n)       # within one row of z or p
        shares.setdefault((arg, first // V), []).append((first % V, n))
    for (arg, row), parts in shares.items():
        covered = np.zeros(V, int)
        for start, n in parts:
            covered[start:start + n] += 1
        assert (covered == 1).all(), (arg, row, parts)
    return {arg: sorted(row for a, row in shares if a == arg) for arg in (0, 1)}


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V, cluster, resident", [(200, 1, 2), (1000, 4, 8), (1000, 4, 1000)])
def test_simt_rows_fetched_into_l2_ahead(simt, monkeypatch, name, V, cluster, resident):
    """L2_AHEAD: the persistent grid of PIPELINE without stages; at the start of each row one
    thread asks L2 for the block's share of its next row, logits and target (16-byte aligned,
    a multiple of 16 bytes: checked), which the loads then read as without.  The reference's
    result, each entry read once, the grid as small as said, and every row but each cluster's
    first asked for once (each ask's array, row and columns recorded)."""
    kernels, z, p = _rows_held(monkeypatch, resident, V, seed=V + 5)
    N = len(z)
    kw = {"temperature": 0.8, "lam": 0.3} if name == "lk_lambda" else {"temperature": 0.8}
    with fused_cupy.configured(l2_ahead=True):
        got = run(name, z, p, **kw)
    close(got, reference(name, z, p, **kw))
    k = kernels[-1]
    clusters = min(N, resident // cluster)
    assert "#define AHEAD 1" in k.rows.code and k.ahead and k.stages == 0
    assert k.rows.grids[-1] == clusters * cluster and k.rows.reads[-1][:2] == (N * V, N * V)
    assert rows_fetched(k, V) == {0: list(range(clusters, N)), 1: list(range(clusters, N))}   # each a row's next


@pytest.mark.parametrize("name, lam", [("lk_alpha", None), ("tv", None), ("kl", None), ("lk_lambda", 0.3),
                                       ("lk_lambda", None)])
@pytest.mark.parametrize("V, cluster, resident, frac, lead", [(200, 1, 4, 0.5, 2), (1000, 4, 16, 0.25, 1),
                                                              (1000, 4, 24, 1.0, 6), (1000, 4, 1000, 2.0, 14)])
def test_simt_rows_fetched_into_l2_by_lead(simt, monkeypatch, name, lam, V, cluster, resident, frac, lead):
    """L2_LEAD: a block a row as by default; as it starts, one thread asks L2 for the block's
    share of the row `lead` rows on (lead = L2_LEAD x the rows held at once, at least 1; 16-byte
    aligned, a multiple of 16 bytes: checked), logits and target, in every launch of the call
    (LK^lambda's batch lambda: the statistics and the gradient).  The reference's result, each
    entry read once, and each row from the lead-th on asked for once a launch, none before it
    (each ask's array, row and columns recorded: a block that fetched its own row, or the row
    lead - 1 on, fails)."""
    kernels, z, p = _rows_held(monkeypatch, resident, V, seed=V + 7)
    N = len(z)
    kw = {"temperature": 0.8} if lam is None else {"temperature": 0.8, "lam": lam}
    with fused_cupy.configured(l2_lead=frac):
        got = run(name, z, p, **kw)
        launches = kernels[-2:] if name == "lk_lambda" and lam is None else kernels[-1:]
        assert [fused_cupy.lead_rows(k, cluster, N, np) for k in launches] == [lead] * len(launches)
    close(got, reference(name, z, p, **kw))
    assert fused_cupy.plan(V)[1] == cluster
    for k in launches:
        assert "#define LEAD 1" in k.rows.code and k.lead and not k.persistent
        assert k.rows.grids[-1] == N * cluster and k.rows.reads[-1][:2] == (N * V, N * V)
        assert rows_fetched(k, V) == {0: list(range(lead, N)), 1: list(range(lead, N))}
    with fused_cupy.configured(l2_lead=frac, vec=False):     # one column at a time: no fetch
        close(run(name, z, p, **kw), reference(name, z, p, **kw))
    assert "#define LEAD 0" in kernels[-1].rows.code and kernels[-1].rows.fetched[-1] == []
    assert fused_cupy.lead_rows(kernels[-1], cluster, N, np) == 0


def test_pipeline_only_where_it_applies(simt, monkeypatch):
    """PIPELINE takes a persistent grid only for one launch of float32 rows with 4 adjacent
    columns a thread, in clusters or a block a row; not for LK^lambda's batch lambda (two
    launches), blocks that meet in global memory, a float16 target, or streamed rows; and
    it needs room for 2 stages a block (3 by default)."""
    import types
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(51)
    z = make_logits(rng, (3, 1000), dtype=np.float32)
    p = make_probs(rng, (3, 1000), dtype=np.float32)

    def stages(name, z, p, **kw):
        """[(stages, L2 ahead)] of the call's kernels with pipeline=True, and with l2_ahead=True."""
        got = []
        for switch in ({"pipeline": True}, {"l2_ahead": True}):
            with fused_cupy.configured(**switch):
                close(run(name, z, p, **kw), reference(name, z, p, **kw))
            got.append([(k.stages, k.ahead) for k in kernels[-2 if name == "lk_lambda" and "lam" not in kw else -1:]])
        return got
    assert stages("lk_alpha", z, p) == [[(3, False)], [(0, True)]]
    assert stages("lk_lambda", z, p) == [[(0, False)] * 2] * 2              # statistics, then gradient
    assert stages("lk_alpha", z, p.astype(np.float16)) == [[(0, False)]] * 2
    assert stages("lk_alpha", make_logits(rng, (3, 3000), dtype=np.float32),
                  make_probs(rng, (3, 3000), dtype=np.float32)) == [[(0, False)]] * 2   # streamed
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: False)
    assert stages("kl", z, p) == [[(0, False)]] * 2                        # blocks that meet in global memory
    assert stages("kl", z[:, :200].copy(), p[:, :200] / p[:, :200].sum(1, keepdims=True)) == \
        [[(3, False)], [(0, False)]]                                         # a block a row; but no cp.async.bulk
    per_stage = fused_cupy.stage_bytes(4)                              # 64 threads x 4 entries x 8 bytes
    for optin, want in ((None, 3), (fused_cupy.STATIC_SMEM_ROOM + 2 * per_stage, 2),
                        (fused_cupy.STATIC_SMEM_ROOM + 2 * per_stage - 1, 0)):
        assert fused_cupy.pipe_stages(4, optin) == want, optin
    device = types.SimpleNamespace(attributes={"MultiProcessorCount": 132, "MaxSharedMemoryPerMultiprocessor": 228 * 1024})
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: device))
    assert fused_cupy._resident_clusters(cp, 192 * 1024, 4, 4096) == 33          # an H100: one block an SM
    assert fused_cupy._resident_clusters(cp, 192 * 1024, 4, 20) == 20           # at most a cluster a row
    assert fused_cupy._resident_clusters(np, 192 * 1024, 4, 20) == 20           # unknown: a cluster a row
    with fused_cupy.configured(threads=512):
        assert fused_cupy._resident_clusters(cp, 64 * 1024, 8, 4096) == 132 * 3 // 8   # by shared memory, 3 an SM
        assert fused_cupy._resident_clusters(cp, 64 * 1024, 8, 4096, regs=62) == 132 * 2 // 8   # by registers, 2


def test_simt_one_column_at_a_time_where_rows_are_not_aligned(simt, monkeypatch):
    """vec_fits refuses VEC for a row that is not a multiple of 4 entries, logits or a gradient
    buffer off a 16-byte boundary (float32), a 2-byte target off an 8-byte one, and
    draft_to_target; the kernels then take one column at a time (and give the reference)."""
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(48)
    z = make_logits(rng, (3, 1000), dtype=np.float32)
    p = make_probs(rng, (3, 1000), dtype=np.float32)
    assert fused_cupy.vec_fits(z, p, z, None) and fused_cupy.vec_fits(_aligned_at(z, 16), p, z, None)
    assert not fused_cupy.vec_fits(z[:, :999].copy(), p[:, :999].copy(), z[:, :999].copy(), None)
    assert not fused_cupy.vec_fits(_aligned_at(z, 4), p, z, None)
    assert not fused_cupy.vec_fits(z, p, _aligned_at(z, 8), None)
    p16 = p.astype(np.float16)
    assert fused_cupy.vec_fits(z, p16, z, None) and fused_cupy.vec_fits(z, _aligned_at(p16, 8), z, None)
    assert not fused_cupy.vec_fits(z, _aligned_at(p16, 4), z, None)
    assert not fused_cupy.vec_fits(_aligned_at(z, 8), p16, z, None)      # float32: 16 bytes
    assert not fused_cupy.vec_fits(z, p, z, np.arange(1000, dtype=np.int32))
    with fused_cupy.configured(vec=False):
        assert not fused_cupy.vec_fits(z, p, z, None)
    close(run("lk_alpha", _aligned_at(z, 4), p), reference("lk_alpha", z, p))
    assert "#define VEC 0" in kernels[-1].rows.code
    out = _aligned_at(np.zeros_like(z), 8)
    close(run("lk_alpha", z, p, out=out), reference("lk_alpha", z, p))
    assert "#define VEC 0" in kernels[-1].rows.code


@pytest.mark.parametrize("switch, name", [("exp2", "lk_alpha"), ("exp2", "lk_lambda"),   # one launch; the KL sums
                                          ("fast_log", "kl"), ("fast_log", "lk_lambda")])  # the losses with log p
def test_simt_each_switch_on_and_off_gives_the_reference(simt, monkeypatch, switch, name):
    """EXP2 (the default) takes each element's exp as exp2f of (z - m) log2(e) / T, and the KL
    sums' x back from it; exp2=False (the benchmark's 'fused expf') as expf of (z - m) / T.
    FAST_LOG (the default) takes log p by __logf where p < 0.5 and logf from 0.5 up;
    fast_log=False (the benchmark's 'fused logf') logf everywhere.  Each way the reference to
    rounding with the GPU's worst math (tests/simt_cpu.h), in a cluster and streamed, with a
    mask and a temperature (the rest of this file runs the defaults); FAST_LOG also on rows with
    entries of 0.5 and 1 (where __logf alone fails: test_overflowing_logits_give_no_nan)."""
    define = fused_cupy.SWITCHES[switch]
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(43)
    kw = dict(mask=np.array([1, 0, 1, 1], bool), temperature=0.6)
    for V in (1000, 3000):                          # a cluster of 4, streamed
        _on_and_off(kernels, rng, name, (4, V), kw, define, **{switch: False})
    if switch == "fast_log":
        z = make_logits(rng, (3, 1000), dtype=np.float32)
        p = np.zeros((3, 1000), np.float32)
        p[0, 7], p[1, [3, 900]], p[2, [5, 6, 500]] = 1.0, 0.5, (0.6, 0.3, 0.1)
        close(run(name, z, p), reference(name, z, p))
        assert f"#define {define} 1" in kernels[-1].rows.code
    assert getattr(fused_cupy, define) is True      # restored
    with pytest.raises(TypeError, match=f"{switch} must be True or False"):
        with fused_cupy.configured(**{switch: 1}):
            pass


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V, cluster", [(300, 2), (1000, 4), (2000, 8)])
def test_simt_blocks_meet_in_global_memory(simt, monkeypatch, name, V, cluster):
    """GPUs before Hopper: a row's 2, 4 or 8 blocks meet in global memory instead of a cluster,
    run as a GPU may run them (the whole grid, CLUSTER + 1 blocks live at a time, started in a
    random order, so that a row's blocks wait for others that start only when an earlier row
    ends); with a mask, a temperature and a target vocabulary of its own (two launches), and
    in one launch, which reads each logit and target entry once, as a cluster does."""
    small_blocks(monkeypatch)
    no_clusters(monkeypatch)
    kernels = built_kernels(monkeypatch)
    assert fused_cupy.plan(V)[1] == cluster
    rng = np.random.default_rng(V + 1)
    N, Vt = 5, V + 7
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, Vt), dtype=np.float32)
    kw = dict(mask=np.array([1, 1, 0, 1, 1], bool), temperature=0.7, draft_to_target=rng.permutation(Vt)[:V])
    close(run(name, z, p, **kw), reference(name, z, p, **kw))
    p = make_probs(rng, (N, V), dtype=np.float32)
    kw = {"lam": 0.3} if name == "lk_lambda" else {}
    close(run(name, z, p, **kw), reference(name, z, p, **kw))
    assert simt_cpu.meeting_blocks(kernels[-1].rows.code) == cluster and kernels[-1].rows.resident == cluster + 1
    logits_reads, target_reads, _ = kernels[-1].rows.reads[-1]
    assert (logits_reads, target_reads) == (N * V, N * V)


@pytest.mark.parametrize("resident", [2, 4, 7, 20])
def test_simt_meeting_blocks_need_only_one_rows_blocks_live(simt, monkeypatch, resident):
    """Blocks that meet take their rows in the order they start, so the grid finishes with as
    few as CLUSTER blocks live at once (4 here), in any start order; with fewer, no row can
    meet, and the stand-in reports the deadlock."""
    small_blocks(monkeypatch)
    no_clusters(monkeypatch, resident=resident)
    rng = np.random.default_rng(resident)
    z = make_logits(rng, (5, 1000), dtype=np.float32)
    p = make_probs(rng, (5, 1000), dtype=np.float32)
    assert fused_cupy.plan(1000)[1] == 4
    if resident < 4:
        with pytest.raises(AssertionError, match="deadlock: blocks wait in a spin loop"):
            run("lk_alpha", z, p)
    else:
        close(run("lk_alpha", z, p), reference("lk_alpha", z, p))


@pytest.mark.parametrize("name, V, N, dtype, clusters", [("lk_alpha", 32_000, 2, np.float32, True),
                                                         ("lk_lambda", 128_256, 1, np.float16, True),
                                                         ("tv", 300_000, 1, np.float32, True),
                                                         ("lk_alpha", 128_256, 2, np.float32, False)])
def test_simt_at_the_benchmark_sizes(simt, monkeypatch, name, V, N, dtype, clusters):
    """The shipped configuration (512 threads, 16 384 floats a block): a cluster of 2, of 8,
    streaming, and (as on an A100) 8 blocks that meet in global memory; float16 logits with a
    float16 target, read as it is and kept in shared memory (all of it: 32 KiB a block)."""
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    kernels = built_kernels(monkeypatch)
    rng = np.random.default_rng(7)
    z = make_logits(rng, (N, V), dtype=dtype)
    p = make_probs(rng, (N, V), dtype=np.float32).astype(dtype)
    fast, ref = run(name, z, p), reference(name, z, p)
    if dtype == np.float16:                       # LK^lambda's batch lambda: statistics (target kept), gradient
        statistics, gradient = kernels[-2:]
        assert "typedef __half p_t;" in statistics.rows.code and statistics.smem == 2 * 32 * 512
        assert "typedef __half p_t;" in gradient.rows.code and gradient.smem == 0
    if dtype == np.float16:                       # the gradient is rounded to float16
        np.testing.assert_allclose(fast.grad.astype(np.float64), ref.grad, rtol=1e-3,
                                   atol=1e-3 * np.abs(ref.grad).max())
        np.testing.assert_allclose(fast.loss, ref.loss, rtol=1e-5)
    else:
        close(fast, ref)


def _wrong_forms(a):
    """What a host bug could pass instead of argument a: a Python number or another width for
    a value, another dtype or a strided view for an array."""
    if isinstance(a, np.ndarray):
        other = np.float64 if a.dtype.kind == "f" else np.int64
        strided = [np.repeat(a, 2)[::2]] if a.size > 1 else []      # one element is contiguous anyway
        return [a.astype(other), a.tolist()] + strided
    return [a.item(), np.float64(a) if isinstance(a, np.floating) else np.int64(a)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_simt_launches_pass_arguments_as_cupy_does(simt, monkeypatch, dtype):
    """Every launch the host makes (both kernels, weights and a target vocabulary of its own)
    passes each argument as its parameter's C type needs; each wrong form of any argument,
    and a missing argument, is refused by the stand-in (a GPU would read garbage)."""
    small_blocks(monkeypatch)
    launches = []
    real_call = simt_cpu.CpuKernel.__call__

    def recording(self, grid, block, args, shared_mem=0):
        launches.append((self, args))
        return real_call(self, grid, block, args, shared_mem)
    monkeypatch.setattr(simt_cpu.CpuKernel, "__call__", recording)
    rng = np.random.default_rng(3)
    z = make_logits(rng, (4, 300), dtype=dtype)
    p = make_probs(rng, (4, 310), dtype=np.float32)
    run("lk_lambda", z, p, mask=rng.random(4), draft_to_target=rng.permutation(310)[:300])
    assert {kern.name for kern, _ in launches} == {"lk_rows", "lk_finish"}
    for kern, args in launches:
        kern.check_arguments(args)
        for k, a in enumerate(args):
            for wrong in _wrong_forms(a):
                with pytest.raises(AssertionError, match=f"argument {k}:"):
                    kern.check_arguments(args[:k] + (wrong,) + args[k + 1:])
        with pytest.raises(AssertionError, match="arguments for"):
            kern.check_arguments(args[:-1])


def test_each_device_builds_its_own_kernels(simt, monkeypatch):
    """One process, two GPUs: each device builds its own kernels for a variant, with the
    shared-memory opt-in set on them and the target cache sized to that device's limit.  CuPy
    sets the opt-in on the current device's function only (it loads a module once a device),
    so a kernel opted in on one device would be refused on the other at V = 12 000 (48 KiB of
    target cache), and a GPU with less shared memory could not hold the other's cache."""
    built = built_kernels(monkeypatch)
    device = {"id": 0}
    optins = {0: simt_cpu.SMEM_OPTIN_MAX, 1: 32 * 1024}                # 1: 15 of 24 entries fit
    monkeypatch.setattr(fused_cupy, "current_device", lambda cp: device["id"])
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: optins[device["id"]])
    rng = np.random.default_rng(9)
    z = make_logits(rng, (2, 12_000), dtype=np.float32)
    p = make_probs(rng, (2, 12_000), dtype=np.float32)
    for dev in (0, 1, 0, 1):
        device["id"] = dev
        close(run("lk_alpha", z, p), reference("lk_alpha", z, p))
    assert built[0] is not built[1] and [id(k) for k in built] == [id(k) for k in built[:2]] * 2   # once a device
    assert [k.smem for k in built[:2]] == [4 * 24 * 512, 4 * 15 * 512]
    assert [k.rows.max_dynamic_shared_size_bytes for k in built[:2]] == [k.smem for k in built[:2]]


def test_simt_dynamic_shared_memory_needs_the_opt_in(simt, monkeypatch):
    """At 512 threads the target cache of a row of V = 13 000 takes 53 KiB of shared memory,
    of V = 12 000 exactly 48 KiB: with lk_rows' static shared memory both exceed the 48 KiB a
    block gets without max_dynamic_shared_size_bytes, which fused_cupy._kernel sets (it once
    set it only beyond 48 KiB of dynamic memory, and so failed at V = 11 777 to 12 288).  A
    launch without it is refused.  A GPU with less shared memory keeps as many of each thread's
    target entries as fit; where the opt-in is refused all the same (or the GPU's limit is
    unknown and too small), the kernel is rebuilt without the target cache; each computes the loss."""
    built = built_kernels(monkeypatch)
    rng = np.random.default_rng(5)
    for V, items in ((13_000, 26), (12_000, 24)):
        z = make_logits(rng, (1, V), dtype=np.float32)
        p = make_probs(rng, (1, V), dtype=np.float32)
        close(run("lk_alpha", z, p), reference("lk_alpha", z, p))
        assert built[-1].smem == 4 * items * 512 >= simt_cpu.SMEM_DEFAULT
        assert built[-1].rows.max_dynamic_shared_size_bytes == built[-1].smem
    built[-1].rows._smem_limit = None                  # as if never opted in
    with pytest.raises(AssertionError, match="without max_dynamic_shared_size_bytes"):
        run("lk_alpha", z, p)
    monkeypatch.setattr(simt_cpu, "SMEM_OPTIN_MAX", 32 * 1024)        # 15 of 24 entries fit with 2 KiB to spare
    fused_cupy._cache.clear()
    close(run("lk_alpha", z, p), reference("lk_alpha", z, p))
    assert built[-1].smem == 4 * 15 * 512 and "#define PCACHE 15" in built[-1].rows.code
    assert built[-1].rows.max_dynamic_shared_size_bytes == built[-1].smem
    for optin in (None, 32 * 1024):                     # unknown (the opt-in then fails), or refused anyway
        monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: optin)
        if optin:
            monkeypatch.setattr(simt_cpu, "SMEM_OPTIN_MAX", 16 * 1024)
        fused_cupy._cache.clear()
        close(run("lk_alpha", z, p), reference("lk_alpha", z, p))
        assert built[-1].smem == 0 and "#define PCACHE 0" in built[-1].rows.code
    assert built[-1].finish.code == built[-1].rows.code and built[-1].finish.options == built[-1].rows.options


@pytest.mark.skipif(not simt_cpu.FLUSHES_DENORMALS, reason="the stand-in flushes denormals on x86 and AArch64 only")
def test_simt_flushes_denormals_as_cupy_compiles(simt, monkeypatch):
    """CuPy compiles every kernel with -ftz=true: float32 results below 2^-126 become 0 on the
    GPU, and so on the stand-in.  A logit 95 below the row's max gives q = e^-95 ~ 5e-42, a
    denormal: its gradient entry is exactly 0 here, where NumPy (no flush) keeps ~1e-42; the
    loss and the rest of the gradient agree with the reference as everywhere else."""
    small_blocks(monkeypatch)
    z = np.zeros((2, 40), np.float32)
    z[:, 1] = -95.0
    p = np.full((2, 40), 0.5 / 39, np.float32)
    p[:, 0] = 0.5                                    # q_0 = 1/39 < p_0: a gradient entry far from 0
    for name in ("tv", "lk_alpha"):
        fast, ref = run(name, z, p), reference(name, z, p)
        numpy_fast = lkref.LOSSES[name](z, p, impl="fused")        # lkref's NumPy fast path: no flush
        assert 0 < abs(float(numpy_fast.grad[0, 1])) < 1e-38
        assert fast.grad[0, 1] == 0 and fast.grad[0, 0] != 0
        close(fast, ref)


@pytest.mark.parametrize("V, plan", [(12_288, (24, 1)), (16_384, (32, 1)), (16_385, (17, 2)),
                                     (131_072, (32, 8)), (131_073, (0, 1))])
def test_simt_plan_boundaries_at_the_shipped_shape(simt, V, plan):
    """The row lengths where the shipped launch shape changes: a 48 KiB target cache (the
    opt-in boundary), the most entries per thread, the first cluster, the largest cluster,
    the first streamed row."""
    assert fused_cupy.plan(V) == plan
    rng = np.random.default_rng(V)
    z = make_logits(rng, (1, V), dtype=np.float32)
    p = make_probs(rng, (1, V), dtype=np.float32)
    close(run("lk_alpha", z, p, temperature=0.7), reference("lk_alpha", z, p, temperature=0.7))


# kernel bugs planted in the source; the SIMT stand-in must catch each one
PLANTED = {
    "race in the block sum": ("    if (lane == 0) for (int k = 0; k < K; k++) sh[k * 32 + warp] = v[k];\n    __syncthreads();",
                              "    if (lane == 0) for (int k = 0; k < K; k++) sh[k * 32 + warp] = v[k];\n",
                              "depends on the thread schedule"),
    "cluster exits while read": (  # the arrival (that it has read the others) before the reads
        "    combine<K, false>([&](int k, int j) { return cluster.map_shared_rank(xchg_sum, k)[j]; }, 1.f, v);\n"
        "    cluster.barrier_arrive();\n",
        "    cluster.barrier_arrive();\n"
        "    combine<K, false>([&](int k, int j) { return cluster.map_shared_rank(xchg_sum, k)[j]; }, 1.f, v);\n",
        "has exited"),
    "cluster: no wait before exit": ("    cg::this_cluster().barrier_wait();\n", "", "has exited|never waited for"),
    "cluster: a block's sum not rescaled to the row's max": ("v[1] = warp_sum(sk > 0.f ? sk * (expf)((mk - m) / T) : 0.f);",
                                                             "v[1] = warp_sum(sk);", None),
    "cluster: the block's exps not moved to the row's max": ("to_row = acc[0] > 0.f ? (expf)(-shift) : 0.f;",
                                                            "to_row = 1.f;", None, {"name": "lk_alpha"}),
    "cluster: the block's x not moved to the row's max": ("xr[i] = need_x ? xr[i] - shift_u : xr[i];",
                                                         "xr[i] = need_x ? xr[i] : xr[i];", None),
    "exp2: u without the factor log2 e": ("#define U_PER_X 1.4426950408889634f", "#define U_PER_X 1.f", None),
    "exp2: the KL sums left in base-2 units": ("        acc[3] *= X_PER_U;", "", None),
    "vec: a quad past the row's end taken as in it": ("#define IN(i) (tid + COL((i) & ~3) < V)",
                                                       "#define IN(i) (tid + COL((i) & ~3) < V + 4)",
                                                       None, {"V": 1020}),
    "vec: the gradient's quad stored a column off": ("const int v4 = v - 3;", "const int v4 = v - 2;",
                                                    "not 16-byte aligned"),
    "vec: the target's quad read at its last column": (
        "if ((i & 3) == 0) p4 = kept ? KEPT4(i) : in ? load4(pr + v) :",
        "if ((i & 3) == 3) p4 = kept ? KEPT4(i - 3) : in ? load4(pr + v - 3) :", None),
    "vec: a kept target quad read from the next quad's slots": (
        "p4 = i < PCACHE ? KEPT4(i) : in ?", "p4 = i < PCACHE ? KEPT4(i ^ 4) : in ?", None),
    "vec: the kept target's slots past the row's end not zeroed": (
        "        else store4(&p_cache[SLOT(i)], make_float4(0.f, 0.f, 0.f, 0.f));", "", None),
    "pipeline: the stage's target slots past the row's end not zeroed": (
        "                store4(&p_cache[SLOT(i)], make_float4(0.f, 0.f, 0.f, 0.f));   // past the row: p = 0\n", "",
        None, {"name": "lk_alpha", "pipeline": True}),
    "log: p = 0 not floored before its log (0 log 0 is NaN)": (
        "const float floored = fmaxf(p, 1.17549435e-38f);", "const float floored = p;", None, {"name": "kl"}),
    "barrier in divergent code": ("    if (warp == 0) v = warp_max(v);", "    if (warp == 0) { v = warp_max(v); __syncthreads(); }",
                                  "deadlock"),
    "stats written off by one": ("float* st = stats + row * 8;", "float* st = stats + row * 8 + 1;",
                                 "wrote outside an array"),
    "blocks of a cluster overlap": ("rank * THREADS * (ITEMS > 0 ? ITEMS : 0)", "rank * THREADS", None),
    "the mean misses the last row": ("for (int r = threadIdx.x; r < N; r += THREADS)",
                                     "for (int r = threadIdx.x; r < N - 1; r += THREADS)", None),
    "the result's lambda not written": ("        out[7] = lam;", "        out[7] = 0.f;", None),
    "the target read before its copy lands": ("        wait_copies();\n#if P_ASYNC == 2\n", "#if P_ASYNC == 2\n", None),
    "a 2-byte target read before its copy lands (4 entries a copy)": (
        "        wait_copies();\n#if P_ASYNC == 2\n", "#if P_ASYNC == 2\n", None, {"name": "lk_alpha", "p_dtype": np.float16}),
    "a 2-byte target not kept at its first read": ("p_cache[SLOT(i)] = raw;", "", None,
                                                   {"name": "lk_alpha", "p_dtype": np.float16, "vec": False}),
    "pairs: no __syncwarp between the copies and the reads": (
        "        __syncwarp();                                    // the pairs the warp's other lanes copied\n", "",
        None, {"name": "lk_alpha", "p_dtype": np.float16, "pairs": True, "vec": False}),
    "pairs: a lane copies the wrong pair": ("const int lane = threadIdx.x & 31, k = 2 * (lane & 15);",
                                            "const int lane = threadIdx.x & 31, k = lane & 15;", None,
                                            {"name": "lk_alpha", "p_dtype": np.float16, "pairs": True, "vec": False}),
    # PIPELINE: a persistent grid with the rows ahead copied into shared memory
    "pipeline: a row's stage read before its copies land": (
        "    wait_copies_but<PIPE - 1>();", "    wait_copies_but<PIPE>();", None, {"name": "lk_alpha", "pipeline": True}),
    "pipeline: the rows ahead copied into this row's stage": (
        "        const int ahead = (int)((k + PIPE - 1) % PIPE);", "        const int ahead = (int)(k % PIPE);", None,
        {"name": "lk_alpha", "pipeline": True}),
    # in blocks that meet in global memory (run as on a GPU without clusters)
    "meeting: rows by blockIdx, not by start order": ("        row = ticket / CLUSTER;\n        rank = ticket % CLUSTER;\n",
                                                      "", "deadlock"),
    "meeting: no wait for the other blocks": ("        while (arrivals(r.arrived) < r.round * CLUSTER) pause_briefly();\n",
                                              "", "depends on the thread schedule"),
    "streaming: the sum not moved to a larger logit": ("lsum = lsum * EXP_U((lmax - zv) * rT) + 1.f;",
                                                       "lsum = lsum + 1.f;", None, {"V": 3000}),
    "streaming: the thread's sum not moved to the block's max": (
        "acc[0] = lsum > 0.f ? lsum * (expf)((lmax - mb) / T) : 0.f;", "acc[0] = lsum;", None, {"V": 3000}),
    "meeting: the block reads before thread 0 saw every count": (
        "    __syncthreads();                                  // the block's reads after thread 0 saw the count\n",
        "", None),
    "meeting: a wait for one block too few": ("arrivals(r.arrived) < r.round * CLUSTER)",
                                              "arrivals(r.arrived) < r.round * CLUSTER - 1)", None),
    "meeting: the count announced before a fence": ("    __threadfence();\n    count_in(counter);", "    count_in(counter);",
                                                    None),
    "meeting: no fence between the count and the reads": (
        "        __threadfence();                              // the partial results after their count\n", "", None),
    "meeting: the rounds share their slots": ("publish(&r.parts[r.rank * SLOTS + at + j], v[j])", "publish(&r.parts[r.rank * SLOTS + j], v[j])",
                                              None),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_simt_catches_planted_kernel_bugs(simt, monkeypatch, bug):
    """Negative controls for the stand-in: each planted bug fails, the unchanged source passes
    (LK^lambda, which takes every statistic, on rows of 1000 in clusters of 4 small blocks, or
    the loss and row length named after the bug's message)."""
    small_blocks(monkeypatch)
    if bug.startswith("meeting:"):
        no_clusters(monkeypatch)
    old, new, message, *how = PLANTED[bug]
    how = {"name": "lk_lambda", "V": 1000, "p_dtype": np.float32, "pairs": False, "vec": True, "pipeline": False,
           **(how[0] if how else {})}
    name = how["name"]
    monkeypatch.setattr(fused_cupy, "PAIR_PREFETCH", how["pairs"])
    monkeypatch.setattr(fused_cupy, "VEC", how["vec"])
    if how["pipeline"]:                           # one cluster goes through every row
        monkeypatch.setattr(fused_cupy, "PIPELINE", True)
        monkeypatch.setattr(fused_cupy, "_resident_clusters", lambda cp, smem, cluster, N, regs=None: 1)
    assert fused_cupy._SOURCE.count(old) == 1
    rng = np.random.default_rng(11)
    z = make_logits(rng, (5, how["V"]), dtype=np.float32)
    p = make_probs(rng, (5, how["V"]), dtype=np.float32).astype(how["p_dtype"])
    close(run(name, z, p), reference(name, z, p))
    monkeypatch.setattr(fused_cupy, "_SOURCE", fused_cupy._SOURCE.replace(old, new))
    fused_cupy._cache.clear()                     # the kernels built from the unchanged source
    z = z[::-1].copy()           # other rows: what the last run left in reused memory (partial results) is wrong now
    if message is None:                           # a wrong result: the comparison or a check fails
        with pytest.raises((AssertionError, ValueError)):
            close(run(name, z, p), reference(name, z, p))
    else:
        with pytest.raises(AssertionError, match=message):
            run(name, z, p)


@pytest.mark.parametrize("threads, share, V, cache, cluster", [
    (1024, 32_768, 5_000, True, 1), (128, 8_192, 9_000, True, 2), (64, 8_192, 40_000, True, 8),
    (256, 16_384, 9_000, True, 1), (512, 16_384, 40_000, False, 4), (512, 8_192, 7_000, False, 1),
    (256, 8_192, 32_000, True, 4)])
def test_simt_other_launch_shapes(simt, threads, share, V, cache, cluster):
    """The tuning shapes `configured` offers (bench tries them on a GPU) compute the same thing."""
    rng = np.random.default_rng(threads + V)
    z = make_logits(rng, (3, V), dtype=np.float32)
    p = make_probs(rng, (3, V), dtype=np.float32)
    with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache):
        assert fused_cupy.plan(V)[1] == cluster
        fast = run("lk_alpha", z, p, temperature=1.3)
    close(fast, reference("lk_alpha", z, p, temperature=1.3))
    assert (fused_cupy.THREADS, fused_cupy.BLOCK_SHARE, fused_cupy.MAX_ITEMS, fused_cupy.CACHE_TARGET) == \
        (512, 16_384, 32, True)                     # restored


@pytest.mark.parametrize("clusters", [True, False])
def test_simt_blocks_without_columns(simt, monkeypatch, clusters):
    """8 blocks per row whose last ones get no columns (V = 1025 over 8 x 64 threads x 3 items),
    in a cluster or meeting in global memory: they still take part in every reduction and
    write nothing."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    assert fused_cupy.plan(1025) == (3, 8) and 6 * 64 * 3 >= 1025
    rng = np.random.default_rng(14)
    z = make_logits(rng, (3, 1025), dtype=np.float32)
    p = make_probs(rng, (3, 1025), dtype=np.float32)
    for name in REDUCED:
        close(run(name, z, p), reference(name, z, p))


@pytest.mark.parametrize("kw, error", [({"threads": 100}, ValueError), ({"threads": 2.0}, TypeError),
                                       ({"block_share": 1000}, ValueError), ({"block_share": "two"}, TypeError),
                                       ({"cache_target": "no"}, TypeError), ({"clusters": 0}, TypeError),
                                       ({"pair_prefetch": "yes"}, TypeError), ({"l2_lead": True}, TypeError),
                                       ({"l2_lead": "1/4"}, ValueError), ({"l2_lead": -0.25}, ValueError),
                                       ({"l2_lead": 2.5}, ValueError), ({"l2_lead": float("nan")}, ValueError),
                                       ({"l2_lead": [0.5]}, TypeError)])
def test_configured_rejects_bad_shapes(kw, error):
    with pytest.raises(error, match=next(iter(kw))):
        with fused_cupy.configured(exp2=False, **kw):
            pass
    assert fused_cupy.THREADS == 512 and fused_cupy.BLOCK_SHARE == 16_384 and fused_cupy.L2_LEAD == 0   # restored
    assert fused_cupy.EXP2 is True


def test_launch_shape_from_the_environment(monkeypatch):
    for name in ("THREADS", "BLOCK_SHARE", "MAX_ITEMS", "CACHE_TARGET", "CLUSTERS", "PAIR_PREFETCH", "L2_LEAD"):
        monkeypatch.setattr(fused_cupy, name, getattr(fused_cupy, name))     # restored afterwards
    monkeypatch.setenv("LKREF_CUPY_L2_LEAD", "0.25")
    monkeypatch.setenv("LKREF_CUPY_THREADS", "256")
    monkeypatch.setenv("LKREF_CUPY_BLOCK_SHARE", "16384")
    monkeypatch.setenv("LKREF_CUPY_CACHE_TARGET", "0")
    monkeypatch.setenv("LKREF_CUPY_CLUSTERS", "0")
    monkeypatch.setenv("LKREF_CUPY_PAIR_PREFETCH", "1")
    fused_cupy._configure_from_environment()
    assert (fused_cupy.THREADS, fused_cupy.BLOCK_SHARE, fused_cupy.MAX_ITEMS, fused_cupy.CACHE_TARGET,
            fused_cupy.CLUSTERS, fused_cupy.PAIR_PREFETCH, fused_cupy.L2_LEAD) == (256, 16_384, 64, False, False, True, 0.25)
    with fused_cupy.configured(pair_prefetch=False, l2_lead=1):
        assert fused_cupy.PAIR_PREFETCH is False and fused_cupy.L2_LEAD == 1.0
    assert fused_cupy.PAIR_PREFETCH is True and fused_cupy.L2_LEAD == 0.25   # restored
    monkeypatch.setenv("LKREF_CUPY_L2_LEAD", "a quarter")
    with pytest.raises(ValueError, match="LKREF_CUPY_L2_LEAD must be a number"):
        fused_cupy._configure_from_environment()
    monkeypatch.delenv("LKREF_CUPY_L2_LEAD")
    monkeypatch.setenv("LKREF_CUPY_BLOCK_SHARE", "5")
    with pytest.raises(ValueError, match="LKREF_CUPY_BLOCK_SHARE"):
        fused_cupy._configure_from_environment()


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(REDUCED), N=st.integers(1, 4),
       V=st.sampled_from([1, 2, 5, 63, 64, 65, 257, 700, 2049]), T=st.sampled_from([1.0, 0.5, 2.0]),
       mask=st.sampled_from([None, "bool", "weights"]), d2t=st.booleans(), lam=st.sampled_from([None, 0.3]),
       scale=st.sampled_from([0.1, 3.0, 30.0]), live=st.sampled_from([None, 0, 1, 1000]),
       kept=st.sampled_from([None, 0, 1, 3]), p16=st.booleans(), pairs=st.booleans())
def test_simt_kernel_matches_reference_property(simt, monkeypatch, seed, name, N, V, T, mask, d2t, lam, scale,
                                                 live, kept, p16, pairs):
    """Random problems through the kernel's own source (small blocks: one block, 2-8 blocks per
    row in a cluster or meeting in global memory, and streaming, by V), against the float64
    reference, within float32 rounding of the size of the terms (the bounds of tests/test_fused.py).
    live: None, a cluster; else blocks that meet, with CLUSTER + live blocks live at a time.
    kept: None, the whole target cache; else a GPU whose blocks have room for `kept` float32
    entries per thread.  p16: a float16 target (read as it is; the reference gets its values),
    pairs: copied in pairs where it can be (PAIR_PREFETCH)."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "PAIR_PREFETCH", pairs)
    if live is not None:
        no_clusters(monkeypatch, resident=lambda cluster: cluster + live)
    if kept is not None:
        monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: fused_cupy.STATIC_SMEM_ROOM + kept * 4 * 64)
    rng = np.random.default_rng(seed)
    z = make_logits(rng, (N, V), scale=scale, dtype=np.float32)
    Vt = V + 3 if d2t else V
    p = make_probs(rng, (N, Vt), zero_frac=0.4, dtype=np.float32).astype(np.float16 if p16 else np.float32)
    kw = {"temperature": T}
    if mask == "bool":
        kw["mask"] = rng.random(N) < 0.7
    elif mask == "weights":
        kw["mask"] = (rng.random(N) * 2).astype(np.float32)
    if d2t:
        kw["draft_to_target"] = rng.permutation(Vt)[:V]
    if name == "lk_lambda" and lam is not None:
        kw["lam"] = lam
    fast = run(name, z, p, **kw)
    ref = reference(name, z, p, **kw)
    eps = float(np.finfo(np.float32).eps)     # a Python float (see tests/test_fused.py)
    loss_scale = (kl_terms(z, p, T, kw.get("draft_to_target")) if name in ("kl", "lk_lambda") else 0.0) \
        + (1.0 if name != "kl" else 0.0) + abs(float(ref.loss))
    g_scale = grad_terms(ref, kw.get("mask"), T)
    np.testing.assert_allclose(fast.grad.astype(np.float64), ref.grad, rtol=2e-5, atol=8 * eps * g_scale + 1e-30)
    np.testing.assert_allclose(float(fast.loss), float(ref.loss), rtol=0, atol=8 * eps * loss_scale + 1e-30)
    np.testing.assert_allclose(fast.alpha.astype(np.float64), ref.alpha, rtol=2e-5, atol=8 * eps)


@pytest.mark.parametrize("V, name, kw, cache, want", [
    (1000, "lk_alpha", {}, True, [(1, 1, 1)]),             # a cluster of 4, registers + target cache: once each
    (1000, "lk_alpha", {}, False, [(1, 2, 1)]),            # without the cache the target is read twice
    (40, "lk_lambda", {"lam": 0.3}, True, [(1, 1, 2)]),     # a given lambda: one pass; the KL sums need x and q
    (40, "lk_lambda", {}, True, [(1, 1, 2), (1, 1, 1)]),    # lambda from the batch: stats, then gradient
    (3000, "tv", {}, True, [(3, 2, 3)]),                    # streaming: z for max and sum (one pass), stats, gradient
    (1000, "lk_alpha", {"p16": True}, True, [(1, 1, 1)]),   # a float16 target, kept at its first read: once
    (3000, "tv", {"p16": True}, True, [(3, 2, 3)]),         # ... streamed: twice, as a float32 one
])
def test_simt_global_reads_per_element(simt, monkeypatch, V, name, kw, cache, want):
    """How often the kernel reads each logit and each target entry, and takes an exp, per
    element, counted on the stand-in: the memory traffic the bandwidth goals assume (the
    logits once where the row fits in registers) and the exp count (one for LK^alpha)."""
    small_blocks(monkeypatch)
    kernels = built_kernels(monkeypatch)
    monkeypatch.setattr(fused_cupy, "CACHE_TARGET", cache)
    N = 3
    rng = np.random.default_rng(12)
    kw = dict(kw)
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, V), dtype=np.float32).astype(np.float16 if kw.pop("p16", False) else np.float32)
    run(name, z, p, **kw)
    counts = [c for k in kernels for c in k.rows.reads]
    assert [tuple(c / (N * V) for c in launch) for launch in counts] == want


@pytest.mark.parametrize("clusters", [True, False])
def test_simt_partial_target_cache(simt, monkeypatch, clusters):
    """A GPU whose blocks may keep only part of their target entries in shared memory (99 KiB
    on sm_86/89/120 against 126 KiB at the default shape): each thread keeps its first entries
    and reads the others again for the gradient, so the target is read 1 + (the share not
    kept) times per element rather than twice (counted); the loss is the same.  A float16
    target, half the bytes, is kept whole in the same room: read once."""
    small_blocks(monkeypatch)                       # 64 threads x 4 entries; V = 1000: 4 blocks per row
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: fused_cupy.STATIC_SMEM_ROOM + 2 * 4 * 64 + 100)
    kernels = built_kernels(monkeypatch)
    N, V = 3, 1000
    rng = np.random.default_rng(21)
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = make_probs(rng, (N, V), dtype=np.float32)
    for name in ("lk_alpha", "kl"):
        close(run(name, z, p), reference(name, z, p))
        assert "#define PCACHE 2" in kernels[-1].rows.code and kernels[-1].smem == 2 * 4 * 64
        kept = (np.arange(V) % 256) // 64 < 2       # entry i of its thread: the first 2 of 4 are kept
        assert kernels[-1].rows.reads[-1][:2] == (N * V, N * (V + int((~kept).sum())))
        p16 = p.astype(np.float16)
        close(run(name, z, p16), reference(name, z, p16))
        assert "#define PCACHE 4" in kernels[-1].rows.code and kernels[-1].smem == 4 * 2 * 64
        assert kernels[-1].rows.reads[-1][:2] == (N * V, N * V)
    # negative control: the gradient takes every entry from the cache, also those not kept there
    kept_only = "phase == 0 && i < PCACHE ? to_f(p_cache[SLOT(i)]) : target(pr, idx, has_idx, v)"
    assert fused_cupy._SOURCE.count(kept_only) == 1
    monkeypatch.setattr(fused_cupy, "_SOURCE", fused_cupy._SOURCE.replace(kept_only, "phase == 0 ? to_f(p_cache[SLOT(i)]) : target(pr, idx, has_idx, v)"))
    fused_cupy._cache.clear()
    with pytest.raises((AssertionError, ValueError)):
        close(run("lk_alpha", z, p), reference("lk_alpha", z, p))


def _traced_run(monkeypatch, name, z, p, **kw):
    """The loss on the stand-in with lk_rows' memory traffic recorded: (result, {kind: bytes /
    (32 x sectors)}) over its launches, 1.0 where every warp's accesses coalesce fully."""
    kernels = built_kernels(monkeypatch, trace=True)
    result = run(name, z, p, **kw)
    totals = {kind: [0, 0] for kind in simt_cpu.TRAFFIC_KINDS}
    for k in kernels:
        for launch in k.rows.traffic:
            for kind, (nbytes, sectors) in launch.items():
                totals[kind][0] += nbytes
                totals[kind][1] += sectors
    return result, {kind: nbytes / (32 * sectors) for kind, (nbytes, sectors) in totals.items() if sectors}


# item i of a thread at column tid + i * THREADS (a warp's 32 lanes on 32 adjacent entries)
# replaced by each thread taking ITEMS adjacent entries: the same columns per block, so the same
# losses, but a warp's accesses spread over ITEMS times as many sectors (one column at a time:
# fused_cupy.VEC off, whose 4 adjacent columns a thread this would not spread)
STRIDED = (("#define COL(i) ((i) * THREADS)\n#define LANE0 threadIdx.x\n", "#define COL(i) (i)\n#define LANE0 (ITEMS * threadIdx.x)\n"),)


@pytest.mark.parametrize("V, dtype, plan", [(200, np.float32, (4, 1)), (1000, np.float32, (4, 4)),
                                            (3000, np.float32, (0, 1)), (1024, np.float16, (4, 4)),
                                            (32_000, np.float32, (32, 2))])
def test_simt_warp_accesses_coalesce(simt, monkeypatch, V, dtype, plan):
    """Every warp-wide read of the logits and the target, and every store of the gradient,
    touches only the 32-byte sectors its bytes need (rows start on sector boundaries here, as
    V x itemsize is a multiple of 32): what reaching the memory's bandwidth needs, measured on
    the stand-in.  Negative control: the same kernel with each thread on adjacent entries
    computes the same loss but wastes most of each sector.  V = 32 000 runs the shipped
    512-thread blocks (63 entries per thread), the others 64-thread ones."""
    if V != 32_000:
        small_blocks(monkeypatch)
    assert fused_cupy.plan(V) == plan
    rng = np.random.default_rng(V)
    z = make_logits(rng, (3, V), dtype=dtype)
    p = make_probs(rng, (3, V), dtype=np.float32)
    mask = rng.random(3)
    result, efficiency = _traced_run(monkeypatch, "lk_lambda", z, p, mask=mask)
    assert efficiency == {"logits": 1.0, "target": 1.0, "gradient": 1.0}
    if plan[0] == 0:                                # streaming: no per-thread items to plant
        return
    for old, new in STRIDED:
        assert fused_cupy._SOURCE.count(old) == 1
        monkeypatch.setattr(fused_cupy, "_SOURCE", fused_cupy._SOURCE.replace(old, new))
    fused_cupy._cache.clear()
    with fused_cupy.configured(vec=False):
        planted, worse = _traced_run(monkeypatch, "lk_lambda", z, p, mask=mask)
    close(planted, result)                          # the same loss and gradient, to rounding
    assert all(worse[kind] < 0.5 for kind in worse), worse


def test_out_may_be_the_logits_even_with_fallback_rows(numpy_as_cupy):
    """out=draft_logits: the gradient overwrites the logits, which the LK^alpha fallback rows
    (alpha below float32's range) still have to read; they must be read first."""
    z = np.zeros((3, 50), np.float32)
    z[0, 0] = 150.0
    p = np.full((3, 50), 1 / 49, np.float32)
    p[0, 0] = 0
    p[1:] = 1 / 50
    ref = lkref.lk_alpha(z.astype(np.float64), p.astype(np.float64), impl="reference")
    buf = z.copy()
    fast = run("lk_alpha", buf, p, out=buf)
    assert fast.grad is buf
    close(fast, ref, rtol=1e-4)


@pytest.mark.parametrize("bad", ["shape", "dtype", "strided", "target"])
def test_out_is_checked(numpy_as_cupy, bad):
    rng = np.random.default_rng(7)
    z = make_logits(rng, (4, 10), dtype=np.float32)
    p = make_probs(rng, (4, 10), dtype=np.float32)
    out = {"shape": np.empty((4, 11), np.float32), "dtype": np.empty((4, 10), np.float16),
           "strided": np.empty((4, 20), np.float32)[:, ::2], "target": p}[bad]
    with pytest.raises(ValueError, match="out "):
        run("tv", z, p, out=out)


def test_check_out_on_a_device_array_type():
    """CuPy arrays have no `writeable` flag and no ctypes: the checks use flags.c_contiguous
    and data.ptr.  A minimal stand-in type with just those."""
    import types
    from lkref.fused import check_out

    class DeviceArray:
        def __init__(self, ptr, shape=(4, 10), strides=(40, 4)):
            self.shape, self.strides, self.dtype, self.itemsize = shape, strides, np.dtype(np.float32), 4
            self.flags = types.SimpleNamespace(c_contiguous=strides == (40, 4))
            self.data = types.SimpleNamespace(ptr=ptr)
    z, p = DeviceArray(1000), DeviceArray(5000)
    assert check_out(DeviceArray(9000), z, p, None, same_backend=True) is not None
    assert check_out(z, z, p, None, same_backend=True) is z                 # the logits themselves
    with pytest.raises(ValueError, match="share memory"):
        check_out(DeviceArray(5080), z, p, None, same_backend=True)          # inside the target
    with pytest.raises(ValueError, match="overlaps draft_logits"):
        check_out(DeviceArray(1040), z, p, None, same_backend=True)          # half over the logits
    with pytest.raises(ValueError, match="C-contiguous"):
        check_out(DeviceArray(9000, strides=(80, 8)), z, p, None, same_backend=True)
    with pytest.raises(ValueError, match="backend"):
        check_out(np.empty((4, 10), np.float32), z, p, None, same_backend=True)


@pytest.mark.parametrize("V, clusters", [(300, True), (300, False), (3000, True)])
@pytest.mark.parametrize("name", ["kl", "lk_lambda"])
def test_simt_out_is_the_logits_in_clusters_and_streaming(simt, monkeypatch, name, V, clusters):
    """out=draft_logits where a row is split over a cluster or blocks that meet in global memory
    (V = 300) or streamed (V = 3000): every logit is read before its gradient overwrites it."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    rng = np.random.default_rng(V)
    z = make_logits(rng, (3, V), dtype=np.float32)
    p = make_probs(rng, (3, V), dtype=np.float32)
    want = reference(name, z, p, temperature=1.5)
    buf = z.copy()
    got = run(name, buf, p, out=buf, temperature=1.5)
    assert got.grad is buf
    close(got, want)


@pytest.fixture
def counting(monkeypatch):
    """CuPy replaced by tests/device_ops.py's counting stand-in, the kernels by their transcriptions."""
    from . import device_ops
    stand_in(monkeypatch, device_ops.module, lambda *a: fused_cupy.Kernels(
        device_ops.launch(kernel_on_the_cpu), device_ops.launch(finish_on_the_cpu), 0))
    device_ops.log.clear()
    return device_ops


@pytest.mark.parametrize("name, kw, ops, waits", [
    ("lk_alpha", {}, 0, 1), ("tv", {}, 0, 1), ("kl", {}, 0, 1), ("lk_lambda", {"lam": 0.3}, 0, 1),
    ("lk_alpha", {"mask": "bool"}, 2, 1),        # the mask to float, its sum
    ("lk_alpha", {"mask": "weights"}, 5, 2),     # + the mask check's min and sum, stacked: one wait
    ("lk_lambda", {}, 0, 1)])                    # two passes: lambda and the mean from the same wait
def test_calls_wait_for_the_device_once(counting, name, kw, ops, waits):
    """What a call asks of the device: lk_rows and lk_finish (twice each for LK^lambda's batch
    lambda), one transfer to the host (the input flags and the sums, after lk_finish), and no
    other array operation without a mask.
    On a GPU each operation costs the host microseconds while the device waits, and each
    transfer waits for the device: the 0.75 ms goal at N = 4096, V = 32 000 has no room for
    the dozens of small CuPy operations the loss, the mean and the checks would otherwise take."""
    rng = np.random.default_rng(13)
    z, p = make_logits(rng, (6, 50), dtype=np.float32), make_probs(rng, (6, 50), dtype=np.float32)
    mask = {None: None, "bool": np.array([1, 0, 1, 1, 1, 0], bool),
            "weights": np.array([1, 0, 2, 0.5, 1, 0], np.float32)}[kw.get("mask")]
    fast = run(name, counting.counted(z), counting.counted(p),
               **dict(kw, mask=None if mask is None else counting.counted(mask)))
    log = dict(counting.log)
    close(fast, reference(name, z, p, **dict(kw, mask=mask)))
    launches = 4 if name == "lk_lambda" and "lam" not in kw else 2
    assert log == {"launches": launches, "to_host": waits, **({"ops": ops} if ops else {})}


@pytest.mark.parametrize("name", REDUCED)
def test_no_rows_launches_no_row_kernel(counting, name):
    """N = 0: a grid of no blocks is an error on a GPU, so lk_rows is not launched; the mean of
    nothing is 0, as on the reference path."""
    z, p = np.zeros((0, 10), np.float32), np.zeros((0, 10), np.float32)
    fast = run(name, counting.counted(z), counting.counted(p))
    assert counting.log["launches"] == (2 if name == "lk_lambda" else 1)     # lk_finish (twice for LK^lambda's lambda)
    want = reference(name, z, p)
    assert fast.grad.shape == (0, 10) and fast.alpha.shape == (0,) and float(fast.loss) == float(want.loss) == 0
    if name == "lk_lambda":
        assert float(fast.lam) == float(want.lam)


@pytest.mark.parametrize("clusters, ops", [(True, 0), (False, 1)])
def test_blocks_that_meet_in_memory_add_one_operation(counting, monkeypatch, clusters, ops):
    """With 2 blocks per row (V = 300 in small blocks), a GPU without clusters has them meet in
    global memory, whose counters are zeroed for each call: one more operation (a memset on a
    GPU), still one wait; a cluster needs none."""
    small_blocks(monkeypatch)
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: clusters)
    assert fused_cupy.plan(300)[1] == 2
    rng = np.random.default_rng(15)
    z, p = make_logits(rng, (6, 300), dtype=np.float32), make_probs(rng, (6, 300), dtype=np.float32)
    fast = run("lk_alpha", counting.counted(z), counting.counted(p))
    log = dict(counting.log)
    close(fast, reference("lk_alpha", z, p))
    assert log == {"launches": 2, "to_host": 1, **({"ops": ops} if ops else {})}
