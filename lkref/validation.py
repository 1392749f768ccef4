"""Input checks shared by the losses, the sampler and the theory functions (and the call of
the data-parallel reduce hook, whose result is checked like an input).

Every check raises TypeError (wrong kind of thing) or ValueError (right kind,
wrong value) with a message that starts with the argument's name.  No check
writes into its argument.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
from contextlib import contextmanager

import numpy as np

from .backend import _is_foreign, from_dlpack, namespace, work_dtype

__all__ = [
    "TARGET_SUM_ATOL",
    "target_sum_atol",
    "check_target_sums",
    "as_array",
    "check_real_scalar",
    "check_vocab_axis",
    "check_logits",
    "check_probs",
    "check_mask",
    "check_index_map",
    "check_upstream",
    "at_position",
    "check_cache",
    "call_reduce",
    "env_flag",
]

#: A target row must sum to 1 within this absolute tolerance, beyond what rounding its entries
#: to the target's dtype can move the sum (target_sum_atol).  Loose enough for float16 /
#: float32 softmax outputs at V = 128k, tight enough to catch logits, log-probabilities or
#: unnormalised scores passed as probabilities.
TARGET_SUM_ATOL = 1e-3


def target_sum_atol(dtype) -> float:
    """How far from 1 the rows of a target of this dtype may sum: TARGET_SUM_ATOL plus the
    dtype's unit roundoff u, as rounding each entry p_v of a normalised row to the dtype moves
    it by at most u p_v, and so the sum by at most u.  u = 2^-8 for bfloat16 (whose 8-bit
    significands move a 128k-entry softmax row's sum by some 1.5e-3), 2^-11 for float16,
    2^-24 for float32."""
    dt = np.dtype(dtype)
    try:
        eps = float(np.finfo(dt).eps)
    except (TypeError, ValueError):                # ml_dtypes' types (bfloat16): NumPy has no finfo
        finfo = getattr(sys.modules.get("ml_dtypes"), "finfo", None)
        eps = float(finfo(dt).eps) if finfo is not None else 2.0 ** -7
    return TARGET_SUM_ATOL + eps / 2


def check_target_sums(worst, dtype, name="target_probs", row="the worst row", hint=""):
    """A ValueError naming `name` where the worst |row sum - 1|, `worst`, is beyond
    target_sum_atol(dtype); `row` says which row that is, `hint` what to do."""
    tol = target_sum_atol(dtype)
    if worst > tol:
        raise ValueError(f"{name} rows must sum to 1 (within {tol:.3g} for {np.dtype(dtype).name}); "
                         f"{row} is off by {worst:.3g}{hint}")


def as_array(x, name: str):
    """``x`` as an array of its own backend (lists become NumPy arrays; a DLPack array of
    another library, a NumPy or CuPy view of it); never copies an array."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if _is_foreign(x):
        return from_dlpack(x, name)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists, strings, ...
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from exc


def check_real_scalar(value, name: str, *, low=None, low_inclusive=True, high=None):
    """A finite real scalar (Python, NumPy, or a 0-d real array) within bounds, returned as float."""
    if getattr(value, "ndim", None) == 0 and np.dtype(value.dtype).kind in "iuf":
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def _all(xp, cond) -> bool:
    return bool(xp.all(cond))


def check_vocab_axis(a, name: str):
    """a has a last axis, the vocabulary, and it is not empty."""
    if a.ndim < 1:
        raise ValueError(f"{name} must have a vocabulary axis (at least 1-d), got a 0-d array")
    if a.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (last axis has size 0)")


def check_logits(z, name: str = "draft_logits"):
    """Floating, at least 1-d, non-empty last axis, all finite.  Returns (array, work dtype)."""
    z = as_array(z, name)
    wd = work_dtype(z.dtype, name)
    check_vocab_axis(z, name)
    xp = namespace(z)
    if not _all(xp, xp.isfinite(z)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return z, wd


def check_probs(p, name: str, *, shape=None, normalised=True):
    """Floating, finite, non-negative, rows summing to 1 within target_sum_atol(p.dtype)."""
    p = as_array(p, name)
    wd = work_dtype(p.dtype, name)
    if shape is not None and tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    check_vocab_axis(p, name)
    xp = namespace(p)
    if not _all(xp, xp.isfinite(p)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if not _all(xp, p >= 0):
        raise ValueError(f"{name} contains negative probabilities")
    if normalised and p.size:
        with np.errstate(over="ignore"):           # huge entries: a sum off by inf, said below
            sums = p.astype(wd, copy=False).sum(axis=-1)
        check_target_sums(float(xp.max(xp.abs(sums - 1))), p.dtype, name)
    return p


def check_mask(mask, name: str, shape, dtype=None):
    """None, or an array of the given shape of bools or finite non-negative weights.

    dtype: the work dtype of the masked mean; weights whose sum it cannot hold, or whose
    sum's reciprocal it cannot hold, are refused (the mean would be NaN).  Scaling every
    weight by the same factor does not change the mean."""
    if mask is None:
        return None
    mask = as_array(mask, name)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have the leading shape {tuple(shape)}, got {tuple(mask.shape)}")
    kind = np.dtype(mask.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"{name} must hold booleans or real weights, got dtype {mask.dtype}")
    xp = namespace(mask)
    if kind in "iuf" and mask.size and dtype is not None:
        # one look at the values (one wait on a GPU): the smallest weight and the float64 sum
        # pass a mask that every check below passes; otherwise those say what is wrong
        with np.errstate(over="ignore", invalid="ignore"):
            lo, total = xp.stack([xp.min(mask).astype(xp.float64), xp.sum(mask, dtype=xp.float64)]).tolist()
        info = np.finfo(dtype)
        if lo >= 0 and total <= float(info.max) and not 0 < total < float(info.tiny):
            return mask
    if kind == "f" and not _all(xp, xp.isfinite(mask)):
        raise ValueError(f"{name} contains non-finite values")
    if kind in "if" and not _all(xp, mask >= 0):
        raise ValueError(f"{name} contains negative weights")
    if dtype is not None and kind in "iuf" and mask.size:
        with np.errstate(over="ignore"):            # beyond float64 too: inf, refused below
            total = float(xp.sum(mask, dtype=xp.float64))
        info = np.finfo(dtype)
        if not total <= float(info.max):
            raise ValueError(f"{name}'s weights sum to {total:.3g}, more than {np.dtype(dtype).name} holds "
                             f"({float(info.max):.3g}): scale them down (the masked mean does not change)")
        if 0 < total < float(info.tiny):                # 1 / sum would overflow
            raise ValueError(f"{name}'s weights sum to {total:.3g}, below the smallest normal "
                             f"{np.dtype(dtype).name} ({float(info.tiny):.3g}): scale them up (the masked mean "
                             f"does not change)")
    return mask


def check_index_map(index, name: str, length: int, upper: int):
    """A 1-d integer array of ``length`` distinct values in [0, upper)."""
    index = as_array(index, name)
    if np.dtype(index.dtype).kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {index.dtype}")
    if tuple(index.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one entry per draft token), got {tuple(index.shape)}")
    xp = namespace(index)
    if length and not (_all(xp, index >= 0) and _all(xp, index < upper)):
        raise ValueError(f"{name} has entries outside [0, {upper}) (the target vocabulary)")
    if length and int(xp.unique(index).size) != length:
        raise ValueError(f"{name} has duplicate entries: each draft token must map to its own target token")
    return index


def check_upstream(dlosses, name: str, lead, dtype, xp):
    """The upstream gradient of a per-position backward: a real scalar, or a finite array of the
    forward's leading shape on its backend (a wrong shape would broadcast into a wrong-shaped
    gradient).  Returned in the forward's work dtype."""
    if isinstance(dlosses, numbers.Real) and not isinstance(dlosses, bool):
        if not math.isfinite(dlosses):                # on the host: no device array to look at
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        return xp.asarray(dlosses, dtype=dtype)
    else:
        d = as_array(dlosses, name)
        if np.dtype(d.dtype).kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {d.dtype}")
        if tuple(d.shape) not in ((), tuple(lead)):
            if tuple(lead) == ():
                raise ValueError(f"{name} must be a scalar, got shape {tuple(d.shape)}")
            raise ValueError(f"{name} must have the leading shape {tuple(lead)} of the forward's logits "
                             f"(or be a scalar), got {tuple(d.shape)}")
        if namespace(d) is not xp:
            raise TypeError(f"{name} lives on another backend than the forward's arrays")
        d = d.astype(dtype, copy=False)
    if not _all(xp, xp.isfinite(d)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return d


def check_cache(cache, producer: str, keys):
    """A backward's cache: the dict that ``producer`` returned, with these keys."""
    if not (isinstance(cache, dict) and all(k in cache for k in keys)):
        raise TypeError(f"cache must be what {producer} returned (a dict with {', '.join(map(repr, keys))})")
    return cache


def call_reduce(reduce, total, count):
    """reduce(total, count), the data-parallel hook of the masked means (lkref.distributed),
    with its result checked: two real scalars (0-d arrays of NumPy, CuPy or any DLPack
    library, or Python numbers), returned as 0-d arrays of total's backend and dtype.  Every
    path's masked mean calls the hook through this."""
    if not callable(reduce):
        raise TypeError(f"reduce must be a function (total, count) -> (total, count), got {type(reduce).__name__}")
    got = reduce(total, count)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        what = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        raise TypeError(f"reduce must return a pair (total, count), got {what}")
    xp = namespace(total)
    sums = []
    for name, value in zip(("total", "count"), got):
        if _is_foreign(value):                        # a 0-d tensor of the caller's library
            value = from_dlpack(value, f"reduce's {name}")
        try:
            kind = np.dtype(getattr(value, "dtype", type(value))).kind
        except TypeError:                             # a type NumPy does not know
            kind = "O"
        if isinstance(value, bool) or kind not in "iuf":
            raise TypeError(f"reduce returned a {name} that is not a real number: {value!r}")
        value = xp.asarray(value, dtype=total.dtype)
        if value.shape != ():
            raise ValueError(f"reduce returned a {name} of shape {value.shape}; it must be a scalar")
        sums.append(value)
    got_total, got_count = sums
    # what a hook can get wrong and the loss would not show: a NaN or inf (a rank's bad
    # value, or an overflow in the hook) where this rank's own sums are finite, and a count
    # below this rank's own, which sums of non-negative weights never give (rounding is
    # monotone) but a mean over the ranks (AVG) does, on the ranks above the mean: its loss
    # looks right and every gradient comes out as many times too large as there are ranks
    if bool(xp.isfinite(total) & xp.isfinite(count)) and not bool(xp.isfinite(got_total) & xp.isfinite(got_count)):
        raise ValueError(f"reduce returned a non-finite sum: total {float(got_total)}, count {float(got_count)}, "
                         f"from finite ones ({float(total)}, {float(count)})")
    if bool(got_count < count):
        raise ValueError(f"reduce returned a count of {float(got_count)}, below this rank's own {float(count)}: "
                         "it must return the sums over all ranks (an all-reduce with SUM, not AVG)")
    return got_total, got_count


def takes_parameter(fn, name: str) -> bool:
    """Whether the callable fn names a parameter `name` (False where Python cannot tell)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def env_flag(name: str):
    """The environment variable ``name`` as a switch: True for "1", False for "0", None when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


@contextmanager
def at_position(k: int):
    """Prefix "position index k: " to a ValueError or TypeError raised inside (the call for
    the K lists' entry k), so that the message says which of the K inputs is wrong."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if type(exc) not in (ValueError, TypeError):
            raise
        raise type(exc)(f"position index {k}: {exc}") from exc
