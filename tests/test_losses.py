"""The losses against finite differences, closed forms and their mathematical properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lkref
from lkref.backend import to_numpy
from lkref import losses as L
from lkref.losses import log_softmax

from .conftest import assert_close
from .strategies import make_logits, make_probs, problems

REDUCED = ["kl", "tv", "lk_alpha", "lk_lambda"]


def softmax(z, T=1.0):
    x = z / T
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def call(name, z, p, **kw):
    return lkref.LOSSES[name](z, p, **kw)


def fd_grad(f, z, h=1e-6):
    """Central differences of the scalar f at z (float64, host)."""
    z = np.asarray(z, dtype=np.float64)
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


def far_from_ties(z, p, T, margin=1e-4):
    """Finite differences cross the kink of min(p, q) if q_v is within h of p_v."""
    return np.min(np.abs(softmax(z, T) - p)) > margin


def seeded_problem(seed, lead=(3,), V=7, Vt=None, T=1.0):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        z = make_logits(rng, lead + (V,), scale=1.5)
        p = make_probs(rng, lead + (Vt or V,), zero_frac=0.3)
        if Vt is not None or far_from_ties(z, p, T):
            return rng, z, p
    raise AssertionError("could not draw a problem away from ties")


# --------------------------------------------------------------------------------------
# finite differences


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_reduced_gradient_matches_finite_differences(xp, name, T, masked):
    rng, z, p = seeded_problem(10 + int(T * 10) + masked, lead=(2, 3), T=T)
    mask = xp.asarray(rng.random((2, 3)) < 0.6) if masked else None
    kw = dict(mask=mask, temperature=T)
    res = call(name, xp.asarray(z), xp.asarray(p), **kw)
    if name == "lk_lambda":
        kw["lam"] = float(res.lam)   # lambda is stop-gradient: differentiate with it held fixed
    f = lambda zz: float(call(name, xp.asarray(zz), xp.asarray(p), **kw).loss)  # noqa: E731
    assert_close(res.grad, fd_grad(f, z), xp=xp, dtype=np.float64, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", REDUCED)
def test_gradient_with_draft_to_target_matches_finite_differences(xp, name):
    rng = np.random.default_rng(3)
    V, Vt = 5, 9
    z = make_logits(rng, (4, V), scale=1.5)
    p = make_probs(rng, (4, Vt), zero_frac=0.2)
    d2t = rng.permutation(Vt)[:V]
    kw = dict(temperature=1.3, draft_to_target=xp.asarray(d2t), mask=xp.asarray([1.0, 0.0, 2.0, 1.0]))
    res = call(name, xp.asarray(z), xp.asarray(p), **kw)
    if name == "lk_lambda":
        kw["lam"] = float(res.lam)
    f = lambda zz: float(call(name, xp.asarray(zz), xp.asarray(p), **kw).loss)  # noqa: E731
    assert_close(res.grad, fd_grad(f, z), xp=xp, rtol=1e-6, atol=1e-8)


PAIRS = {
    "kl": (lkref.kl_forward, lkref.kl_backward, {}),
    "tv": (lkref.tv_forward, lkref.tv_backward, {}),
    "lk_alpha": (lkref.lk_alpha_forward, lkref.lk_alpha_backward, {}),
    "lk_lambda": (lkref.lk_lambda_forward, lkref.lk_lambda_backward, {"lam": 0.3}),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_backward_is_the_vjp_of_forward(xp, name):
    """backward(dlosses) = d/dz sum_t dlosses_t losses_t for a random upstream gradient."""
    forward, backward, extra = PAIRS[name]
    rng, z, p = seeded_problem(5, lead=(2, 3), V=6, T=0.8)
    dlosses = rng.standard_normal((2, 3))
    _, cache = forward(xp.asarray(z), xp.asarray(p), temperature=0.8, **extra)
    dz = backward(xp.asarray(dlosses), cache)
    f = lambda zz: float(np.sum(dlosses * to_numpy(  # noqa: E731
        forward(xp.asarray(zz), xp.asarray(p), temperature=0.8, **extra)[0])))
    assert_close(dz, fd_grad(f, z), xp=xp, rtol=1e-6, atol=1e-8)


def test_mean_pair_backward():
    losses = np.array([1.0, 2.0, 4.0])
    w = np.array([1.0, 0.0, 3.0])
    loss, cache = lkref.mean_forward(losses, w)
    assert float(loss) == pytest.approx((1 + 12) / 4)
    np.testing.assert_allclose(lkref.mean_backward(2.0, cache), 2.0 * w / 4)


# --------------------------------------------------------------------------------------
# closed forms


def test_alpha_of_the_worked_example(xp):
    z = xp.log(xp.asarray([0.6, 0.4]))
    p = xp.asarray([0.7, 0.3])
    for name in REDUCED:
        r = call(name, z, p)
        assert_close(r.alpha, np.float64(0.9), xp=xp)
    assert_close(lkref.lk_alpha(z, p).loss, -np.log(0.9), xp=xp)
    assert_close(lkref.tv(z, p).loss, np.float64(0.1), xp=xp)
    assert_close(lkref.kl(z, p).loss, 0.7 * np.log(7 / 6) + 0.3 * np.log(3 / 4), xp=xp)


@pytest.mark.parametrize("name", REDUCED)
def test_target_equal_to_draft_gives_zero_loss_and_gradient(xp, name):
    rng = np.random.default_rng(0)
    z = make_logits(rng, (4, 9))
    p = to_numpy(L.softmax(xp.asarray(z)))   # bitwise the q that lkref computes
    r = call(name, xp.asarray(z), xp.asarray(p))
    assert_close(r.loss, np.float64(0.0), xp=xp, atol=1e-15)
    assert_close(r.grad, np.zeros_like(z), xp=xp, atol=1e-15)
    assert_close(r.alpha, np.ones(4), xp=xp, atol=1e-12)


def test_point_mass_target_makes_lk_alpha_cross_entropy(xp):
    rng = np.random.default_rng(1)
    z = make_logits(rng, (5, 11), scale=3.0)
    target = rng.integers(0, 11, size=5)
    p = np.eye(11)[target]
    r = lkref.lk_alpha(xp.asarray(z), xp.asarray(p), temperature=0.9)
    logq = to_numpy(log_softmax(xp.asarray(z), 0.9))
    ce = -np.mean(logq[np.arange(5), target])
    assert_close(r.loss, ce, xp=xp)
    assert_close(r.grad, (softmax(z, 0.9) - p) / 0.9 / 5, xp=xp)
    assert_close(r.alpha, np.exp(logq[np.arange(5), target]), xp=xp)


def test_eta_zero_gives_kl_and_large_eta_gives_tv(xp):
    rng, z, p = seeded_problem(2, lead=(6,))
    z, p = xp.asarray(z), xp.asarray(p)
    r0 = lkref.lk_lambda(z, p, eta=0.0)
    k = lkref.kl(z, p)
    assert_close(r0.lam, np.float64(1.0), xp=xp)
    assert_close(r0.loss, k.loss, xp=xp)
    assert_close(r0.grad, k.grad, xp=xp)
    rinf = lkref.lk_lambda(z, p, eta=1e4)
    t = lkref.tv(z, p)
    assert float(rinf.lam) < 1e-300
    assert_close(rinf.loss, t.loss, xp=xp)
    assert_close(rinf.grad, t.grad, xp=xp)


def test_lambda_is_one_per_call_from_the_masked_mean_alpha(xp):
    rng, z, p = seeded_problem(4, lead=(5,))
    mask = np.array([1, 1, 0, 1, 0], dtype=bool)
    r = lkref.lk_lambda(xp.asarray(z), xp.asarray(p), mask=xp.asarray(mask), eta=2.0, kl_scale=0.5)
    alpha = to_numpy(r.alpha)
    expected_lam = 0.5 * np.exp(-2.0 * alpha[mask].mean())
    assert_close(r.lam, expected_lam, xp=xp)
    kl_t, _ = lkref.kl_forward(xp.asarray(z), xp.asarray(p))
    tv_t, _ = lkref.tv_forward(xp.asarray(z), xp.asarray(p))
    per_pos = expected_lam * to_numpy(kl_t) + (1 - expected_lam) * to_numpy(tv_t)
    assert_close(r.loss, per_pos[mask].mean(), xp=xp)


def test_lk_alpha_is_mean_of_logs_not_log_of_mean(xp):
    z = np.log(np.array([[0.5, 0.5], [0.99, 0.01]]))
    p = np.array([[0.5, 0.5], [0.01, 0.99]])         # alpha = 1 and 0.02
    r = lkref.lk_alpha(xp.asarray(z), xp.asarray(p))
    assert_close(r.loss, -(np.log(1.0) + np.log(0.02)) / 2, xp=xp)
    assert abs(float(r.loss) - (-np.log(0.51))) > 1.0


# --------------------------------------------------------------------------------------
# the tie rule and alpha = 0


def test_tie_rule_is_strict_q_below_p(xp):
    """Where q_v == p_v exactly, m_v = 0 (min taken as p): the gradient follows 1[q < p]."""
    z = np.log(np.array([0.2, 0.3, 0.5]))
    q = to_numpy(L.softmax(xp.asarray(z)))
    p = q.copy()
    p[1] += 0.1
    p[2] -= 0.1                                   # tie at v = 0, q < p at v = 1, q > p at v = 2
    r = lkref.tv(xp.asarray(z), xp.asarray(p))
    m_strict = np.array([0.0, 1.0, 0.0])
    m_loose = np.array([1.0, 1.0, 0.0])           # 1[q <= p], the other convention
    strict = -q * (m_strict - (q * m_strict).sum())
    loose = -q * (m_loose - (q * m_loose).sum())
    assert_close(r.grad, strict, xp=xp)
    assert np.max(np.abs(strict - loose)) > 0.05   # the two conventions are distinguishable here
    ra = lkref.lk_alpha(xp.asarray(z), xp.asarray(p))
    assert_close(ra.grad, strict / float(ra.alpha), xp=xp)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_disjoint_supports_stay_finite_and_exact(xp, dtype):
    z = np.array([[-1000.0, 1000.0], [-100.0, 100.0]], dtype=dtype)
    p = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    r = lkref.lk_alpha(xp.asarray(z), xp.asarray(p))
    assert_close(r.loss, np.array((2000.0 + 200.0) / 2, dtype=dtype), xp=xp)  # -log q_0 exactly
    assert_close(r.grad, np.array([[-0.5, 0.5], [-0.5, 0.5]], dtype=dtype), xp=xp)
    for name in REDUCED:
        rr = call(name, xp.asarray(z), xp.asarray(p))
        assert np.all(np.isfinite(to_numpy(rr.grad))) and np.isfinite(float(rr.loss))
        assert_close(rr.alpha, np.zeros(2, dtype=dtype), xp=xp, atol=1e-30)


@pytest.mark.parametrize("name", REDUCED)
def test_position_without_target_mass_on_the_draft_vocabulary_is_dropped(xp, name):
    rng = np.random.default_rng(7)
    z = make_logits(rng, (3, 4))
    p = make_probs(rng, (3, 6), zero_frac=0.0)
    d2t = np.array([0, 1, 2, 3])
    p[1] = [0, 0, 0, 0, 0.5, 0.5]                 # all target mass outside the draft vocabulary
    r = call(name, xp.asarray(z), xp.asarray(p), draft_to_target=xp.asarray(d2t))
    keep = call(name, xp.asarray(z[[0, 2]]), xp.asarray(p[[0, 2]]), draft_to_target=xp.asarray(d2t))
    if name != "lk_lambda":
        assert_close(r.loss, keep.loss, xp=xp)
    assert_close(r.grad[1], np.zeros(4), xp=xp, atol=0)
    assert float(to_numpy(r.alpha)[1]) == 0.0
    assert np.all(np.isfinite(to_numpy(r.grad)))


def test_draft_to_target_uses_unnormalised_target_for_alpha_and_renormalised_for_kl(xp):
    rng = np.random.default_rng(8)
    z = make_logits(rng, (2, 3))
    p = np.array([[0.2, 0.1, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    d2t = np.array([3, 0, 2])
    q = softmax(z)
    pd = p[:, d2t]                                 # sums to 0.9 and 0.75: not renormalised
    alpha = np.minimum(q, pd).sum(-1)
    assert_close(lkref.tv(xp.asarray(z), xp.asarray(p), draft_to_target=xp.asarray(d2t)).alpha, alpha, xp=xp)
    pk = pd / pd.sum(-1, keepdims=True)
    kl = np.mean(np.sum(pk * np.log(pk / q), -1))
    assert_close(lkref.kl(xp.asarray(z), xp.asarray(p), draft_to_target=xp.asarray(d2t)).loss, kl, xp=xp)


# --------------------------------------------------------------------------------------
# properties


@given(problems())
def test_loss_ranges_and_ordering(prob):
    z, p, T, _ = prob
    k, t, a, l_ = (call(n, z, p, temperature=T) for n in REDUCED)
    assert float(k.loss) >= -1e-12
    assert -1e-12 <= float(t.loss) <= 1 + 1e-12
    assert float(a.loss) >= float(t.loss) - 1e-12           # -log a >= 1 - a
    assert float(l_.loss) >= -1e-12
    assert np.all((t.alpha >= -1e-12) & (t.alpha <= 1 + 1e-12))


@given(problems(), st.sampled_from(REDUCED))
def test_gradient_sums_to_zero_over_the_vocabulary(prob, name):
    z, p, T, _ = prob
    g = call(name, z, p, temperature=T).grad
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12)


@given(problems(), st.sampled_from(REDUCED), st.floats(-50, 50))
def test_invariant_to_a_shift_of_the_logits(prob, name, c):
    z, p, T, seed = prob
    shift = c + np.random.default_rng(seed).standard_normal(z.shape[:-1] + (1,))
    a = call(name, z, p, temperature=T)
    b = call(name, z + shift, p, temperature=T)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(b.grad, a.grad, rtol=1e-7, atol=1e-10)


@given(problems(), st.sampled_from(REDUCED))
def test_equivariant_under_vocabulary_permutations(prob, name):
    z, p, T, seed = prob
    perm = np.random.default_rng(seed).permutation(z.shape[-1])
    a = call(name, z, p, temperature=T)
    b = call(name, z[..., perm], p[..., perm], temperature=T)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.grad, a.grad[..., perm], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.alpha, a.alpha, rtol=1e-9, atol=1e-12)


@given(problems(), st.sampled_from(REDUCED))
def test_masked_positions_get_zero_gradient(prob, name):
    z, p, T, seed = prob
    mask = np.random.default_rng(seed).random(z.shape[:-1]) < 0.5
    r = call(name, z, p, temperature=T, mask=mask)
    assert np.all(r.grad[~mask] == 0)
    if mask.any():
        full = call(name, z[mask], p[mask], temperature=T, **({"lam": float(r.lam)} if r.lam is not None else {}))
        np.testing.assert_allclose(r.loss, full.loss, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.grad[mask], full.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", REDUCED)
def test_all_masked_gives_zero_loss_and_gradient(xp, name):
    rng, z, p = seeded_problem(6, lead=(3,))
    r = call(name, xp.asarray(z), xp.asarray(p), mask=xp.zeros(3, dtype=bool))
    assert float(r.loss) == 0.0
    assert float(xp.max(xp.abs(r.grad))) == 0.0


# --------------------------------------------------------------------------------------
# dtypes and inputs


@pytest.mark.parametrize("name", REDUCED)
def test_float32_matches_float64(xp, name):
    rng, z, p = seeded_problem(9, lead=(8,), V=50, T=1.2)
    r64 = call(name, xp.asarray(z), xp.asarray(p), temperature=1.2)
    r32 = call(name, xp.asarray(z, dtype=np.float32), xp.asarray(p, dtype=np.float32), temperature=1.2)
    assert r32.grad.dtype == np.float32 and r32.loss.dtype == np.float32 and r32.alpha.dtype == np.float32
    # float32 rounding of z, p and the softmax: relative 1e-6 per element, summed over V = 50
    assert_close(r32.loss, r64.loss, rtol=1e-5, atol=1e-6)
    assert_close(r32.alpha, r64.alpha, rtol=1e-5, atol=1e-6)
    assert_close(r32.grad, r64.grad, rtol=1e-4, atol=1e-7)


def test_float16_input_is_computed_in_float32(xp):
    rng, z, p = seeded_problem(11, lead=(4,), V=20)
    z16 = xp.asarray(z, dtype=np.float16)
    r16 = lkref.lk_alpha(z16, xp.asarray(p, dtype=np.float16))
    r32 = lkref.lk_alpha(z16.astype(np.float32), xp.asarray(p, dtype=np.float16).astype(np.float32))
    assert r16.grad.dtype == np.float16
    assert r16.loss.dtype == np.float32
    assert_close(r16.loss, r32.loss, rtol=0, atol=0)            # same float32 work, bit for bit
    assert_close(r16.grad, to_numpy(r32.grad).astype(np.float16), rtol=0, atol=0)


def test_bfloat16_input_when_ml_dtypes_is_installed():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng, z, p = seeded_problem(12, lead=(4,), V=20)
    zb = z.astype(ml_dtypes.bfloat16)
    r = lkref.lk_alpha(zb, p.astype(np.float32))
    ref = lkref.lk_alpha(zb.astype(np.float32), p.astype(np.float32))
    assert r.grad.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(r.loss, ref.loss)


@pytest.mark.parametrize("name", REDUCED)
def test_inputs_are_never_modified(xp, name):
    rng = np.random.default_rng(13)
    z = xp.asarray(make_logits(rng, (3, 5)))
    p = xp.asarray(make_probs(rng, (3, 7)))
    d2t = xp.asarray(np.array([6, 0, 3, 2, 5]))
    mask = xp.asarray(np.array([1.0, 0.0, 2.0]))
    before = [a.copy() for a in (z, p, d2t, mask)]
    call(name, z, p, mask=mask, draft_to_target=d2t, temperature=0.5)
    for a, b in zip((z, p, d2t, mask), before):
        assert bool(xp.all(a == b))


def test_any_leading_shape():
    rng = np.random.default_rng(14)
    z = make_logits(rng, (2, 3, 5))
    p = make_probs(rng, (2, 3, 5))
    for name in REDUCED:
        a = call(name, z, p)
        b = call(name, z.reshape(6, 5), p.reshape(6, 5))
        assert a.grad.shape == (2, 3, 5) and a.alpha.shape == (2, 3) and a.loss.shape == ()
        np.testing.assert_allclose(a.grad.reshape(6, 5), b.grad, rtol=1e-12)
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    one = lkref.lk_alpha(z[0, 0], p[0, 0])
    assert one.alpha.shape == () and one.grad.shape == (5,)


def test_kl_gradient_is_exact_for_rows_normalised_only_to_tolerance():
    """Rows may sum to 1 within TARGET_SUM_ATOL; the KL gradient is still the exact derivative."""
    rng, z, p = seeded_problem(15, lead=(3,))
    p = p * (1 - 0.5 * lkref.TARGET_SUM_ATOL)
    r = lkref.kl(z, p)
    f = lambda zz: float(lkref.kl(zz, p).loss)  # noqa: E731
    np.testing.assert_allclose(r.grad, fd_grad(f, z), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r.grad.sum(-1), 0.0, atol=1e-15)


def test_over_t_divides_by_a_float32_subnormal_temperature():
    """A temperature below float32's smallest normal number: CuPy's kernels (-ftz=true) would
    read it as 0, so over_t scales numerator and T by 2^100 first.  The quotient is that of
    T itself to float32 rounding; NumPy's plain division, which first rounds T to a float32
    subnormal (3e-44 has 5 significant bits there), is 2 % off and fails the same check."""
    T = 3e-44
    a = np.array([1e-40, -3e-39, 2e-44, 0.0, 5e-38, -7.5e-36], np.float32)
    want = (a.astype(np.float64) / T).astype(np.float32)
    with np.errstate(over="ignore"):
        got = L.over_t(a, T)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)
    with np.errstate(all="ignore"):
        plain = a / np.float32(T)
    assert not np.allclose(plain, want, rtol=2.5e-7, atol=0)
    with np.errstate(over="ignore"):
        assert L.over_t(np.float32([-1.0]), T)[0] == -np.inf  # overflows as a / T does
    assert L.over_t(a, 0.5).tobytes() == (a / 0.5).tobytes()  # a normal T: the plain division


@pytest.mark.parametrize("name", ["kl", "tv", "lk_alpha", "lk_lambda"])
def test_subnormal_temperature_gives_no_nan(xp, name):
    """T = 1e-39 on float32 logits (a subnormal: 0 to a GPU kernel built with -ftz=true, as
    CuPy's are): q is the argmax's one-hot, and loss and gradient are those of float64 work.
    (p > 0 everywhere: where p = 0 at the argmax, alpha = exp(-(gap) / T) is below float32's
    range even in log space.)"""
    rng = np.random.default_rng(2)
    z, p = make_logits(rng, (4, 50)), make_probs(rng, (4, 50), zero_frac=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # (z - max z) / T overflows to -inf: q one-hot
        got = call(name, xp.asarray(z.astype(np.float32)), xp.asarray(p.astype(np.float32)), temperature=1e-39)
        want = call(name, z, p.astype(np.float32).astype(np.float64), temperature=1e-39)
    with np.errstate(over="ignore"):                      # beyond float32's range: inf, as float32 work gives
        want_loss, want_grad = (np.asarray(to_numpy(a), np.float64).astype(np.float32) for a in (want.loss, want.grad))
    g = to_numpy(got.grad)
    assert not np.isnan(g).any() and not np.isnan(to_numpy(got.loss))
    np.testing.assert_allclose(to_numpy(got.loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(g, want_grad, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_lk_alpha_beyond_float32_in_log_space_is_an_error(impl):
    """(z - max z) / T overflows float32 at every token the target covers: log alpha = -4e38
    (float64 says so) is beyond float32, and the row was once given loss 0, as if its target
    had no mass.  Now a ValueError, from the readable and the fast path alike; the same row
    in float64 is finite, and a row whose target covers the argmax is not affected."""
    z = np.array([[-2e38, 2e38]])
    p = np.array([[1.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the overflow of z - max z is the point
        with pytest.raises(ValueError, match="overflows float32 at every token the target covers"):
            lkref.lk_alpha(z.astype(np.float32), p.astype(np.float32), impl=impl)
        with pytest.raises(ValueError, match="overflows float32"):
            lkref.lk_alpha(np.float32([[0.0, 1.0]]), np.float32([[1.0, 0.0]]), temperature=1e-39, impl=impl)
        exact = lkref.lk_alpha(z, p, impl=impl)
        covered = lkref.lk_alpha(z.astype(np.float32), np.float32([[0.5, 0.5]]), impl=impl)
    np.testing.assert_allclose(float(exact.loss), 4e38, rtol=1e-12)
    np.testing.assert_allclose(float(covered.loss), np.log(2), rtol=1e-6)
