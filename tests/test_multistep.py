"""The multi-step objective: theory, hand-derived gradients through the products, and its pieces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lkref
from lkref.multistep import accept_length_backward, accept_length_forward, accept_length_loss

from .strategies import make_logits, make_probs


@given(st.lists(st.floats(0, 1, allow_nan=False, allow_subnormal=False), min_size=1, max_size=7))
def test_forward_is_k_plus_one_minus_the_theorys_tau(alphas):
    a = np.array(alphas)
    losses, _ = accept_length_forward(a)
    np.testing.assert_allclose(losses, len(a) + 1 - lkref.theory.expected_accept_length(a), atol=1e-12)


@given(st.integers(0, 2**32 - 1), st.integers(1, 6))
def test_backward_matches_finite_differences_including_zeros(seed, K):
    rng = np.random.default_rng(seed)
    a = rng.random((3, K))
    a[0, rng.integers(K)] = 0.0                      # a zero: the division-free form still holds
    dl = rng.standard_normal(3)
    _, cache = accept_length_forward(a)
    got = accept_length_backward(dl, cache)
    want = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        ap, am = a.copy(), a.copy()
        ap[i] += 1e-6
        am[i] -= 1e-6
        want[i] = (np.dot(dl, accept_length_forward(ap)[0]) - np.dot(dl, accept_length_forward(am)[0])) / 2e-6
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_gradient_matches_finite_differences(masked):
    rng = np.random.default_rng(3)
    K, N, V = 3, 4, 6
    zs = [make_logits(rng, (N, V)) for _ in range(K)]
    ps = [make_probs(rng, (N, V), zero_frac=0.2) for _ in range(K)]
    mask = np.array([1.0, 0.0, 2.0, 1.0]) if masked else None
    r = accept_length_loss(zs, ps, mask=mask, temperature=0.8)
    for k in range(K):
        want = np.zeros_like(zs[k])
        for i in np.ndindex(zs[k].shape):
            zp = [z.copy() for z in zs]
            zm = [z.copy() for z in zs]
            zp[k][i] += 1e-6
            zm[k][i] -= 1e-6
            want[i] = (float(accept_length_loss(zp, ps, mask=mask, temperature=0.8).loss)
                       - float(accept_length_loss(zm, ps, mask=mask, temperature=0.8).loss)) / 2e-6
        np.testing.assert_allclose(r.grads[k], want, rtol=1e-6, atol=1e-9)
    if masked:
        assert all(np.all(g[1] == 0) for g in r.grads)


def test_early_positions_weigh_more_than_late_ones():
    """The same alpha gap costs more at position 1 than at position K."""
    a = np.full((1, 4), 0.5)
    _, cache = accept_length_forward(a)
    d = -accept_length_backward(np.ones(1), cache)[0]
    assert np.all(np.diff(d) < 0)


def test_perfect_draft_has_zero_loss_and_full_length():
    rng = np.random.default_rng(4)
    zs = [make_logits(rng, (5, 7)) for _ in range(3)]
    ps = [lkref.losses.softmax(z) for z in zs]
    r = accept_length_loss(zs, ps)
    assert float(r.loss) == pytest.approx(0.0, abs=1e-12) and float(r.tau) == pytest.approx(4.0)


def test_bad_input():
    z = [np.zeros((2, 3))]
    p = [np.full((2, 3), 1 / 3)]
    with pytest.raises(TypeError, match="sequences"):
        accept_length_loss(z[0], p)
    with pytest.raises(ValueError, match="same K"):
        accept_length_loss(z, p + p)
    with pytest.raises(ValueError, match="shape of the first"):
        accept_length_loss(z + [np.zeros((3, 3))], p + [np.full((3, 3), 1 / 3)])
    with pytest.raises(ValueError, match=r"^position index 1: target_probs contains negative"):
        accept_length_loss(z + z, p + [np.full((2, 3), -1 / 3)])


@pytest.mark.parametrize("alphas, err, match", [
    ([np.full(4, 0.5), np.full(4, 0.6)], TypeError, r"alphas must be one array \[\.\.\., K\], not a sequence"),
    (None, TypeError, "alphas must be an array, got None"),               # an AttributeError before
    (np.full((4, 2), 1, np.int64), TypeError, "alphas must be a floating-point"),
    (np.full((4, 2), 0.5, np.complex128), TypeError, "alphas must be a floating-point"),   # ran before
    (np.float64(0.5), ValueError, "alphas must have a positions axis"),   # an IndexError before
    (np.array([[0.5, np.nan]]), ValueError, r"alphas contains non-finite values"),   # NaN losses before
    (np.array([[0.5, np.inf]]), ValueError, r"alphas contains non-finite values"),
])
def test_forward_pair_checks_what_it_is_given(alphas, err, match):
    with pytest.raises(err, match=match):
        accept_length_forward(alphas)


def test_backward_checks_the_upstream_gradient_and_the_cache():
    _, cache = accept_length_forward(np.full((4, 3), 0.5))
    with pytest.raises(ValueError, match=r"dlosses must have the leading shape \(4,\)"):
        accept_length_backward(np.ones((4, 4)), cache)           # would broadcast to [4, 4, 3]
    with pytest.raises(ValueError, match="dlosses contains non-finite"):
        accept_length_backward(np.full(4, np.nan), cache)
    with pytest.raises(TypeError, match="cache must be what accept_length_forward returned"):
        accept_length_backward(np.ones(4), {"q": 1})
    np.testing.assert_array_equal(accept_length_backward(2.0, cache), accept_length_backward(np.full(4, 2.0), cache))
