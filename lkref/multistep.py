"""Beyond the paper: one objective over all K draft positions, the expected acceptance length.

With alpha_{t,k} the acceptance rate of draft position k for a round that starts at token
position t (teacher-forced, as the per-position losses use it),

    tau_t = 1 + sum_{k=1..K} prod_{j<=k} alpha_{t,j}          (the tokens one target call yields)
    L     = mean_t (K + 1 - tau_t)                            (tokens short of a perfect draft)

L / K is Bebop's end-to-end TV loss (1 - (1/K) sum_j prod_{i<=j} (1 - TV_i)), and L is
DeepSpec's -E[tau] up to the constant K + 1.  An early position appears in more products,
so it counts more, which is the point.

The gradient through the products, without division (P_0 = 1, R_{K} = 1):

    P_k = prod_{j<=k} alpha_j,   R_k = 1 + alpha_{k+1} R_{k+1}   (the expected tail after k)
    d tau / d alpha_k = P_{k-1} R_k

and alpha_k's gradient with respect to position k's logits is TV's with the sign flipped,
so position k's logits get tv_backward(d_t P_{t,k-1} R_{t,k}), d_t = w_t / sum w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from . import losses as L
from .backend import dlpack_interop, namespace, work_dtype
from .validation import as_array, at_position, check_cache, check_upstream

__all__ = ["accept_length_forward", "accept_length_backward", "AcceptLengthResult", "accept_length_loss"]


@dlpack_interop
def accept_length_forward(alphas):
    """losses_t = K + 1 - tau_t from alphas [..., K]; the cache holds the prefix products and tails."""
    if isinstance(alphas, (list, tuple)):            # np.asarray would put K first, not last
        raise TypeError("alphas must be one array [..., K], not a sequence: stack the K positions' "
                        "alphas on the last axis (xp.stack(alphas, axis=-1))")
    alphas = as_array(alphas, "alphas")
    work_dtype(alphas.dtype, "alphas")
    if alphas.ndim < 1:
        raise ValueError("alphas must have a positions axis (the last, K), got a 0-d array")
    xp = namespace(alphas)
    # finite; not held to [0, 1]: the loss is a polynomial in them, smooth through 0 and 1
    if not bool(xp.all(xp.isfinite(alphas))):
        raise ValueError("alphas contains non-finite values (NaN or inf)")
    K = alphas.shape[-1]
    ones = xp.ones(alphas.shape[:-1] + (1,), dtype=alphas.dtype)
    P = xp.concatenate([ones, xp.cumprod(alphas, axis=-1)], axis=-1)      # P_0 .. P_K
    tails = [ones[..., 0]]                                               # R_K = 1
    for k in range(K - 1, 0, -1):                                        # R_k = 1 + alpha_{k+1} R_{k+1}
        tails.append(1 + alphas[..., k] * tails[-1])
    R = xp.stack(tails[::-1], axis=-1) if K else xp.zeros(alphas.shape, alphas.dtype)   # R_1 .. R_K
    tau = xp.sum(P, axis=-1)
    return K + 1 - tau, {"P": P, "R": R}


@dlpack_interop
def accept_length_backward(dlosses, cache):
    """dalphas_k = -dlosses * P_{k-1} R_k  (d tau / d alpha_k = P_{k-1} R_k)."""
    check_cache(cache, "accept_length_forward", ("P", "R"))
    P, R = cache["P"], cache["R"]
    dlosses = check_upstream(dlosses, "dlosses", P.shape[:-1], P.dtype, namespace(P))
    return -dlosses[..., None] * P[..., :-1] * R


@dataclass(frozen=True)
class AcceptLengthResult:
    """loss: mean_t (K + 1 - tau_t); grads: one per position; alphas: [K] arrays of the
    leading shape; tau: the masked mean expected acceptance length."""

    loss: Any
    grads: list
    alphas: list
    tau: Any


@dlpack_interop
def accept_length_loss(draft_logits: Sequence, target_probs: Sequence, *, mask=None, temperature=1.0,
                       draft_to_target=None, reduce=None) -> AcceptLengthResult:
    """The multi-step objective over K positions given as sequences of K arrays (like multi_position).

    All positions share the leading shape; mask (one array for all positions) weighs the
    rounds t.  A position with no target mass on the draft vocabulary has alpha = 0, which
    ends the round there (it is not dropped, unlike in the per-position losses).  reduce: the
    data-parallel hook of mean_forward, called once.
    """
    if not isinstance(draft_logits, (list, tuple)) or not isinstance(target_probs, (list, tuple)):
        raise TypeError("draft_logits and target_probs must be sequences (list or tuple) of K arrays")
    K = len(draft_logits)
    if K == 0 or len(target_probs) != K:
        raise ValueError(f"draft_logits and target_probs must hold the same K >= 1 positions, "
                         f"got {K} and {len(target_probs)}")
    caches, alphas, w = [], [], None
    for k in range(K):
        with at_position(k):
            xp, z, p, _, _, out_dtype, T = L.prepare_inputs(draft_logits[k], target_probs[k], mask, temperature,
                                                       draft_to_target, need_kl=False)
        if k and tuple(z.shape) != tuple(caches[0][1].shape):
            raise ValueError(f"every position must have the shape of the first, got {tuple(z.shape)} at {k}")
        _, cache = L.tv_forward(z, p, temperature=T)
        caches.append((cache, z, out_dtype))
        alphas.append(cache["alpha"])
        w = (xp.ones(z.shape[:-1], dtype=z.dtype) if mask is None else xp.asarray(mask).astype(z.dtype)) \
            if w is None else w
    A = xp.stack(alphas, axis=-1)
    losses, acache = accept_length_forward(A)
    loss, mcache = L.mean_forward(losses, w, reduce)
    dA = accept_length_backward(L.mean_backward(1, mcache), acache)
    grads = [L.tv_backward(-dA[..., k], caches[k][0]).astype(caches[k][2], copy=False) for k in range(K)]
    return AcceptLengthResult(loss, grads, alphas, K + 1 - loss)
