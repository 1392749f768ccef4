"""A NumPy stand-in for CuPy that counts what the host asks of the device.

On a GPU every array operation is a kernel launch that costs the host several microseconds,
and every value brought to the host waits for all the work queued before it; a loss call's
time on the device includes both.  Without a GPU the count is what can be checked: run the
CuPy path with `module` as "cupy" and `Counted` arrays as inputs, and read `log`.

    ops       array operations: ufunc calls (reductions included), functions of the module
              or of NumPy that make new data (not empty/empty_like, not views), copies by
              astype, fancy indexing and item assignment
    to_host   values brought to the host: tolist, float, int, bool, item
    launches  kernel launches (the kernel stand-ins call `launch`)
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np

log: Counter = Counter()
_paused = [0]


def _plain(x):
    if isinstance(x, Counted):
        return x.view(np.ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(v) for v in x)
    return x


def _wrap(x):
    if isinstance(x, np.generic):             # CuPy's reductions give 0-d device arrays
        x = np.asarray(x)
    if isinstance(x, np.ndarray) and not isinstance(x, Counted):
        return x.view(Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _count(what, n=1):
    if not _paused[0]:
        log[what] += n


def _call(fn, args, kwargs, counts=True):
    """fn on plain arrays, uncounted inside; one operation when it makes new data (counts)."""
    _paused[0] += 1
    try:
        result = fn(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})
    finally:
        _paused[0] -= 1
    if counts and not _shares(result, args):
        _count("ops")
    return _wrap(result)


def _shares(result, inputs):
    """True if result (an array) is a view of one of the inputs."""
    return isinstance(result, np.ndarray) and any(
        isinstance(a, np.ndarray) and np.shares_memory(_plain(result), _plain(a)) for a in inputs)


class Counted(np.ndarray):
    """A NumPy array standing in for a device array."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _count("ops")
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return _wrap(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs)       # one function is one operation, whatever it calls

    def astype(self, dtype, *args, **kwargs):
        result = self.view(np.ndarray).astype(dtype, *args, **kwargs)
        if not np.shares_memory(result, self.view(np.ndarray)):
            _count("ops")
        return _wrap(result)

    def __getitem__(self, key):
        result = self.view(np.ndarray)[_plain(key)]
        if isinstance(result, np.ndarray) and not np.shares_memory(result, self.view(np.ndarray)):
            _count("ops")                     # a gather
        elif not isinstance(result, np.ndarray):
            _count("to_host")                 # a scalar: NumPy gives a host value
        return _wrap(result)

    def __setitem__(self, key, value):
        _count("ops")
        self.view(np.ndarray)[_plain(key)] = _plain(value)

    def tolist(self):
        _count("to_host")
        return self.view(np.ndarray).tolist()

    def item(self, *args):
        _count("to_host")
        return self.view(np.ndarray).item(*args)

    def __float__(self):
        _count("to_host")
        return float(self.view(np.ndarray))

    def __int__(self):
        _count("to_host")
        return int(self.view(np.ndarray))

    def __bool__(self):
        _count("to_host")
        return bool(self.view(np.ndarray))


_ALLOCATE = {"empty", "empty_like"}


def _module_function(name, fn):
    return lambda *args, **kwargs: _call(fn, args, kwargs, counts=name not in _ALLOCATE)


class _Module(types.ModuleType):
    """NumPy's names; its functions count and give Counted arrays."""

    def __getattr__(self, name):
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type):
            return _module_function(name, obj)
        return obj


module = _Module("cupy")


def counted(a):
    """A copy of a NumPy array as a Counted one (an input 'on the device')."""
    return np.array(a).view(Counted)


def launch(kernel):
    """A kernel stand-in that counts its launches and runs `kernel` on plain arrays, uncounted."""
    def call(grid, block, args, shared_mem=0):
        _count("launches")
        _paused[0] += 1
        try:
            kernel(grid, block, [_plain(a) for a in args], shared_mem)
        finally:
            _paused[0] -= 1
    return call
