"""Rounding bounds for comparing a fast path with the reference: the sizes of the terms a
loss or a gradient element is a difference of.  Where those terms cancel (q ~ p, KL ~ 0),
any summation order leaves an absolute error of a few eps times that size."""

from __future__ import annotations

import numpy as np

from lkref import losses as L


def kl_terms(z, p, T=1.0, draft_to_target=None):
    """The largest row sum of |p log p| + |p log q| + p (float64): KL is the difference of two
    such sums, so float rounding can leave an absolute error of a few eps times this, whichever
    way it is summed, even where KL itself is 0 (q == p).  The last term: log q = x - log s, and
    s, a sum of exps whose largest is 1, carries a relative rounding of a few eps, so log s an
    absolute one of a few eps however close s is to 1 (a one-hot target on a peaked q gives a
    KL of 1e-4 whose float32 value is off by 3e-8 through log s alone: no smaller bound holds)."""
    z, p = np.asarray(z, np.float64), np.asarray(p, np.float64)
    renorm = 0.0
    if draft_to_target is not None:            # p renormalised on the draft vocabulary: a path
        p = p[:, draft_to_target]              # that sums first and divides after (the CuPy
        mass = p.sum(-1, keepdims=True)        # kernel) also cancels terms of size |log mass|
        p = p / np.where(mass > 0, mass, 1)
        renorm = float(np.abs(np.log(mass[mass > 0])).max()) if np.any(mass > 0) else 0.0
    logq = L.log_softmax(z, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.abs(np.log(p)) + np.abs(logq) + 1), 0)
    return (float(terms.sum(-1).max()) if terms.size else 0.0) + renorm


def grad_terms(ref, mask, T):
    """The largest size of the terms a gradient element is a difference of: q and p (both <= 1)
    times the row's weight d / T.  Where q ~ p the gradient cancels to a few eps times this,
    whichever way it is computed.  LK^alpha's terms, q m / alpha and q S / alpha, are no larger,
    however small alpha is: q <= alpha where m = 1 (q = min(q, p) is one of alpha's terms), and
    S <= alpha (S sums such terms)."""
    n = ref.alpha.size
    w = np.ones(n) if mask is None else np.asarray(mask, np.float64).reshape(n)
    d = w / w.sum() if w.sum() > 0 else w
    return float(d.max()) / T if n else 0.0
