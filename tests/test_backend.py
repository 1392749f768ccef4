"""The backend layer: namespace picking, the dtype policy, and a GPU-free import."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import lkref
from lkref import backend
from lkref.backend import namespace, work_dtype


def test_import_does_not_import_cupy():
    code = "import sys, lkref; lkref.lk_alpha([0.0, 1.0], [0.5, 0.5]); print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_namespace_is_numpy_for_host_arrays_and_lists():
    assert namespace(np.zeros(2), None, [1.0]) is np


def test_namespace_rejects_mixed_backends():
    class FakeCupy:
        __cuda_array_interface__ = {}
    FakeCupy.__module__ = "cupy._core.core"
    with pytest.raises(TypeError, match="different backends"):
        namespace(np.zeros(2), FakeCupy())


@pytest.mark.parametrize("dtype, expected", [
    (np.float64, np.float64), (np.float32, np.float32), (np.float16, np.float32),
])
def test_work_dtype(dtype, expected):
    assert work_dtype(dtype, "x") == np.dtype(expected)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, bool, np.complex64])
def test_work_dtype_rejects_non_floats(dtype):
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        work_dtype(dtype, "x")


def test_backends_lists_numpy_and_cupy():
    names = [b["name"] for b in lkref.backends()]
    assert names == ["numpy", "cupy"]
    assert lkref.backends()[1]["usable"] == lkref.cupy_available()


def test_cli_info_prints_the_worked_example():
    out = subprocess.run([sys.executable, "-m", "lkref", "info"], capture_output=True, text=True, check=True)
    assert "alpha = 0.900000" in out.stdout
    assert "lk_alpha  loss = 0.105361" in out.stdout


def test_float64_from_bits_keeps_float32_subnormals():
    """The path to_float64 takes on CuPy (where -ftz=true flushes float32 subnormals in every
    conversion), run here on NumPy: bit for bit the value NumPy's astype gives, subnormals,
    signed zeros, the extremes and non-finite values included."""
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.array([0.0, -0.0, tiny, -tiny, 3 * tiny, 1e-40, -1e-39, np.float32(1.17e-38),
                  np.finfo(np.float32).tiny, 0.25, 1.0, -2.5, np.finfo(np.float32).max, np.inf, -np.inf],
                 np.float32)
    got = backend._float64_from_bits(x, np)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, x.astype(np.float64))
    assert np.array_equal(np.signbit(got), np.signbit(x))
    assert np.isnan(backend._float64_from_bits(np.array([np.nan], np.float32), np)).all()
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    y = bits.view(np.float32)
    y = y[np.isfinite(y)]
    np.testing.assert_array_equal(backend._float64_from_bits(y, np), y.astype(np.float64))
    assert backend.to_float64(x).dtype == np.float64


def test_current_device_names_none_without_cupy():
    """backend.current_device: CuPy's current device id, None for NumPy (which has no device),
    without raising, so that per-device caches work on the CPU stand-ins too."""
    import types
    assert backend.current_device(np) is None
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=3)))
    assert backend.current_device(fake) == 3


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "complex64", "bfloat16"])
def test_new_arrays_start_as_nan_in_the_tests(xp, dtype):
    """tests/conftest.py's poisoned_allocations: empty and empty_like (C or F order) give NaN
    in every floating-point entry, so an entry a fused path leaves unwritten cannot pass on
    stale memory; integer arrays are left alone."""
    if os.environ.get("LKREF_TEST_NAN_FILL", "1") == "0":
        pytest.skip("LKREF_TEST_NAN_FILL=0 turns the fill off")
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
        if xp is not np:
            pytest.skip("bfloat16 arrays on CuPy depend on its version")
    for a in (xp.empty((3, 5), dtype), xp.empty((3, 5), dtype, order="F"), xp.empty_like(xp.zeros((2, 7), dtype)),
              xp.empty_like(xp.zeros((4, 6), dtype)[:, ::2]), xp.empty_like(xp.zeros((4, 6), dtype).T)):
        assert xp.isnan(a.astype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64)).all()
    assert xp.empty(4, np.int32).dtype == np.int32


def test_fill_nan_fills_float_arrays_in_place_and_leaves_the_rest(xp):
    """backend.fill_nan: C and F order, a strided view, 0-d and empty arrays; integers untouched."""
    base = xp.zeros((4, 6), np.float32)
    view = base[:, ::2]
    assert backend.fill_nan(view) is view
    assert bool(xp.isnan(base[:, ::2]).all()) and not bool(xp.isnan(base[:, 1::2]).any())
    for a in (xp.zeros((3, 5), np.float64, order="F"), xp.zeros((), np.float16), xp.zeros((2, 3), np.complex64)):
        assert bool(xp.isnan(backend.fill_nan(a)).all())
    assert backend.fill_nan(xp.zeros((0, 3), np.float32)).shape == (0, 3)
    ints = xp.arange(6)
    assert bool((backend.fill_nan(ints) == xp.arange(6)).all())


def test_nan_allocations_puts_the_functions_back_even_after_an_error():
    """The fill swaps NumPy's (or CuPy's) module functions for the whole process while inside:
    they must come back however the block ends, or every later allocation (the benchmark's timed
    calls) would pay for a fill."""
    before = (np.empty, np.empty_like)
    with pytest.raises(RuntimeError, match="inside"):
        with backend.nan_allocations(np):
            assert np.empty is not before[0] and np.empty_like is not before[1]
            assert np.isnan(np.empty(3)).all()
            raise RuntimeError("inside")
    assert (np.empty, np.empty_like) == before
