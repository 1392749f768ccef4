"""The backend layer: namespace picking, the dtype policy, and a GPU-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lkref
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
