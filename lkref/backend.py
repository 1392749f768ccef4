"""The array-backend layer: one code path for NumPy (CPU) and CuPy (GPU).

Every public function of lkref starts with ``xp = namespace(a, b, ...)`` and then
uses only ``xp.*``.  CuPy is never imported by ``import lkref``: an array is
recognised as a CuPy array by the module its type comes from, and CuPy itself
is only imported when :func:`cupy_available` is asked.

Dtype policy (one place for it):

* float64 in -> float64 work;
* float32, float16 and other narrow floats (bfloat16 from ``ml_dtypes``) in
  -> float32 work, so that every sum accumulates in at least float32;
* integers, booleans and complex numbers are not logits and raise TypeError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import sys

import numpy as np

__all__ = [
    "dlpack_interop",
    "namespace",
    "is_cupy_array",
    "work_dtype",
    "to_numpy",
    "to_float64",
    "fill_nan",
    "nan_allocations",
    "cupy_available",
    "backends",
]


def is_cupy_array(x) -> bool:
    """True if ``x`` is a CuPy ndarray.  Never imports CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "__cuda_array_interface__")


def namespace(*arrays):
    """The array module (numpy or cupy) that all the given arrays belong to.

    ``None`` entries are skipped.  Python scalars and NumPy arrays count as
    NumPy.  Mixing CuPy and NumPy arrays is a TypeError: lkref never moves data
    between host and device behind the caller's back.
    """
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if kinds == {True}:
        return sys.modules["cupy"]
    if kinds == {True, False}:
        raise TypeError(
            "arrays live on different backends (some CuPy, some NumPy); "
            "move them to one device first"
        )
    return np


def work_dtype(dtype, name: str):
    """The floating dtype lkref computes in for an input of ``dtype``.

    float64 stays float64; every narrower float (float32, float16, bfloat16)
    is computed in float32.  ``name`` is the argument name used in the error.
    """
    dt = np.dtype(dtype)
    if dt.kind == "f" or dt.name == "bfloat16":
        return np.dtype(np.float64) if dt.itemsize >= 8 else np.dtype(np.float32)
    # ml_dtypes' bfloat16 reports kind 'V'; accept any 2-byte float-like type by name
    if "float" in dt.name:
        return np.dtype(np.float32)
    raise TypeError(f"{name} must be a floating-point array, got dtype {dt.name}")


def to_numpy(x):
    """A NumPy copy (or view) of ``x`` on the host; CuPy arrays are copied off the device."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


_cupy_state: dict = {}


def to_float64(x):
    """x as float64, with float32 subnormals (below 1.2e-38) kept.

    CuPy compiles its kernels with -ftz=true, so on the GPU ``x.astype(float64)`` turns a
    float32 subnormal into 0 (cupy/cupy#8382): a token of probability 1e-39 would become
    impossible.  There the value is rebuilt from its bits (sign, 23-bit mantissa times 2^-149,
    float64 arithmetic, which no flag flushes).  On NumPy it is plain ``astype``.
    """
    xp = namespace(x)
    if xp is np or x.dtype != np.float32:
        return x.astype(xp.float64)
    return _float64_from_bits(x, xp)


def _float64_from_bits(x, xp):
    """float32 x as float64: subnormals (and zeros) from their bits, the rest by astype."""
    bits = x.view(xp.uint32)
    small = (bits & 0x7F800000) == 0                               # exponent field 0: zero or subnormal
    size = (bits & 0x007FFFFF).astype(xp.float64) * 2.0 ** -149     # exact: a 23-bit integer times 2^-149
    signed = xp.where((bits >> 31) == 1, -size, size)
    return xp.where(small, signed, x.astype(xp.float64))


def fill_nan(a):
    """Every byte of a floating-point array (NumPy or CuPy) set to 0xFF, which is a NaN in
    float16, bfloat16, float32 and float64 alike; other dtypes are left as they are.  Returns a.

    For the checks of the fast paths: memory filled so before a kernel runs shows an entry it
    leaves unwritten as NaN, and not as whatever it held (a memory pool may hand back the very
    values the check compares against)."""
    if (np.dtype(a.dtype).kind in "fc" or np.dtype(a.dtype).name == "bfloat16") and a.size:
        if a.flags.c_contiguous or a.flags.f_contiguous:       # a view of every byte, in memory order
            (a if a.flags.c_contiguous else a.T).reshape(-1).view(np.uint8).fill(0xFF)
        else:
            a.fill(np.nan)
    return a


@contextlib.contextmanager
def nan_allocations(xp):
    """Inside: xp.empty and xp.empty_like (xp: the numpy or cupy module) give NaN-filled
    (fill_nan) arrays, for whatever allocates through them (lkref's fast paths do).

    The benchmark checks each path so, and the tests run so: CuPy's pool hands back the
    readable path's freed intermediates (at T = 1 one of them holds its very gradient), which
    would hide a kernel's unwritten entries.  It swaps the module's functions, for every thread."""
    saved = {name: getattr(xp, name) for name in ("empty", "empty_like")}
    try:
        for name, alloc in saved.items():
            setattr(xp, name, lambda *args, _alloc=alloc, **kwargs: fill_nan(_alloc(*args, **kwargs)))
        yield
    finally:
        for name, alloc in saved.items():
            setattr(xp, name, alloc)


def cupy_available() -> bool:
    """True if CuPy imports and at least one CUDA device is present (cached).

    This is the only place that imports CuPy.  Both stages are checked, as
    scikit-learn does: an installed CuPy without a device is "not available",
    so GPU tests are reported as skipped rather than failed.
    """
    if "ok" not in _cupy_state:
        try:
            cp = importlib.import_module("cupy")
            _cupy_state["ok"] = cp.cuda.runtime.getDeviceCount() > 0
        except Exception as exc:  # ImportError, CUDA driver errors, ...
            _cupy_state["ok"] = False
            _cupy_state["why"] = f"{type(exc).__name__}: {exc}"
    return _cupy_state["ok"]


def current_device(xp):
    """The id of CuPy's current device (xp: the cupy module), or None where there is none to
    name (NumPy, or a CuPy that cannot say).  What lkref keeps of compiled kernels and their
    checks is kept per device: devices may differ, and CuPy loads a module once a device."""
    try:
        return int(xp.cuda.Device().id)
    except Exception:
        return None


def backends() -> list[dict]:
    """A description of each backend: name, version, whether usable, and the device."""
    out = [{"name": "numpy", "version": np.__version__, "usable": True, "device": "CPU"}]
    if cupy_available():
        cp = sys.modules["cupy"]
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        out.append({"name": "cupy", "version": cp.__version__, "usable": True,
                    "device": f"GPU {dev.id}: {name}"})
    else:
        out.append({"name": "cupy", "version": None, "usable": False,
                    "device": _cupy_state.get("why", "not available")})
    return out


# ----------------------------------------------------------------------------------------
# DLPack interop: any array that speaks DLPack (a PyTorch tensor, a JAX array, ...) goes in
# without a copy, and the results come back as that kind of array, also without a copy.

_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _is_foreign(x) -> bool:
    return (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")
            and not isinstance(x, np.ndarray) and not is_cupy_array(x))


def from_dlpack(x, name="array"):
    """A NumPy (CPU) or CuPy (CUDA) view of a DLPack-capable array, sharing its memory."""
    device = x.__dlpack_device__()[0]
    if device in (_DL_CPU, _DL_CUDA_HOST):
        importer = np.from_dlpack
    elif device in (_DL_CUDA, _DL_CUDA_MANAGED):
        if not cupy_available():
            raise TypeError(f"{name} lives on a CUDA device, but CuPy with a device is not available")
        importer = sys.modules["cupy"].from_dlpack
    else:
        raise TypeError(f"{name} lives on DLPack device type {device}; lkref runs on the CPU (NumPy) or CUDA (CuPy)")
    try:
        return importer(x)
    except (BufferError, TypeError, RuntimeError) as exc:
        if getattr(x, "requires_grad", False):          # PyTorch's autograd: lkref gives the gradient itself
            hint = "; pass it detached (.detach()): lkref returns the gradient itself"
        elif "bfloat16" in str(getattr(x, "dtype", "")):
            hint = "; bfloat16 has no NumPy/CuPy dtype to share it as: pass float32"
        else:
            hint = ""
        raise TypeError(f"{name} cannot be shared through DLPack ({exc}){hint}") from exc


def _to_kind(value, like):
    """value (NumPy/CuPy, or a NumPy scalar) as the kind of array `like` is, through that
    library's from_dlpack."""
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not (isinstance(value, np.ndarray) or is_cupy_array(value)):
        return value
    module = type(like).__module__
    top = module.split(".")[0]
    for name in (module, top, _DLPACK_HOMES.get(top)):
        mod = sys.modules.get(name) if name else None
        fn = getattr(mod, "from_dlpack", None)
        if fn is not None:
            return fn(value)
    return value


#: Why an out= of another library can arrive read-only (numpy#28599, fixed in 2.2.5).
_READ_ONLY_OUT = ("out came through DLPack as a read-only view, so the gradient cannot be written into it: "
                  "NumPy before 2.2.5 imports every DLPack array read-only, and later NumPy too where the "
                  "exporter predates DLPack 1.0 (it has no read-only flag to say it is writeable); this is "
                  "NumPy {}. Pass out=None and copy the gradient, or a NumPy array as out")

#: Where a library whose array type lives elsewhere keeps its from_dlpack (JAX's arrays are
#: jaxlib's types; jax.numpy.from_dlpack makes them).
_DLPACK_HOMES = {"jaxlib": "jax.numpy"}


def dlpack_interop(fn):
    """Let fn take DLPack-capable arrays of any library, and give its results back in that kind.

    Arguments that are neither NumPy nor CuPy arrays but speak DLPack are viewed (no copy)
    as NumPy (CPU) or CuPy (CUDA) arrays; the result's arrays (a returned array, the arrays of
    a returned tuple, or the array fields of a returned dataclass) are handed back through
    the first such argument's library's from_dlpack (no copy).  A cache dict returned by a
    forward stays NumPy/CuPy: the matching backward reads it as it is.
    """
    params = [q.name for q in inspect.signature(fn).parameters.values()
              if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]   # to name them in errors

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        like = []

        def view(v, name):
            if isinstance(v, (list, tuple)) and any(_is_foreign(x) for x in v):    # K positions
                return type(v)(view(x, f"{name}[{i}]") for i, x in enumerate(v))
            if _is_foreign(v):
                like.append(v)
                a = from_dlpack(v, name)
                if name == "out" and not getattr(a.flags, "writeable", True):
                    raise ValueError(_READ_ONLY_OUT.format(np.__version__))
                return a
            return v
        args = [view(a, params[i] if i < len(params) else f"argument {i}") for i, a in enumerate(args)]
        kwargs = {k: view(v, k) for k, v in kwargs.items()}
        result = fn(*args, **kwargs)
        return _back(result, like[0]) if like else result
    return wrapper


def _back(value, like):
    """The arrays in a result (itself, in a tuple or list, in dataclass fields) as like's kind."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _back(getattr(value, f.name), like)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, tuple) and hasattr(value, "_fields"):                  # a NamedTuple
        return type(value)(*(_back(v, like) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_back(v, like) for v in value)
    return _to_kind(value, like)
