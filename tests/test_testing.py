"""lkref.testing's statistical helpers: they pass what they should, fail what they should, and
refuse input that is not a test of anything."""

from __future__ import annotations

import numpy as np
import pytest

from lkref.testing import binomial_check, chi2_sf, goodness_of_fit


def test_binomial_check_bounds_at_the_stated_sigmas():
    n, a = 10_000, 0.3
    sd = np.sqrt(n * a * (1 - a))
    assert binomial_check("x", int(n * a + 4.9 * sd), n, a).passed
    assert not binomial_check("x", int(n * a + 5.1 * sd) + 1, n, a).passed
    assert binomial_check("x", 0, 7, 0.0).passed and not binomial_check("x", 1, 7, 0.0).passed


@pytest.mark.parametrize("args, match", [
    ((10, 5, 0.5), "k must be <= n"),                  # a Check with +6.7 sigma before
    ((1, 5, 1.5), "a must be <= 1"),                   # '+inf sigma' before
    ((-1, 5, 0.5), "k must be a non-negative int"),
    ((1, 5.0, 0.5), "n must be a non-negative int"),
    ((1, 5, float("nan")), "a must be finite"),
])
def test_binomial_check_refuses_what_is_not_a_binomial_count(args, match):
    with pytest.raises(ValueError, match=match):
        binomial_check("x", *args)


def test_goodness_of_fit_tells_a_right_distribution_from_a_wrong_one():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2, 0.0])
    counts = np.bincount(rng.choice(4, size=20_000, p=p), minlength=4)
    assert goodness_of_fit("x", counts, p).passed
    assert goodness_of_fit("x", counts, 3 * p).passed                  # weights are normalised
    assert not goodness_of_fit("x", counts, np.array([0.45, 0.35, 0.2, 0.0])).passed
    assert not goodness_of_fit("x", counts + np.array([0, 0, 0, 1]), p).passed   # a zero-probability cell


@pytest.mark.parametrize("counts, probs, match", [
    ([1, 2, 3], [0.5, 0.5], "one length"),             # an IndexError before
    ([1, 2], [1.5, -0.5], "probs must be finite, non-negative"),   # 'landed on zero-probability cells' before
    ([1, 2], [0.0, 0.0], "not all zero"),
    ([1.5, 2], [0.5, 0.5], "whole numbers"),
    ([-1, 2], [0.5, 0.5], "whole numbers"),
])
def test_goodness_of_fit_refuses_bad_input(counts, probs, match):
    with pytest.raises(ValueError, match=match):
        goodness_of_fit("x", np.array(counts), np.array(probs))


@pytest.mark.parametrize("counts, probs, match", [
    ("abc", [0.5, 0.5], "counts must be an array of numbers, got str"),       # numpy's own ValueError before
    ([[1, 2], [3]], [0.5, 0.5], "counts must be an array of numbers, got list"),
    (None, [0.5, 0.5], "counts must be an array of numbers, got NoneType"),   # a shape error before
    ([1, 2], np.array([0.5, 0.5], np.complex128), "probs must hold real numbers, got dtype complex128"),
    ([1, 2], [object(), object()], "probs must hold real numbers, got dtype object"),
])
def test_goodness_of_fit_names_what_is_not_numbers(counts, probs, match):
    with pytest.raises(TypeError, match=match):
        goodness_of_fit("x", counts, probs)


@pytest.mark.parametrize("x, dof, err, match", [
    (3.0, 2.0, TypeError, "dof must be an int, got float"),
    (3.0, True, TypeError, "dof must be an int, got bool"),
    (None, 2, TypeError, "x must be a real number"),                          # a bare comparison error before
    (float("nan"), 2, ValueError, "x must be finite"),                         # NaN before
    ("3", 2, TypeError, "x must be a real number"),
])
def test_chi2_sf_checks_its_arguments(x, dof, err, match):
    with pytest.raises(err, match=match):
        chi2_sf(x, dof)


def test_chi2_sf_matches_closed_forms():
    assert chi2_sf(2.0, 2) == pytest.approx(np.exp(-1.0), rel=1e-12)      # dof 2: exp(-x / 2)
    assert chi2_sf(0.0, 5) == pytest.approx(1.0)
