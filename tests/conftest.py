"""Shared fixtures: hypothesis profiles, the backend fixture, poisoned allocations, and one
assertion helper.

Profiles: "ci" (the default, also under CI=true) is deterministic: derandomize=True,
no example database, no deadline.  "dev" roams freely: HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lkref
from lkref.backend import nan_allocations, to_numpy

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cupy_or_skip():
    if not lkref.cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy
    return cupy


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: NumPy always, CuPy when it imports and a device is present."""
    if request.param == "numpy":
        return np
    return _cupy_or_skip()


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """empty and empty_like of NumPy, and of CuPy where it has a device, give NaN-filled
    floating-point arrays in every test (lkref.backend.nan_allocations: poison the output, then
    check that every element was written).  The fused paths allocate their gradients and work
    buffers with them, so a kernel or chunk that leaves an entry unwritten fails the
    comparisons with the reference instead of passing on stale memory.  LKREF_TEST_NAN_FILL=0
    turns it off (a rescue for a GPU run should the fill itself fail on a CuPy; not for CI)."""
    with contextlib.ExitStack() as stack:
        if os.environ.get("LKREF_TEST_NAN_FILL", "1") != "0":
            stack.enter_context(nan_allocations(np))
            if lkref.cupy_available():                  # (cached: CuPy is imported once, or never)
                import cupy
                stack.enter_context(nan_allocations(cupy))
        yield


#: Tolerances per compute dtype, in one table (SciPy's xp_assert_close habit).
TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
}


def assert_close(actual, desired, *, xp=None, dtype=None, rtol=None, atol=None):
    """Compare values after checking backend, shape and (optionally) dtype."""
    if xp is not None:
        assert lkref.namespace(actual) is xp, f"result lives on {lkref.namespace(actual).__name__}, expected {xp.__name__}"
    a, d = to_numpy(actual), to_numpy(desired)
    assert a.shape == d.shape, f"shape {a.shape} != {d.shape}"
    if dtype is not None:
        assert a.dtype == np.dtype(dtype), f"dtype {a.dtype} != {np.dtype(dtype)}"
    tol = TOL.get(np.dtype(a.dtype), TOL[np.dtype(np.float32)])
    np.testing.assert_allclose(a, d, rtol=tol["rtol"] if rtol is None else rtol,
                               atol=tol["atol"] if atol is None else atol)
