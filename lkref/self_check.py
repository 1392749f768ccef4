"""The fused CuPy kernels checked against the readable path at their first use in a process.

Of all the GPUs lkref's kernels may meet, one H100 has run them (bench/results/), and their
source has changed since; an A100's rows meet in global memory, consumer cards give a block
less shared memory, later GPUs compile them anew.  The tests catch a wrong kernel where
they run; this catches one where they have not, before it hands a user a wrong gradient.

The first time a call with impl="auto" takes a kernel variant (the compiled kernels of its
loss, dtypes, row length and launch shape, on this device, with or without a mask and
draft_to_target), that variant is run once more on a probe: PROBE_ROWS rows of its row
length, from a fixed seed, with the call's temperature, draft_to_target, lam, eta and
kl_scale, and a mask if the call has one.  The probe's loss, alpha, lambda and gradient are
compared with lkref.losses' readable path on the host (NumPy, the same inputs; the probe's
gradient starts as NaN, so that an entry the kernels leave unwritten fails), at bounds
far above rounding (PROBE_TOLERANCE) but far below what a broken kernel gives.  A variant
that passes runs as before; one that fails warns once (a RuntimeWarning naming it) and its
calls take the readable path instead: slower, exact.  So does a variant whose kernels do not
build here (`unbuilt`): an NVRTC error, as on a CuPy without the CUDA headers the kernels
include, or the driver's as it loads the module.  The verdict is kept for the process
(`verdicts()`).  Three rows are all of a GPU's work at once: a fault that shows only with
more rows than the GPU holds at a time (blocks that meet in global memory waiting on later
ones, a grid that goes through many rows) is left to the GPU tests, which run thousands.

impl="fused" never checks and raises a build's error (the tests and the benchmark compare
every result themselves, and must see a wrong kernel fail); LKREF_CUPY_SELF_CHECK=0 turns
both off for impl="auto" too (fused.CUPY_SELF_CHECK).  The probe costs a launch of PROBE_ROWS rows and the readable
path on those rows once a variant: milliseconds, against seconds of NVRTC for the variant's
first build.
"""

from __future__ import annotations

import warnings

import numpy as np

from .backend import current_device as _device, fill_nan, namespace, to_numpy

#: Rows of the probe: row r has logits and target log-odds of scale PROBE_SCALES[r], from broad
#: rows (many entries with q < p and q > p) to peaked ones (entries of p from 0.5 up, which the
#: KL sums take by another log; alpha near its extremes).
PROBE_SCALES = (1.0, 4.0, 12.0)
PROBE_ROWS = len(PROBE_SCALES)
#: The probe's rows come from this seed (np.random.default_rng; no global state is touched).
PROBE_SEED = 2602_23881
#: Largest error of a probe's gradient entry, relative to the largest entry of the readable
#: path's, by the gradient's dtype: 5x the GPU tests' 2e-4 (tests/test_gpu.py) for float32,
#: 2 units in the last place of the largest entry for a 2-byte gradient (each side rounds once).
#: The loss, lambda and each alpha (float32 sums whatever the dtype) within PROBE_SUMS_RTOL of the
#: readable path's, plus PROBE_ATOL.  A wrong kernel is off by far more.
PROBE_TOLERANCE = {"float32": 1e-3, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}
PROBE_SUMS_RTOL = 1e-3
PROBE_ATOL = 1e-6
#: Gradient entries whose q and p lie within this relative distance of each other are left out
#: of the gradient's comparison, here and in the benchmark (the loss and alpha, which are
#: continuous, are compared everywhere).  There the gradient of a loss with a TV part jumps by
#: about q_j / T (the tie rule 1[q < p]), and a q that differs from the reference's by rounding
#: may fall on the other side: in the first GPU run, one entry of 131 million at V = 32 000 did
#: so for four launch shapes and for PyTorch eager, 4e-4 of the largest entry.  float32 q is
#: within some 1e-6 of the reference's, so 1e-5 holds every such entry and leaves the rest (a
#: few in a million) compared.
TIE_BAND = 1e-5

_verdicts: dict = {}


def verdicts() -> dict:
    """{variant: True (passed) or the failure's text}, for the variants checked in this process."""
    return {key: verdict for key, (verdict, _) in _verdicts.items()}


def passes(cp, name, by_phase, launch, z2, p2, g2, idx, weighted, T, lam, eta, kl_scale) -> bool:
    """Whether the variant of a call passes its probe (run now, the first time it is asked for).

    by_phase: the call's kernels ({phase: fused_cupy.Kernels}); launch(z2, p2, g2, out, lead, w,
    idx, T, lam, eta, kl_scale, reduce, p_dtype) runs them as the call would; z2, p2, g2: the
    call's 2-d logits, target and gradient (their row lengths and dtypes are the probe's); idx:
    its draft_to_target map (int32, on the device) or None; weighted: whether it has a mask; the
    rest: its options."""
    key = (_device(cp), name, tuple((phase, id(k.rows)) for phase, k in sorted(by_phase.items())),
           idx is not None, weighted)
    if key not in _verdicts:
        V, Vt = z2.shape[1], p2.shape[1]
        verdict = _probe(cp, name, launch, V, Vt, z2.dtype, p2.dtype, g2.dtype, idx, weighted, T, lam, eta, kl_scale)
        _verdicts[key] = (verdict, by_phase)           # (the kernels kept alive: their ids name the variant)
        if verdict is not True:
            _warn(name, z2, p2, g2, idx, weighted, f"disagrees with the readable path on its first-use check ({verdict})",
                  "LKREF_CUPY_SELF_CHECK=0 skips the check")
    return _verdicts[key][0] is True


def unbuilt(cp, name, error, z2, p2, g2, idx, weighted) -> None:
    """Note a call whose kernels do not build on this machine: `error` is what building them
    raised (NVRTC's error, or the driver's as it loads the module; fused_cupy keeps it and
    raises the same object at each later call of the variant, so it names the variant here).
    The first time, a RuntimeWarning says so; the caller then runs the readable path."""
    key = (_device(cp), name, id(error), idx is not None, weighted)
    if key not in _verdicts:
        text = " ".join(str(error).split())
        verdict = f"it does not build here: {type(error).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}"
        _verdicts[key] = (verdict, error)              # (the error kept alive: its id names the variant)
        _warn(name, z2, p2, g2, idx, weighted, f"could not be used ({verdict})",
              "LKREF_CUPY_FUSED=0 takes the readable path without trying the kernels")


def _warn(name, z2, p2, g2, idx, weighted, what, hint):
    warnings.warn(
        f"lkref: the fused CuPy kernel for {name} ({np.dtype(z2.dtype).name} logits, {np.dtype(p2.dtype).name} "
        f"target, {np.dtype(g2.dtype).name} gradient, V = {z2.shape[1]}"
        f"{', draft_to_target' if idx is not None else ''}{', a mask' if weighted else ''}) {what}; calls that "
        "take it run the readable path instead in this process (slower, exact). Please report this with the "
        f"output of `python -m lkref info`; {hint}.", RuntimeWarning, stacklevel=3)   # (at cupy_loss)


def probe_problem(V, Vt, z_dtype, p_dtype, weighted=False):
    """The probe's host arrays: logits (PROBE_ROWS, V) in z_dtype, a target (PROBE_ROWS, Vt) in
    p_dtype whose rows sum to 1 as that dtype holds them, and the mask (None, or weights 1, 0
    and 0.5: a row left out, and a weight other than 1)."""
    rng = np.random.default_rng(PROBE_SEED)
    scales = np.array(PROBE_SCALES)[:, None]
    z = (scales * rng.standard_normal((PROBE_ROWS, V))).astype(np.float32).astype(z_dtype)
    u = scales * rng.standard_normal((PROBE_ROWS, Vt))
    e = np.exp(u - u.max(1, keepdims=True))
    p = (e / e.sum(1, keepdims=True)).astype(p_dtype)
    w = np.array([1.0, 0.0, 0.5], np.float32)[:PROBE_ROWS] if weighted else None
    return z, p, w


def _probe(cp, name, launch, V, Vt, z_dtype, p_dtype, out_dtype, idx, weighted, T, lam, eta, kl_scale):
    """True, or what went wrong, for the call's kernels run on the probe problem."""
    from . import losses

    idx_h = None if idx is None else to_numpy(idx)
    lam = None if lam is None else float(lam)          # (a previous result's .lam is a device array)
    z, p, w = probe_problem(V, Vt, z_dtype, p_dtype, weighted)
    options = dict(eta=eta, kl_scale=kl_scale, lam=lam) if name == "lk_lambda" else {}
    want = getattr(losses, name)(z, p, mask=w, temperature=T, draft_to_target=idx_h, impl="reference", **options)
    zd, pd = cp.asarray(z), cp.asarray(p)
    out = fill_nan(cp.empty(z.shape, out_dtype))      # an entry the kernels leave unwritten shows
    try:
        got = launch(zd, pd, out, out, (PROBE_ROWS,), None if w is None else cp.asarray(w),
                     idx, T, lam, eta, kl_scale, None, pd.dtype)
    except Exception as exc:                          # a kernel whose flags or launch fail on valid input
        return f"the probe raised {type(exc).__name__}: {exc}"
    return compare(name, got, want, z, p, idx_h, T, np.dtype(out_dtype).name)


def compare(name, got, want, z, p, idx, T, out_dtype):
    """True if the kernels' result `got` is within PROBE_TOLERANCE of the readable path's `want`
    on the probe problem (z, p, idx: host arrays; out_dtype: the gradient's dtype name), else
    a line saying what is off and by how much."""
    tol = PROBE_TOLERANCE.get(out_dtype, PROBE_TOLERANCE["float32"])
    for what, a, b in (("loss", got.loss, want.loss), ("alpha", got.alpha, want.alpha),
                       ("lambda", got.lam, want.lam)):
        if b is None:
            continue
        a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
        err = np.abs(a - b) - (PROBE_SUMS_RTOL * np.abs(b) + PROBE_ATOL)
        if not np.all(err <= 0):                       # (a NaN fails too)
            return f"{what} {a.ravel().tolist()} where the readable path gives {b.ravel().tolist()}"
    g, g_ref = np.asarray(to_numpy(got.grad), np.float64), np.asarray(to_numpy(want.grad), np.float64)
    if not np.isfinite(g).all():
        return f"{int((~np.isfinite(g)).sum())} gradient entries NaN or infinite"
    keep = off_ties(name, z, p if idx is None else p[:, idx], T)
    scale = np.abs(g_ref).max()
    err = np.abs(g - g_ref) if keep is None else np.where(keep, np.abs(g - g_ref), 0)
    worst = float(err.max()) / scale if scale > 0 else float(err.max())
    if not worst <= tol:
        return f"largest gradient error {worst:.3g} of the largest entry (bound {tol:.3g})"
    return True


def off_ties(loss, z, p, temperature=1.0):
    """None for KL (no jump), else a bool array of z's backend: the gradient entries not within
    TIE_BAND of a tie q = p (q of the reference's softmax of z / T, in float32 or float64 as z)."""
    if loss == "kl":
        return None
    from .losses import softmax
    xp = namespace(z)
    zf = z if z.dtype == np.float64 else z.astype(np.float32)
    q = softmax(zf, temperature)
    pf = p.astype(q.dtype)
    return xp.abs(q - pf) > TIE_BAND * xp.maximum(q, pf)
