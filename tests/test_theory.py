"""Acceptance-length theory against brute-force enumeration and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lkref import theory

alphas_st = st.lists(st.floats(0, 1, allow_nan=False, allow_subnormal=False), min_size=0, max_size=6)


def brute_force_pmf(alphas):
    """Enumerate every accept/reject pattern of K independent positions; N = leading accepts."""
    K = len(alphas)
    pmf = np.zeros(K + 1)
    for pattern in itertools.product([True, False], repeat=K):
        prob = np.prod([a if acc else 1 - a for a, acc in zip(alphas, pattern)])
        n = next((i for i, acc in enumerate(pattern) if not acc), K)
        pmf[n] += prob
    return pmf


@given(alphas_st)
def test_pmf_matches_enumeration(alphas):
    pmf = theory.accept_length_pmf(np.array(alphas, dtype=np.float64).reshape(len(alphas)))
    np.testing.assert_allclose(pmf, brute_force_pmf(alphas), atol=1e-12)
    np.testing.assert_allclose(pmf.sum(), 1.0, atol=1e-12)


@given(alphas_st)
def test_expected_length_is_the_mean_of_the_pmf(alphas):
    a = np.array(alphas, dtype=np.float64).reshape(len(alphas))
    pmf = brute_force_pmf(alphas)
    np.testing.assert_allclose(theory.expected_accept_length(a), np.sum((np.arange(len(a) + 1) + 1) * pmf),
                               rtol=1e-12)


@given(st.floats(0, 0.999), st.integers(0, 10))
def test_constant_alpha_closed_form(a, K):
    expected = (1 - a ** (K + 1)) / (1 - a)
    np.testing.assert_allclose(theory.expected_accept_length(np.full(K, a)), expected, rtol=1e-12)
    np.testing.assert_allclose(theory.speedup(a, K, 0.0), expected, rtol=1e-12)
    np.testing.assert_allclose(theory.speedup(a, K, 0.2), expected / (0.2 * K + 1), rtol=1e-12)


def test_vectorised_over_leading_axes():
    a = np.random.default_rng(0).random((3, 2, 4))
    pmf = theory.accept_length_pmf(a)
    assert pmf.shape == (3, 2, 5)
    for i, j in np.ndindex(3, 2):
        np.testing.assert_allclose(pmf[i, j], brute_force_pmf(a[i, j]), atol=1e-12)
    assert theory.expected_accept_length(a).shape == (3, 2)
    np.testing.assert_allclose(theory.speedup(np.array([1.0, 0.0]), 3, 0.5), [4 / 2.5, 1 / 2.5])


def test_acceptance_rate():
    assert theory.acceptance_rate([0.7, 0.3], [0.6, 0.4]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="q must have shape"):
        theory.acceptance_rate([0.7, 0.3], [1.0])
    with pytest.raises(ValueError, match="p contains negative"):
        theory.acceptance_rate([1.2, -0.2], [0.5, 0.5])


@pytest.mark.parametrize("fn", [theory.expected_accept_length, theory.accept_length_pmf])
def test_bad_alphas(fn):
    with pytest.raises(ValueError, match="alphas must lie in"):
        fn([0.5, 1.5])
    with pytest.raises(ValueError, match="alphas must lie in"):
        fn([np.nan])
    with pytest.raises(ValueError, match="alphas must have a last axis"):
        fn(0.5)
    with pytest.raises(TypeError, match="alphas must be a real array"):
        fn(np.array(["a"]))


def test_bad_speedup_arguments():
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        theory.speedup(0.5, -1, 0.1)
    with pytest.raises(ValueError, match="cost_ratio must be >= 0"):
        theory.speedup(0.5, 2, -0.1)
    with pytest.raises(ValueError, match="alpha must lie in"):
        theory.speedup(1.5, 2, 0.1)
