"""The losses: the readable specification of KL, TV, LK^alpha and LK^lambda.

This module is the reference.  It is written to be read and ported line by
line; fast paths live elsewhere and are checked against it.

Glossary (used in every signature and comment below)
----------------------------------------------------
    N      token positions: any leading shape (N,) or (B, T); sums are over the last axis
    V      draft vocabulary size (the last axis of the draft logits)
    z      draft logits, (..., V)
    T      temperature; the draft distribution is  q = softmax(z / T)
    p      target probabilities on the draft vocabulary, (..., V)
    m      m_v = 1[q_v < p_v]: where the draft is below the target (the tie rule, below)
    alpha  acceptance rate of one position, alpha = sum_v min(p_v, q_v) = 1 - TV(p, q)
    S      S = sum_v q_v m_v, the draft mass where q is below p
    dX     gradient of the final scalar with respect to X (llm.c style)

Every loss comes as a pair that works per position:

    <loss>_forward(z, p, ...)   -> (losses, cache)      losses has the leading shape
    <loss>_backward(dlosses, cache) -> dz                 for any upstream dlosses

and the masked mean over positions is a pair of its own (mean_forward / mean_backward).
The reduced functions kl, tv, lk_alpha and lk_lambda chain the two and add the
input checks, the dtype policy and the smaller draft vocabulary.

Decisions (each has a test in tests/test_losses.py)
---------------------------------------------------
* Ties.  Where q_v == p_v exactly, min(p_v, q_v) is taken as p_v, so m_v = 0 and
  the tied entry gets no "q-side" gradient (m = 1[q < p], strict).  Both one-sided
  choices are valid supergradients of the concave alpha; this one gives an exactly
  zero gradient when q == p.
* alpha = 0.  With finite logits q_v > 0 for every v, so alpha > 0 whenever the target
  has any mass on the draft vocabulary.  LK^alpha therefore computes
  log(alpha) = logsumexp_v min(log p_v, log q_v) in log space: the loss is exact and
  finite even where alpha underflows (disjoint supports), and its gradient is bounded.
  alpha is exactly 0 only when the target puts no mass at all on the draft vocabulary
  (possible with draft_to_target).  Such a position carries no training signal (every
  draft has alpha = 0 there): its loss and gradient are 0 for every loss, and the
  reduced functions drop it from the mean like a masked position.
* Reduction.  LK^alpha takes -log per position, then the masked mean (not -log of
  the mean alpha).  An all-masked batch gives loss 0 and gradient 0.
* LK^lambda.  lambda = kl_scale * exp(-eta * mean alpha), one lambda per call (a call
  is one draft position), with the mean over the unmasked positions, stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import dlpack_interop, namespace
from .validation import (
    TARGET_SUM_ATOL,
    as_array,
    call_reduce,
    check_cache,
    check_index_map,
    check_logits,
    check_mask,
    check_probs,
    check_real_scalar,
    check_upstream,
)

__all__ = [
    "LossResult",
    "softmax", "log_softmax", "softmax_parts",
    "kl_forward", "kl_backward",
    "tv_forward", "tv_backward",
    "lk_alpha_forward", "lk_alpha_backward",
    "lk_lambda_forward", "lk_lambda_backward",
    "mean_forward", "mean_backward",
    "kl", "tv", "lk_alpha", "lk_lambda",
    "lambda_from_alpha", "prepare_inputs", "LOSSES_BY_NAME",
]


# --------------------------------------------------------------------------------------
# helpers


def softmax_parts(z, temperature=1.0):
    """q = softmax(z / T) and log q over the last axis, with one exp per element.

    x = (z - max z) / T,  e = exp(x),  s = sum e,  q = e * (1 / s),  log q = x - log s.
    The fast paths form q with exactly these operations, so that q, and with it the tie
    rule 1[q < p], is the same bit for bit.
    """
    check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    xp = namespace(z)
    x = over_t(z - xp.max(z, axis=-1, keepdims=True), temperature)
    e = xp.exp(x)
    s = xp.sum(e, axis=-1, keepdims=True)
    return e * (1 / s), x - xp.log(s)


#: A power of two that brings any positive float32 or float64 subnormal into the normal range.
_UP = 2.0 ** 100


def over_t(a, T):
    """a / T in a's dtype (the division every formula here divides by the temperature with).

    A T below the smallest normal number of a's dtype (float32: 1.2e-38) is a subnormal there,
    which CuPy's kernels, compiled with -ftz=true, read as 0: a / T would be inf or NaN on the
    GPU and finite on NumPy.  Then both are multiplied by 2^100 first, exactly (a * 2^100
    overflows only where a / T does), so that both backends divide by normal numbers.
    """
    if T >= np.finfo(a.dtype).tiny:
        return a / T
    return (a * _UP) / (T * _UP)


def log_softmax(z, temperature=1.0):
    """log q = z/T - logsumexp(z/T) over the last axis, stable for any finite z."""
    return softmax_parts(z, temperature)[1]


def softmax(z, temperature=1.0):
    """q = softmax(z / T) over the last axis."""
    return softmax_parts(z, temperature)[0]


def _logsumexp(x):
    """logsumexp over the last axis; a row of all -inf gives -inf (not NaN)."""
    xp = namespace(x)
    top = xp.max(x, axis=-1, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0)
    with _quiet(xp):
        return xp.log(xp.sum(xp.exp(x - top), axis=-1)) + top[..., 0]


class _quiet:
    """np.errstate(divide='ignore') on NumPy (log 0 = -inf is intended); nothing on CuPy."""

    def __init__(self, xp):
        self.ctx = xp.errstate(divide="ignore", invalid="ignore") if hasattr(xp, "errstate") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _upstream(dlosses, cache, loss, keys):
    """dlosses checked against the forward's cache (a scalar, or an array of its leading shape),
    in its work dtype; the cache must be the one <loss>_forward returned."""
    check_cache(cache, f"{loss}_forward", keys)
    q = cache["q"] if "q" in cache else cache["tv"]["q"]
    return check_upstream(dlosses, "dlosses", q.shape[:-1], q.dtype, namespace(q))


def _check_pair(z, p, temperature, p_name="p"):
    """What the pairs check: z and p are float arrays of one shape with a vocabulary axis, z is
    finite, p finite and non-negative, and T > 0 (p's row sums are the reduced functions' to
    check: TV and LK^alpha take rows that sum to less than 1).  Returns z, p."""
    z, _ = check_logits(z, "z")
    p = check_probs(p, p_name, normalised=False)
    if tuple(z.shape) != tuple(p.shape):
        raise ValueError(f"z and {p_name} must have the same shape, got {tuple(z.shape)} and {tuple(p.shape)}")
    check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    namespace(z, p)
    return z, p


# --------------------------------------------------------------------------------------
# forward KL(p || q)


@dlpack_interop
def kl_forward(z, p, *, temperature=1.0):
    """KL_t = sum_v p_v (log p_v - log q_v), with 0 log 0 = 0.  p must sum to 1."""
    z, p = _check_pair(z, p, temperature)
    xp = namespace(z, p)
    q, logq = softmax_parts(z, temperature)
    with _quiet(xp):
        plogp = xp.where(p > 0, p * xp.log(p), 0)
        # p log q is 0 where p = 0, also where log q = -inf ((z - max z) / T overflowed)
        plogq = xp.where(p > 0, p * logq, 0)
    losses = xp.sum(plogp - plogq, axis=-1)
    cache = {"q": q, "p": p, "T": temperature}
    return losses, cache


@dlpack_interop
def kl_backward(dlosses, cache):
    """dz = dlosses * (q * sum_v p_v - p) / T, which is (q - p) / T for a normalised p.

    log q_v = z_v/T - logsumexp(z/T), so d log q_v / d z_j = (delta_vj - q_j) / T and
    dKL/dz_j = -sum_v p_v (delta_vj - q_j) / T = (q_j sum_v p_v - p_j) / T.
    Keeping sum_v p_v makes this the exact gradient for rows that sum to 1 only up
    to rounding, and keeps sum_j dz_j = 0 (the loss does not change under z + c).
    """
    dlosses = _upstream(dlosses, cache, "kl", ("q", "p", "T"))
    xp = namespace(cache["q"])
    q, p, T = cache["q"], cache["p"], cache["T"]
    psum = xp.sum(p, axis=-1, keepdims=True)
    return over_t(dlosses[..., None] * (q * psum - p), T)


# --------------------------------------------------------------------------------------
# total variation TV = 1 - alpha


@dlpack_interop
def tv_forward(z, p, *, temperature=1.0):
    """TV_t = 1 - alpha_t, alpha_t = sum_v min(p_v, q_v).  p may sum to less than 1."""
    z, p = _check_pair(z, p, temperature)
    xp = namespace(z, p)
    q = softmax(z, temperature)
    m = q < p                                   # the tie rule: q == p counts as "p is the min"
    alpha = xp.sum(xp.where(m, q, p), axis=-1)
    cache = {"q": q, "m": m, "alpha": alpha, "T": temperature}
    return 1 - alpha, cache


@dlpack_interop
def tv_backward(dlosses, cache):
    """dz = -dlosses * q * (m - S) / T, S = sum_v q_v m_v.

    d min(p_v, q_v) / d q_v = m_v and d q_v / d z_j = q_v (delta_vj - q_j) / T, so
    d alpha / d z_j = sum_v m_v q_v (delta_vj - q_j) / T = q_j (m_j - S) / T,
    and TV = 1 - alpha flips the sign.
    """
    dlosses = _upstream(dlosses, cache, "tv", ("q", "m", "T"))
    xp = namespace(cache["q"])
    q, m, T = cache["q"], cache["m"], cache["T"]
    S = xp.sum(xp.where(m, q, 0), axis=-1, keepdims=True)
    return over_t(-dlosses[..., None] * q * (m - S), T)


# --------------------------------------------------------------------------------------
# LK^alpha = -log alpha


@dlpack_interop
def lk_alpha_forward(z, p, *, temperature=1.0):
    """LK^alpha_t = -log alpha_t, computed in log space so that it is exact where alpha underflows.

    log alpha = log sum_v min(p_v, q_v) = logsumexp_v (log q_v if m_v else log p_v).
    A row with no target mass (alpha = 0 for every draft) gets loss 0 (see the module notes).
    Where (z - max z) / T overflows the dtype at every token the target covers (a logit spread
    beyond its largest number times T), log alpha is not representable either: a ValueError,
    not the loss 0 of a row without mass.
    """
    z, p = _check_pair(z, p, temperature)
    xp = namespace(z, p)
    q, logq = softmax_parts(z, temperature)
    m = q < p
    with _quiet(xp):
        log_alpha = _logsumexp(xp.where(m, logq, xp.log(p)))
    live = log_alpha > -xp.inf                  # False only where p has no mass at all ...
    if not bool(xp.all(live)) and bool(xp.any(~live & xp.any(p > 0, axis=-1))):   # p read only then
        # ... or where (z - max z) / T overflowed to -inf at every token p covers (a spread of
        # the logits beyond the dtype's range times T): log alpha is finite but not representable
        raise ValueError(f"lk_alpha: alpha underflows even in log space at a position whose target has mass: "
                         f"(z - max z) / temperature overflows {np.dtype(z.dtype).name} at every token the "
                         f"target covers; use float64 logits or a larger temperature")
    log_alpha = xp.where(live, log_alpha, 0)
    losses = xp.where(live, -log_alpha, 0)
    cache = {"q": q, "logq": logq, "m": m, "log_alpha": log_alpha, "live": live,
             "alpha": xp.where(live, xp.exp(log_alpha), 0), "T": temperature}
    return losses, cache


@dlpack_interop
def lk_alpha_backward(dlosses, cache):
    """dz = -dlosses * (r - q s) / T with r_v = m_v q_v / alpha and s = sum_v r_v = S / alpha.

    d(-log alpha)/dz_j = -(d alpha/dz_j) / alpha = -q_j (m_j - S) / (alpha T)
                       = -(m_j q_j / alpha - q_j S / alpha) / T.
    r_v = exp(log q_v - log alpha) <= 1 is formed in log space, so nothing overflows.
    """
    dlosses = _upstream(dlosses, cache, "lk_alpha", ("q", "logq", "m", "log_alpha", "live", "T"))
    xp = namespace(cache["q"])
    q, m, T = cache["q"], cache["m"], cache["T"]
    # where m_v holds, log q_v <= log alpha; the minimum only keeps exp() from overflowing
    # on the entries that where() throws away
    r = xp.where(m, xp.exp(xp.minimum(cache["logq"] - cache["log_alpha"][..., None], 0)), 0)
    s = xp.sum(r, axis=-1, keepdims=True)
    d = xp.where(cache["live"], dlosses, 0)
    return over_t(-d[..., None] * (r - q * s), T)


# --------------------------------------------------------------------------------------
# LK^lambda = lambda KL + (1 - lambda) TV, lambda given


@dlpack_interop
def lk_lambda_forward(z, p, lam, *, temperature=1.0, p_kl=None):
    """LK^lambda_t = lam * KL(p_kl || q)_t + (1 - lam) * TV(p, q)_t with lam given (stop-gradient).

    p_kl is the target the KL term uses; it defaults to p.  With a smaller draft
    vocabulary it is the renormalised target while p is not (SPEC section 2).  lam is one
    number, or one per position (an array of the leading shape, as a per-token lambda).
    """
    z, p = _check_pair(z, p, temperature)
    if p_kl is not None:
        _, p_kl = _check_pair(z, p_kl, temperature, "p_kl")
    _check_lam(lam, z.shape[:-1])
    kl_losses, kl_cache = kl_forward(z, p if p_kl is None else p_kl, temperature=temperature)
    tv_losses, tv_cache = tv_forward(z, p, temperature=temperature)
    cache = {"lam": lam, "kl": kl_cache, "tv": tv_cache}
    xp = namespace(kl_losses)
    with _quiet(xp):                             # lam = 0 drops KL, even an infinite one (0 * inf)
        kl_part = xp.where(xp.asarray(lam) != 0, lam * kl_losses, 0)   # lam a number or an array
    return kl_part + (1 - lam) * tv_losses, cache


def _check_lam(lam, lead):
    """lam >= 0 and finite: a real scalar, or an array of the leading shape."""
    if getattr(lam, "ndim", 0) == 0:
        check_real_scalar(lam, "lam", low=0)
        return
    if tuple(lam.shape) != tuple(lead):
        raise ValueError(f"lam must be a scalar or have the leading shape {tuple(lead)}, got {tuple(lam.shape)}")
    xp = namespace(lam)
    if not bool(xp.all(xp.isfinite(lam) & (lam >= 0))):
        raise ValueError("lam must be finite and >= 0 everywhere")


@dlpack_interop
def lk_lambda_backward(dlosses, cache):
    """dz = lam * dKL + (1 - lam) * dTV; lam is a constant (stop-gradient)."""
    dlosses = _upstream(dlosses, cache, "lk_lambda", ("lam", "kl", "tv"))
    lam = cache["lam"]
    return (kl_backward(lam * dlosses, cache["kl"])
            + tv_backward((1 - lam) * dlosses, cache["tv"]))


def lambda_from_alpha(mean_alpha, *, eta=3.0, kl_scale=1.0):
    """The paper's adaptive weight: lam = kl_scale * exp(-eta * mean_alpha) (Eq. 5; kl_scale as SpecForge)."""
    eta = check_real_scalar(eta, "eta", low=0)
    kl_scale = check_real_scalar(kl_scale, "kl_scale", low=0)
    mean_alpha = as_array(mean_alpha, "mean_alpha")
    xp = namespace(mean_alpha)
    if mean_alpha.dtype.kind not in "iuf":
        raise TypeError(f"mean_alpha must hold real numbers, got dtype {mean_alpha.dtype}")
    # an acceptance rate: in [0, 1], up to the target rows' own tolerance on their sum
    if not bool(xp.all(xp.isfinite(mean_alpha) & (mean_alpha >= 0) & (mean_alpha <= 1 + TARGET_SUM_ATOL))):
        raise ValueError("mean_alpha must lie in [0, 1] (an acceptance rate); got a value outside it or NaN")
    return kl_scale * xp.exp(-eta * mean_alpha)


# --------------------------------------------------------------------------------------
# the masked mean over positions


@dlpack_interop
def mean_forward(losses, weights=None, reduce=None):
    """loss = sum_t w_t losses_t / sum_t w_t (w = 1 without weights); 0 when sum_t w_t = 0.

    reduce: for data parallelism, a hook (total, count) -> (total, count) that sums both
    over the ranks (an all-reduce), so that every rank gets the mean of the whole batch and
    the gradient of its own shard of it.  See lkref.distributed.
    """
    losses = as_array(losses, "losses")
    if losses.dtype.kind != "f":
        raise TypeError(f"losses must be a floating-point array, got dtype {losses.dtype}")
    weights = check_mask(weights, "weights", losses.shape, losses.dtype)    # shape, >= 0, finite
    xp = namespace(losses, weights)
    if bool(xp.any(xp.isnan(losses))):     # inf is a loss (KL, -log 0): a weight of 0 drops it
        raise ValueError("losses must not hold NaN")
    w = xp.ones_like(losses) if weights is None else weights.astype(losses.dtype, copy=False)
    # a row of weight 0 adds nothing, even when its loss is infinite (0 * inf would be NaN)
    total, count = xp.sum(w * xp.where(w > 0, losses, 0)), xp.sum(w)
    loss, scale = mean_from_sums(total, count, reduce)
    return loss, {"w": w, "scale": scale}


def mean_from_sums(total, count, reduce=None):
    """(total / count, 1 / count) from the sums of a masked mean, 0-d arrays, after the reduce
    hook; both 0 when count = 0.  The CuPy kernels' path, which forms the sums on the device,
    shares it."""
    xp = namespace(total)
    if reduce is not None:
        total, count = call_reduce(reduce, total, count)
    scale = xp.where(count > 0, 1 / xp.where(count > 0, count, 1), 0)
    return total * scale, scale


@dlpack_interop
def mean_backward(dloss, cache):
    """dlosses_t = dloss * w_t / sum_t w_t."""
    check_cache(cache, "mean_forward", ("w", "scale"))
    dloss = check_upstream(dloss, "dloss", (), cache["w"].dtype, namespace(cache["w"]))
    return dloss * cache["w"] * cache["scale"]


# --------------------------------------------------------------------------------------
# the reduced functions: checks + pair + mean


@dataclass(frozen=True)
class LossResult:
    """The result of a reduced loss.

    loss   0-d array, the masked mean over positions (float32, or float64 for float64 input)
    grad   d loss / d draft_logits, same shape and dtype as draft_logits
    alpha  per-position acceptance sum_v min(p_v, q_v), the leading shape of draft_logits
    lam    the lambda used (LK^lambda only, 0-d array), else None
    """

    loss: Any
    grad: Any
    alpha: Any
    lam: Any = None


def prepare_inputs(draft_logits, target_probs, mask, temperature, draft_to_target, *, need_kl):
    """Check every input and bring it to the working form (shared with multistep and conformance).

    Returns (xp, z, p, p_kl, w, out_dtype, T): z and p in the work dtype, p restricted
    to the draft vocabulary (not renormalised), p_kl renormalised (or None), and w the
    position weights with rows that have no target mass set to 0.
    """
    z, wd = check_logits(draft_logits, "draft_logits")
    lead, V = tuple(z.shape[:-1]), z.shape[-1]
    if draft_to_target is None:
        p = check_probs(target_probs, "target_probs", shape=lead + (V,))
    else:
        p = check_probs(target_probs, "target_probs")
        if tuple(p.shape[:-1]) != lead:
            raise ValueError(
                f"target_probs must have the leading shape {lead} of draft_logits, got {tuple(p.shape)}")
        index = check_index_map(draft_to_target, "draft_to_target", V, p.shape[-1])
    mask = check_mask(mask, "mask", lead, wd)
    T = check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    xp = namespace(z, p, mask, draft_to_target)
    out_dtype = z.dtype
    z = z.astype(wd, copy=False)
    p = p.astype(wd, copy=False)
    w = xp.ones(lead, dtype=wd) if mask is None else mask.astype(wd)
    p_kl = p if need_kl else None
    if draft_to_target is not None:
        p = xp.take(p, index, axis=-1)          # restricted, not renormalised: alpha uses this
        mass = xp.sum(p, axis=-1)
        w = xp.where(mass > 0, w, 0)            # no target mass on the draft vocabulary: drop
        if need_kl:
            safe = xp.where(mass > 0, mass, 1)
            p_kl = p / safe[..., None]          # renormalised: only the KL term uses this
    return xp, z, p, p_kl, w, out_dtype, T


def _alpha(q, p):
    xp = namespace(q, p)
    return xp.sum(xp.minimum(p, q), axis=-1)


def _reduce(losses, cache, backward, w, out_dtype, reduce=None):
    loss, mcache = mean_forward(losses, w, reduce)
    dlosses = mean_backward(1, mcache)
    dz = backward(dlosses, cache)
    return loss, dz.astype(out_dtype, copy=False)


IMPLS = ("auto", "reference", "fused")


def _fast(name, impl, draft_logits, target_probs, out, **options):
    """The fast path's result when ``impl`` asks for it and one exists, else None.

    impl="reference" is this module; "fused" insists on a fast path (on CuPy also where
    LKREF_CUPY_FUSED=0, and without the first-use check), except at the temperatures the
    fast paths decline (fused.MIN_TEMPERATURE, fused_cupy.MAX_TEMPERATURE), which run here;
    "auto" takes one when the arrays' backend has it.  The fast paths live in
    lkref/fused.py, outside the specification, and are tested against it.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return None
    from . import fused  # imported here: the specification does not depend on its fast paths

    return fused.dispatch(name, draft_logits, target_probs, out=out, required=impl == "fused", **options)


def _deliver(result, out, draft_logits, target_probs, mask):
    """Write the reference gradient into ``out`` when one was given, on the fast paths' terms:
    out may share memory with nothing but (all of) draft_logits."""
    if out is None:
        return result
    from .fused import check_out

    check_out(out, as_array(draft_logits, "draft_logits"), as_array(target_probs, "target_probs"), mask,
              same_backend=True)
    out[...] = result.grad
    return LossResult(result.loss, out, result.alpha, result.lam)


@dlpack_interop
def kl(draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
       impl="auto", out=None, reduce=None):
    """Forward KL(p || q), masked mean over positions.  Returns a LossResult."""
    fast = _fast("kl", impl, draft_logits, target_probs, out, mask=mask, temperature=temperature,
                 draft_to_target=draft_to_target, reduce=reduce)
    if fast is not None:
        return fast
    xp, z, p, p_kl, w, out_dtype, T = prepare_inputs(
        draft_logits, target_probs, mask, temperature, draft_to_target, need_kl=True)
    losses, cache = kl_forward(z, p_kl, temperature=T)
    loss, grad = _reduce(losses, cache, kl_backward, w, out_dtype, reduce)
    return _deliver(LossResult(loss, grad, _alpha(cache["q"], p)), out, draft_logits, target_probs, mask)


@dlpack_interop
def tv(draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
       impl="auto", out=None, reduce=None):
    """Total variation 1 - alpha, masked mean over positions.  Returns a LossResult."""
    fast = _fast("tv", impl, draft_logits, target_probs, out, mask=mask, temperature=temperature,
                 draft_to_target=draft_to_target, reduce=reduce)
    if fast is not None:
        return fast
    xp, z, p, _, w, out_dtype, T = prepare_inputs(
        draft_logits, target_probs, mask, temperature, draft_to_target, need_kl=False)
    losses, cache = tv_forward(z, p, temperature=T)
    loss, grad = _reduce(losses, cache, tv_backward, w, out_dtype, reduce)
    return _deliver(LossResult(loss, grad, cache["alpha"]), out, draft_logits, target_probs, mask)


@dlpack_interop
def lk_alpha(draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
             impl="auto", out=None, reduce=None):
    """LK^alpha = mean_t -log alpha_t (log per position, then the masked mean).  Returns a LossResult."""
    fast = _fast("lk_alpha", impl, draft_logits, target_probs, out, mask=mask, temperature=temperature,
                 draft_to_target=draft_to_target, reduce=reduce)
    if fast is not None:
        return fast
    xp, z, p, _, w, out_dtype, T = prepare_inputs(
        draft_logits, target_probs, mask, temperature, draft_to_target, need_kl=False)
    losses, cache = lk_alpha_forward(z, p, temperature=T)
    loss, grad = _reduce(losses, cache, lk_alpha_backward, w, out_dtype, reduce)
    return _deliver(LossResult(loss, grad, cache["alpha"]), out, draft_logits, target_probs, mask)


@dlpack_interop
def lk_lambda(draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
              eta=3.0, kl_scale=1.0, lam=None, impl="auto", out=None, reduce=None):
    """LK^lambda = lam KL + (1 - lam) TV with lam = kl_scale exp(-eta * mean alpha), stop-gradient.

    mean alpha is the masked mean of this call's alpha: one lambda per call, and a
    call is one draft position (head / step).  Pass ``lam`` to use a given value
    instead (for example last step's), which lets the fast paths work in a single
    pass.  Returns a LossResult with ``.lam`` set.
    """
    eta = check_real_scalar(eta, "eta", low=0)
    kl_scale = check_real_scalar(kl_scale, "kl_scale", low=0)
    if lam is not None:
        lam = check_real_scalar(lam, "lam", low=0)
    fast = _fast("lk_lambda", impl, draft_logits, target_probs, out, mask=mask, temperature=temperature,
                 draft_to_target=draft_to_target, eta=eta, kl_scale=kl_scale, lam=lam, reduce=reduce)
    if fast is not None:
        return fast
    xp, z, p, p_kl, w, out_dtype, T = prepare_inputs(
        draft_logits, target_probs, mask, temperature, draft_to_target, need_kl=True)
    if lam is None:
        alpha = _alpha(softmax(z, T), p)
        mean_alpha, _ = mean_forward(alpha, w, reduce)
        lam = lambda_from_alpha(mean_alpha, eta=eta, kl_scale=kl_scale)
    else:
        lam = xp.asarray(lam, dtype=z.dtype)
    losses, cache = lk_lambda_forward(z, p, lam, temperature=T, p_kl=p_kl)
    loss, grad = _reduce(losses, cache, lk_lambda_backward, w, out_dtype, reduce)
    return _deliver(LossResult(loss, grad, cache["tv"]["alpha"], lam), out, draft_logits, target_probs, mask)


#: The reduced losses by name.
LOSSES_BY_NAME = {"kl": kl, "tv": tv, "lk_alpha": lk_alpha, "lk_lambda": lk_lambda}
