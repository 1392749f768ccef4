"""The fast paths (lkref/fused.py) against the readable path (lkref/losses.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import lkref
from lkref import fused
from lkref import losses as L

from .bounds import grad_terms, kl_terms
from .strategies import make_logits, make_probs

REDUCED = ["kl", "tv", "lk_alpha", "lk_lambda"]
# fused vs reference: float64 agrees to a few ulps of the largest value; float32 to float32 rounding
TOL = {np.float64: dict(rtol=1e-9, atol=1e-14), np.float32: dict(rtol=2e-5, atol=2e-8)}


def both(name, z, p, **kw):
    ref = lkref.LOSSES[name](z, p, impl="reference", **kw)
    fast = lkref.LOSSES[name](z, p, impl="fused", **kw)
    return ref, fast


def assert_same(ref, fast, dtype, loss_scale=0.0, grad_scale=0.0):
    """loss_scale: the size of the sums the loss is a difference of: 1 for alpha (a sum of
    terms <= 1, so 1 - alpha and -log alpha near 0 carry ~eps of absolute rounding) plus
    kl_terms(...) for KL; grad_scale: grad_terms(...).  Each widens the absolute tolerance
    by 4 eps of that size."""
    tol = TOL[dtype]
    eps = float(np.finfo(dtype).eps)          # a Python float: NumPy would round a bound beyond float32's range to it
    scale = max(float(np.max(np.abs(ref.grad.astype(np.float64)))), 1e-30)
    assert fast.grad.dtype == ref.grad.dtype and fast.grad.shape == ref.grad.shape
    np.testing.assert_allclose(fast.grad, ref.grad, rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * scale + 4 * eps * grad_scale)
    loss_atol = tol["atol"] + 4 * eps * loss_scale
    np.testing.assert_allclose(fast.loss, ref.loss, rtol=tol["rtol"], atol=loss_atol)
    np.testing.assert_allclose(fast.alpha, ref.alpha, rtol=tol["rtol"], atol=tol["atol"])
    assert fast.loss.dtype == ref.loss.dtype and fast.alpha.dtype == ref.alpha.dtype
    if ref.lam is not None:
        np.testing.assert_allclose(fast.lam, ref.lam, rtol=tol["rtol"])


@pytest.fixture(params=[(64, 1), (1 << 10, 3), (1 << 20, 2)], ids=["row-chunks-1-thread", "small-chunks-3-threads",
                                                                     "default-chunks-2-threads"])
def chunking(request, monkeypatch):
    """Force chunk boundaries and threads, so that every code path of the chunk loop runs."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", request.param[0])
    monkeypatch.setenv("LKREF_THREADS", str(request.param[1]))
    return request.param


@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(REDUCED), dtype=st.sampled_from([np.float64, np.float32]),
       N=st.integers(1, 12), V=st.integers(1, 40), T=st.sampled_from([1.0, 0.5, 2.0]),
       mask=st.sampled_from([None, "bool", "weights"]), d2t=st.booleans(), lam=st.sampled_from([None, 0.3]))
def test_fused_matches_reference(chunking, seed, name, dtype, N, V, T, mask, d2t, lam):
    rng = np.random.default_rng(seed)
    z = make_logits(rng, (N, V), scale=3.0, dtype=dtype)
    Vt = V + 3 if d2t else V
    p = make_probs(rng, (N, Vt), zero_frac=0.4, dtype=dtype)
    kw = {"temperature": T}
    if mask == "bool":
        kw["mask"] = rng.random(N) < 0.7
    elif mask == "weights":
        kw["mask"] = rng.random(N) * 2
    if d2t:
        kw["draft_to_target"] = rng.permutation(Vt)[:V]
        p[0] = 0
        p[0, list(set(range(Vt)) - set(kw["draft_to_target"].tolist()))] = 1 / 3   # a row with no mass on D
    if name == "lk_lambda" and lam is not None:
        kw["lam"] = lam
    if N > 1 and not d2t:
        p[1] = L.softmax(z[1], T).astype(dtype)           # a row of exact ties (q == p)
    ref, fast = both(name, z, p, **kw)
    loss_scale = (kl_terms(z, p, T, kw.get("draft_to_target")) if name in ("kl", "lk_lambda") else 0.0) \
        + (1.0 if name != "kl" else 0.0)
    assert_same(ref, fast, dtype, loss_scale, grad_terms(ref, kw.get("mask"), T))


@pytest.mark.parametrize("name", REDUCED)
def test_ties_and_disjoint_rows_across_chunks(chunking, name):
    rng = np.random.default_rng(0)
    N, V = 40, 33
    z = make_logits(rng, (N, V), scale=2.0)
    p = make_probs(rng, (N, V))
    p[::3] = L.softmax(z[::3])                         # exact ties: zero gradient rows
    z[1::6] = 0.0
    z[1::6, 0] = 3000.0                                # disjoint supports: alpha = e^-3000
    p[1::6] = 0.0
    p[1::6, 5] = 1.0
    ref, fast = both(name, z, p)
    assert_same(ref, fast, np.float64)
    if name in ("tv", "lk_alpha"):
        assert np.all(fast.grad[::3] == 0)
    if name == "lk_alpha":
        assert float(fast.loss) > 3000 / 6 * 0.9 and np.isfinite(fast.grad).all()


def test_float16_input(chunking):
    rng = np.random.default_rng(1)
    z = make_logits(rng, (20, 50), dtype=np.float16)
    p = make_probs(rng, (20, 50), dtype=np.float32)
    for name in REDUCED:
        ref, fast = both(name, z, p)
        assert fast.grad.dtype == np.float16 and fast.loss.dtype == np.float32
        np.testing.assert_allclose(fast.grad.astype(np.float32), ref.grad.astype(np.float32), rtol=2e-3, atol=1e-7)
        np.testing.assert_allclose(fast.loss, ref.loss, rtol=2e-5)


def _float32_cases():
    """float32 values where rounding to float16 can go wrong: each float16 subnormal step
    k 2^-25 (the ties between neighbours, k odd) and one float32 ulp either side, up to past
    the smallest normal, and the specials; both signs; then random bit patterns."""
    k = np.arange(0, 2 * 1024 + 8, dtype=np.float32) * np.float32(2.0 ** -25)
    near = np.concatenate([k, np.nextafter(k, np.float32(1)), np.nextafter(k, np.float32(0))])
    special = np.float32([0.0, 1e-45, 1e-40, 2.0 ** -24, 2.0 ** -14, 1.0, 65504, 65519.99, 65520, 1e30, np.inf, np.nan])
    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([near, special, bits.view(np.float32)])
    return np.concatenate([x, -x])


def _narrow_bits(narrow, x):
    out = np.empty(x.shape, np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        narrow(out, x.copy(), np.empty_like(x))          # it overwrites its src
    return out.view(np.uint16)


def _truncating_narrow(dst, src, scratch):
    """A planted bug: float16 subnormals by truncation (m = floor(|x| 2^24)), not to nearest."""
    tiny = np.abs(src) < fused.HALF_TINY
    m = np.floor(np.abs(src) * np.float32(2.0 ** 24)).astype(np.uint16) | ((src.view(np.uint32) >> 16) & 0x8000).astype(np.uint16)
    fused._narrow(dst, src, scratch)
    np.copyto(dst.view(np.uint16), m, where=tiny)


def test_float16_narrowing_rounds_as_numpy_bit_for_bit():
    """fused._narrow (float32 gradient rows into a float16 out, subnormals by hand) gives
    NumPy's own conversion bit for bit, NaN payloads and overflow to inf included, on a
    mostly-subnormal array (the bit path) and on one without subnormals (NumPy's path);
    a truncating variant fails the same comparison."""
    x = _float32_cases()
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(_narrow_bits(fused._narrow, x), want)
    normal = x[~(np.abs(x) < fused.HALF_TINY)]
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(_narrow_bits(fused._narrow, normal), normal.astype(np.float16).view(np.uint16))
    assert not np.array_equal(_narrow_bits(_truncating_narrow, x), want)     # the negative control


def test_float16_widening_is_exact_for_every_float16():
    """fused._widen gives NumPy's float16 -> float32 conversion for all 65 536 float16 values,
    both where subnormals are most of the array (the bit path) and where they are not; a
    variant that drops the sign of subnormals fails."""
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    subnormal = every[(every.view(np.uint16) & 0x7C00) == 0]
    mostly = np.concatenate([every] + [subnormal] * 64)         # 97 % subnormal: the bit path
    for h in (every, mostly):
        got = fused._widen(np.empty(h.shape, np.float32), h)
        assert np.array_equal(got.view(np.uint32), h.astype(np.float32).view(np.uint32))
    unsigned = fused._widen(np.empty(mostly.shape, np.float32), mostly)
    unsigned[(mostly.view(np.uint16) & 0x7C00) == 0] = np.abs(unsigned[(mostly.view(np.uint16) & 0x7C00) == 0])
    assert not np.array_equal(unsigned.view(np.uint32), mostly.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", REDUCED)
def test_float16_inputs_give_the_float32_path_rounded(chunking, name):
    """float16 logits and target, large enough a vocabulary that most target entries and
    most gradient entries are float16 subnormals: the fast path equals the float32 fast path
    on the same (widened) numbers with its gradient rounded to float16, bit for bit, and
    the reference to float16 rounding."""
    rng = np.random.default_rng(5)
    N, V = 6, 20_000
    z = make_logits(rng, (N, V), scale=2.0, dtype=np.float16)
    p = make_probs(rng, (N, V), dtype=np.float32)
    p = (p / p.sum(-1, keepdims=True)).astype(np.float16)
    assert ((p.view(np.uint16) & 0x7C00) == 0).mean() > 0.75        # the widening's bit path
    kw = {"mask": np.array([1, 0, 1, 1, 1, 1], bool)}
    fast = lkref.LOSSES[name](z, p, impl="fused", **kw)
    wide = lkref.LOSSES[name](z.astype(np.float32), p.astype(np.float32), impl="fused", **kw)
    assert fast.grad.dtype == np.float16
    assert (np.abs(wide.grad) < fused.HALF_TINY).mean() > 0.5       # the narrowing's bit path
    assert np.array_equal(fast.grad.view(np.uint16), wide.grad.astype(np.float16).view(np.uint16))
    assert np.array_equal(fast.loss, wide.loss) and np.array_equal(fast.alpha, wide.alpha)
    ref = lkref.LOSSES[name](z, p, impl="reference", **kw)
    np.testing.assert_allclose(fast.grad.astype(np.float32), ref.grad.astype(np.float32), rtol=2e-3,
                               atol=float(np.abs(ref.grad.astype(np.float32)).max()) * 2e-3)


@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(REDUCED), N=st.integers(1, 12), V=st.integers(1, 300),
       zero_frac=st.sampled_from([0.0, 0.8]), scale=st.sampled_from([1.0, 12.0]), T=st.sampled_from([1.0, 0.5]),
       weights=st.booleans())
def test_float16_fast_path_is_the_float32_one_rounded(chunking, seed, name, N, V, zero_frac, scale, T, weights):
    """Small float16 problems of every kind: with zero-heavy targets (zeros count with the
    subnormals, so the widening takes its bit path) and peaked drafts (gradient entries
    below float16's normals), the float16 fast path is the float32 fast path on the same
    numbers, rounded to float16, bit for bit."""
    rng = np.random.default_rng(seed)
    z = make_logits(rng, (N, V), scale=scale, dtype=np.float16)
    p = make_probs(rng, (N, V), zero_frac=zero_frac, dtype=np.float16)
    kw = {"temperature": T, "mask": rng.random(N) * 2 if weights else None}
    fast = lkref.LOSSES[name](z, p, impl="fused", **kw)
    wide = lkref.LOSSES[name](z.astype(np.float32), p.astype(np.float32), impl="fused", **kw)
    assert np.array_equal(fast.grad.view(np.uint16), wide.grad.astype(np.float16).view(np.uint16))
    assert np.array_equal(fast.loss, wide.loss) and np.array_equal(fast.alpha, wide.alpha)


@pytest.mark.parametrize("name", REDUCED)
def test_out_receives_the_gradient_and_may_be_the_logits(name):
    rng = np.random.default_rng(2)
    z = make_logits(rng, (30, 70), dtype=np.float32)
    p = make_probs(rng, (30, 70), dtype=np.float32)
    ref = lkref.LOSSES[name](z, p, impl="reference")
    out = np.full_like(z, np.nan)
    r = lkref.LOSSES[name](z, p, out=out)
    assert r.grad is out
    np.testing.assert_allclose(out, ref.grad, rtol=2e-5, atol=1e-9)
    zz = z.copy()
    r = lkref.LOSSES[name](zz, p, out=zz)               # the gradient replaces the logits, as asked
    assert r.grad is zz
    np.testing.assert_allclose(zz, ref.grad, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(r.loss, ref.loss, rtol=2e-5)
    out_ref = np.empty_like(z)
    r = lkref.LOSSES[name](z, p, out=out_ref, impl="reference")
    assert r.grad is out_ref and np.array_equal(out_ref, ref.grad)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(lkref.LOSSES))
def test_out_of_the_wrong_kind_is_refused(name, impl):
    """The same terms on every path: the reference took out = target_probs (2026-12-05)."""
    z = np.zeros((4, 5), np.float32)
    p = np.full((4, 5), 0.2, np.float32)
    read_only = np.zeros((4, 5), np.float32)
    read_only.flags.writeable = False
    p_before = p.copy()
    for bad, match in [(np.zeros((4, 5)), "out must be an array of shape"), (np.zeros((5, 4), np.float32), "out must be"),
                       (np.zeros((4, 10), np.float32)[:, ::2], "C-contiguous"), (p, "share memory with draft_logits only"),
                       (np.broadcast_to(np.zeros(5, np.float32), (4, 5)), "C-contiguous"), (read_only, "out is read-only")]:
        with pytest.raises(ValueError, match=match):
            lkref.LOSSES[name](z, p, out=bad, impl=impl)
    np.testing.assert_array_equal(p, p_before)
    buf = np.zeros(21, np.float32)
    with pytest.raises(ValueError, match="overlaps draft_logits"):
        lkref.LOSSES[name](buf[:20].reshape(4, 5), p, out=buf[1:].reshape(4, 5), impl=impl)
    both = np.ones(20, np.float32)                               # out shares memory with the mask
    with pytest.raises(ValueError, match="share memory with draft_logits only"):
        lkref.LOSSES[name](z, p, mask=both[16:], out=both.reshape(4, 5), impl=impl)
    np.testing.assert_array_equal(both, 1)


def test_inputs_untouched_and_errors_identical(chunking):
    rng = np.random.default_rng(3)
    z = make_logits(rng, (9, 20))
    p = make_probs(rng, (9, 20))
    mask = rng.random(9) < 0.5
    copies = [a.copy() for a in (z, p, mask)]
    lkref.lk_lambda(z, p, mask=mask)
    for a, b in zip((z, p, mask), copies):
        assert np.array_equal(a, b)
    for bad_z, bad_p in [(np.where(np.arange(20) == 7, np.nan, z), p), (np.where(np.arange(20) == 7, -np.inf, z), p),
                         (z, np.where(np.arange(20) == 3, -0.1, p)), (z, p * 1.01), (z, np.where(np.arange(20) == 3, np.inf, p)),
                         (z, np.where(np.arange(20) < 3, 1e308, p)), (z, np.where(np.arange(20) == 3, 1e300, p))]:
        msgs = []
        for impl in ("reference", "fused"):
            with pytest.raises(ValueError) as e:
                lkref.lk_alpha(bad_z, bad_p, impl=impl)
            msgs.append(str(e.value).split(";")[0])
        assert msgs[0] == msgs[1]


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("T", [1e-38, 1e-12, fused.MIN_TEMPERATURE])
def test_tiny_temperatures_give_the_reference(name, T):
    """Below MIN_TEMPERATURE the per-row factor d / (alpha T) could overflow float32 (then 0 * inf
    is NaN where the reference, dividing by T last, has 0): the fast path hands over to the
    reference.  At MIN_TEMPERATURE itself the fast path runs and must agree."""
    import warnings
    rng = np.random.default_rng(5)
    z = make_logits(rng, (6, 50), dtype=np.float32)
    p = make_probs(rng, (6, 50), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # (z - max z) / T overflows to -inf: q one-hot
        ref, fast = both(name, z, p, temperature=T)
    assert np.array_equal(np.isnan(fast.grad), np.isnan(ref.grad)) and not np.isnan(ref.grad).any()
    if T < fused.MIN_TEMPERATURE:
        np.testing.assert_array_equal(fast.grad, ref.grad)
    else:
        finite = np.isfinite(ref.grad)
        np.testing.assert_allclose(fast.grad[finite], ref.grad[finite], rtol=1e-5)


def _overflowing_rows(dtype):
    """Row 0: finite logits whose spread overflows (z - max z = -inf): q = (1, 0, 0), p = (1, 0, 0),
    so KL = 0 once 0 log q counts as 0 where p = 0; row 1: KL = inf (p > 0 where q = 0); row 2: plain."""
    big = np.finfo(dtype).max * 0.9
    z = np.array([[big, -big, 0.0], [big, -big, 0.0], [0.1, 0.2, 0.3]], dtype)
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype)
    return z, p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_overflowing_logits_give_no_nan(impl, dtype):
    """0 log q = 0 where p = 0 even where log q = -inf; a row of weight 0 adds nothing to the mean
    even when its loss is inf; lam = 0 drops the KL term even when it is inf."""
    import warnings
    z, p = _overflowing_rows(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # the overflow of z - max z itself
        r = lkref.kl(z[:1], p[:1], impl=impl)
        assert float(r.loss) == 0 and np.all(r.grad == 0)
        masked = lkref.kl(z, p, mask=np.array([1.0, 0.0, 1.0]), impl=impl)
        plain = lkref.kl(z[[0, 2]], p[[0, 2]], impl=impl)
        assert np.isfinite(masked.loss) and np.isclose(float(masked.loss), float(plain.loss), rtol=1e-6)
        assert np.all(masked.grad[1] == 0) and not np.isnan(masked.grad).any()
        assert np.isinf(lkref.kl(z, p, impl=impl).loss)                         # unmasked: inf, not NaN
        lam0 = lkref.lk_lambda(z, p, lam=0.0, impl=impl)
        tv = lkref.tv(z, p, impl=impl)
        assert np.isclose(float(lam0.loss), float(tv.loss), rtol=1e-6) and not np.isnan(lam0.grad).any()


def test_huge_finite_logits_are_not_called_non_finite():
    z = np.full((2, 3), 3e38, np.float32)             # the row sum overflows; the values are finite
    z[:, 0] = 0
    p = np.full((2, 3), 1 / 3, np.float32)
    ref, fast = both("tv", z, p)
    assert_same(ref, fast, np.float32)


def test_impl_is_checked():
    with pytest.raises(ValueError, match="impl must be one of"):
        lkref.kl(np.zeros((1, 2)), np.full((1, 2), 0.5), impl="cuda")


def test_auto_takes_the_fast_path_on_numpy(monkeypatch):
    calls = []
    real = fused.numpy_loss
    monkeypatch.setattr(fused, "numpy_loss", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    lkref.lk_alpha(np.zeros((1, 2)), np.full((1, 2), 0.5))
    lkref.lk_alpha(np.zeros((1, 2)), np.full((1, 2), 0.5), impl="reference")
    assert calls == ["lk_alpha"]


@pytest.mark.parametrize("name", REDUCED)
def test_non_contiguous_and_mixed_dtype_inputs(name):
    rng = np.random.default_rng(5)
    z = make_logits(rng, (40, 30), dtype=np.float32).T          # (30, 40), Fortran order
    p = np.asfortranarray(make_probs(rng, (30, 40)).astype(np.float16).astype(np.float32))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float16)        # a float16 target with float32 logits
    zs = make_logits(rng, (30, 80), dtype=np.float32)[:, ::2]    # strided columns
    for zz in (z, zs):
        ref, fast = both(name, zz, p)
        assert_same(ref, fast, np.float32)
        assert fast.grad.flags.c_contiguous and fast.grad.shape == zz.shape


def test_cupy_default_switch(monkeypatch):
    from lkref import fused as fused_mod
    monkeypatch.delenv("LKREF_CUPY_FUSED", raising=False)
    assert fused_mod.cupy_fused_by_default() is fused_mod.CUPY_FUSED_BY_DEFAULT
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("LKREF_CUPY_FUSED", value)
        assert fused_mod.cupy_fused_by_default() is want
    monkeypatch.setenv("LKREF_CUPY_FUSED", "yes")
    with pytest.raises(ValueError, match="LKREF_CUPY_FUSED"):
        fused_mod.cupy_fused_by_default()


def test_threads_from_the_environment(monkeypatch):
    """LKREF_THREADS: a count of 1 or more; anything else is refused by name ("0" and "-2" ran
    on one thread, "1.5" and "auto" raised int()'s own message, before 2026-12-06)."""
    monkeypatch.delenv("LKREF_THREADS", raising=False)
    assert fused.default_threads(1 << 10) == 1 and fused.default_threads(1 << 22) >= 1
    monkeypatch.setenv("LKREF_THREADS", " 3 ")
    assert fused.default_threads(1 << 10) == 3
    z, p = np.zeros((2, 3)), np.full((2, 3), 1 / 3)
    for value in ("0", "-2", "1.5", "auto"):
        monkeypatch.setenv("LKREF_THREADS", value)
        with pytest.raises(ValueError, match=f"LKREF_THREADS must be a whole number of threads, 1 or more, got '{value}'"):
            lkref.lk_alpha(z, p)
        lkref.lk_alpha(z, p, impl="reference")         # the readable path has no threads


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["kl", "lk_lambda"])
def test_kl_keeps_its_digits_with_large_logits(name, seed):
    """KL where q == p and the logits are large: the fast path must not cancel digits of the
    size of the logits (as sum p z - max z sum p would: 7e-6 to 3e-5 here, over the bound),
    only of the size of the terms (kl_terms)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((16, 50)) * 2).astype(np.float32) + 1000.0
    p = L.softmax(z, 0.7).astype(np.float32)
    ref, fast = both(name, z, p, temperature=0.7, **({"lam": 1.0} if name == "lk_lambda" else {}))
    bound = 4 * np.finfo(np.float32).eps * (kl_terms(z, p, 0.7) + (name != "kl"))
    assert abs(float(fast.loss) - float(ref.loss)) <= bound


def _outcome(name, z, p, impl, kw):
    try:
        return lkref.LOSSES[name](z, p, impl=impl, **kw)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).split(';')[0]}"


@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(REDUCED), dtype=st.sampled_from([np.float32, np.float64]),
       N=st.sampled_from([0, 1, 3]), V=st.sampled_from([1, 2, 7, 40]),
       zscale=st.sampled_from([1e-30, 1.0, 30.0, 1e3, 1e30, "max"]), pkind=st.sampled_from(["spread", "peaked", "point",
                                                                                              "sliver"]),
       T=st.sampled_from([None, 1e-38, 1e-12, 1e-8, 1e-3, 0.7, 1e3, 1e30]),
       mask=st.sampled_from([None, 0.0, 1e-30, 1.0, 1e30]), lam=st.sampled_from([None, 0.0, 0.5, 1.0]))
@example(seed=0, name="kl", dtype=np.float32, N=3, V=2, zscale="max", pkind="point", T=None, mask=0.0, lam=None)
@example(seed=1, name="lk_lambda", dtype=np.float64, N=3, V=40, zscale="max", pkind="sliver", T=1e-8, mask=None,
         lam=0.0)
@example(seed=2, name="lk_alpha", dtype=np.float32, N=3, V=7, zscale=1.0, pkind="spread", T=1e-38, mask=None, lam=None)
def test_extreme_inputs_agree_and_give_no_nan(seed, name, dtype, N, V, zscale, pkind, T, mask, lam):
    """Finite inputs at the edges of the dtype (logits near its max, tiny and huge temperatures,
    point and near-point targets, masks with zeros and extreme weights): the fast path and the
    reference raise the same error or agree, and neither returns a NaN."""
    import warnings
    rng = np.random.default_rng(seed)
    big = float(np.finfo(dtype).max) * 0.9
    if zscale == "max":                                   # the widest finite logits: z - max z overflows
        z = (rng.uniform(-1, 1, (N, V)) * big).astype(dtype)
    else:
        z = (rng.standard_normal((N, V)) * zscale).astype(dtype)
    if pkind == "spread":
        p = rng.dirichlet(np.ones(V), N) if N else np.zeros((0, V))
    elif pkind == "peaked":
        p = rng.dirichlet(np.full(V, 0.01), N) if N else np.zeros((0, V))
    else:
        p = np.eye(V)[rng.integers(V, size=N)]
        if pkind == "sliver" and V > 1:                   # a point mass with a trace elsewhere
            p = p * (1 - 1e-30) + np.roll(p, 1, axis=1) * 1e-30
    p = p.astype(dtype)
    kw = {} if T is None else {"temperature": T}
    if mask is not None and N:
        w = rng.random(N) * mask
        w[0] = 0.0                                        # a masked row, whatever its loss
        kw["mask"] = w
    if name == "lk_lambda" and lam is not None:
        kw["lam"] = lam
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # overflows of z - max z, of 1/T ...: the limits are meant
        ref, fast = _outcome(name, z, p, "reference", kw), _outcome(name, z, p, "fused", kw)
    if isinstance(ref, str) or isinstance(fast, str):
        assert ref == fast
        return
    eps = float(np.finfo(dtype).eps)
    atol = 100 * eps * max(1.0, 1.0 / (T or 1.0))
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    for field in ("loss", "grad", "alpha"):
        a, b = (np.asarray(getattr(r, field), np.float64) for r in (ref, fast))
        assert not np.isnan(a).any() and not np.isnan(b).any(), field
        assert np.array_equal(np.isfinite(a), np.isfinite(b)), field
        assert np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)]), field          # the same infinities
        fin = np.isfinite(a)
        if fin.any():
            np.testing.assert_allclose(b[fin], a[fin], rtol=0, atol=rtol * float(np.abs(a[fin]).max()) + atol,
                                       err_msg=field)


@pytest.mark.parametrize("V", [1, 300, 512, 513, 32_000, 50_257])
def test_row_sums_are_accurate(V):
    """_rowsum (einsum over blocks of SUM_BLOCK values, then a pairwise sum of the blocks)
    against float64, into out= and not.  Bound: a sum of B positive float32 terms in order
    is off by at most (B - 1) eps of the total, pairwise over k blocks by log2(k) eps more.
    On long rows it must also beat one einsum over the whole row on the same data."""
    rng = np.random.default_rng(V)
    a = rng.dirichlet(np.full(V, 0.5), 9).astype(np.float32)
    exact = a.astype(np.float64).sum(1)
    out = np.full(12, -1.0, np.float32)
    fused._rowsum(a, out=out[2:11])
    assert np.all(out[[0, 1, 11]] == -1)                       # only the rows asked for
    B = min(V, 2 * fused.SUM_BLOCK)
    bound = (B - 1 + np.log2(max(V / fused.SUM_BLOCK, 1)) + 1) * np.finfo(np.float32).eps
    err = np.abs(out[2:11] / exact - 1)
    assert err.max() <= bound
    np.testing.assert_array_equal(fused._rowsum(a), out[2:11])
    if V >= 32_000:
        plain = np.abs(np.einsum("ij->i", a) / exact - 1)
        assert err.max() < 0.5 * plain.max()


@pytest.mark.parametrize("V", [1, 300, 512, 513, 32_000, 50_257])
def test_row_dots_with_a_mask_are_accurate(V):
    """_rowdot(q, m), S = sum_v q m with m a 0/1 mask, is a sum of the terms q m exactly as
    _rowsum sums them: the same bound against float64, into out= and not, and on long rows
    better than one einsum over the whole row."""
    rng = np.random.default_rng(V)
    a = rng.dirichlet(np.full(V, 0.5), 9).astype(np.float32)
    m = (rng.random((9, V)) < 0.7).astype(np.float32)
    m[:, 0] = 1                                                # no row without a term
    exact = (a.astype(np.float64) * m).sum(1)
    out = np.full(12, -1.0, np.float32)
    fused._rowdot(a, m, out=out[2:11])
    assert np.all(out[[0, 1, 11]] == -1)
    B = min(V, 2 * fused.SUM_BLOCK)
    bound = (B - 1 + np.log2(max(V / fused.SUM_BLOCK, 1)) + 1) * np.finfo(np.float32).eps
    err = np.abs(out[2:11] / exact - 1)
    assert err.max() <= bound
    np.testing.assert_array_equal(fused._rowdot(a, m), out[2:11])
    if V >= 32_000:
        plain = np.abs(np.einsum("ij,ij->i", a, m) / exact - 1)
        assert err.max() < 0.5 * plain.max()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="NumPy's x86 SIMD levels")
def test_fast_path_agrees_at_numpys_baseline_simd_level():
    """NumPy picks its exp, sum and comparison kernels by the CPU (x86-64-v2 up to AVX-512), and
    this machine's tests run at its best level.  The fast path's agreement with the reference,
    and its bit-exact tie rule, must not depend on that: the property test and the ties test
    run again in a process held to NumPy's baseline kernels, as on an older CPU."""
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR", HYPOTHESIS_PROFILE="ci")
    probe = subprocess.run([sys.executable, "-c", "from numpy._core._multiarray_umath import __cpu_features__ as f; "
                            "print(f.get('X86_V3'), f.get('X86_V2'))"], env=env, capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.split() != ["False", "True"]:
        pytest.skip(f"this NumPy names or reports its SIMD levels otherwise: {probe.stdout.strip()!r}")
    here = os.path.abspath(__file__)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{here}::test_fused_matches_reference", f"{here}::test_ties_and_disjoint_rows_across_chunks"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(here)))
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
