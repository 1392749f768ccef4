"""Verification of drafted tokens: speculative (rejection) sampling and its greedy limit.

Letters: B rows in the batch, K drafted tokens per row, V vocabulary size,
x_j the j-th drafted token, q_j the distribution it was drawn from, p_j the target's
distribution at that position, n the number of accepted drafts of a row.

One round of speculative sampling (Leviathan et al. 2023; Chen et al. 2023):

    for j = 0 .. num_draft-1:   accept x_j  iff  q_j(x_j) > 0  and  u_j q_j(x_j) < p_j(x_j),  u_j ~ U[0, 1)
    at the first rejection j:   emit a token from  norm(max(0, p_j - q_j))      (the residual)
    if every draft is accepted: emit a bonus token from p_{num_draft}

Whatever q is, the emitted tokens are distributed exactly as the target.  The rule has no
division, and a token with p = 0 can never be accepted (u q < 0 is impossible).  u is
drawn in float64 (vLLM accepted p = 0 tokens with float32 uniforms), and float32
probabilities are widened with backend.to_float64, which keeps their subnormals on CuPy too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import dlpack_interop, namespace, to_float64
from .validation import as_array, check_target_sums, check_vocab_axis, target_sum_atol

__all__ = ["VerifyResult", "verify", "verify_greedy", "sample_rows"]


@dataclass(frozen=True)
class VerifyResult:
    """num_accepted [B] int64: accepted drafts per row.
    tokens [B, K+1] int64: the accepted drafts, then the recovered or bonus token, then -1."""

    num_accepted: Any
    tokens: Any


def _check_rng(rng, xp):
    if xp is np:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator for NumPy arrays, got {type(rng).__name__}")
    elif not hasattr(rng, "random"):
        raise TypeError(f"rng must be a cupy.random.Generator for CuPy arrays, got {type(rng).__name__}")


def _check_tokens(draft_tokens):
    t = as_array(draft_tokens, "draft_tokens")
    if np.dtype(t.dtype).kind not in "iu":
        raise TypeError(f"draft_tokens must be an integer array, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"draft_tokens must have shape [B, K], got {tuple(t.shape)}")
    return t


def _check_num_draft(num_draft, B, K, xp):
    if num_draft is None:
        return xp.full((B,), K, dtype=xp.int64)
    nd = as_array(num_draft, "num_draft")
    if np.dtype(nd.dtype).kind not in "iu":
        raise TypeError(f"num_draft must be an integer array, got dtype {nd.dtype}")
    if tuple(nd.shape) != (B,):
        raise ValueError(f"num_draft must have shape ({B},), got {tuple(nd.shape)}")
    if B and (int(nd.min()) < 0 or int(nd.max()) > K):
        raise ValueError(f"num_draft must lie in [0, K] = [0, {K}]")
    return nd.astype(xp.int64)


def _check_read(values, name, positions, use, xp, rows=False, dtype=None):
    """Probabilities that are read must be finite and non-negative (name: whose they are):
    values [B, K] gathered at positions [B, K] (verify: the drafts' p(x)), or with rows=True
    whole rows [B, V] at positions [B] (the rows it samples from), which must also have some
    mass, and with dtype (the rows' own) sum to 1 (_check_sums).  Only where use [B, K] or [B]."""
    ok = xp.isfinite(values) & (values >= 0)
    _raise_at(use & ~(xp.all(ok, axis=-1) if rows else ok), positions,
              f"{name} has negative or non-finite probabilities", xp)
    if rows:
        sums = values.sum(axis=-1)
        _raise_at(use & ~(sums > 0), positions, f"{name} has an all-zero row", xp)
        if dtype is not None:
            _check_sums(sums, name, positions, use, dtype, xp)


def _raise_at(bad, positions, what, xp):
    if bool(xp.any(bad)):
        j = int(positions.reshape(-1)[int(xp.argmax(bad.reshape(-1)))])
        raise ValueError(f"{what} at position {j} of a used row")


def _check_sums(sums, name, positions, use, dtype, xp):
    """The rows verify samples from, whose sums [B] these are, at positions [B], must sum to 1
    (within target_sum_atol(dtype)) where use [B]: a row that does not (a top-k or top-p cut
    left unrenormalised, weights passed for probabilities) makes the acceptance test
    u q(x) < p(x) and the residual follow another distribution than the target's, and nothing
    in the tokens shows it."""
    off = xp.where(use, xp.abs(sums - 1), 0)
    worst = float(off.max()) if off.size else 0.0
    if worst > target_sum_atol(dtype):              # the row's position only then (a device sync)
        j = int(positions.reshape(-1)[int(xp.argmax(off))])
        check_target_sums(worst, dtype, name, row=f"the row at position {j} of a used row",
                          hint=" (renormalise after top-k or top-p)")


def _check_prob_rows(probs, name, valid, xp):
    """probs[b, j] must be finite and non-negative with a positive sum where valid[b, j]:
    _check_read on one position j at a time, so the temporaries are [B, V], never [B, K, V]."""
    for j in range(probs.shape[1]):
        _check_read(probs[:, j], name, xp.full(probs.shape[0], j), valid[:, j], xp, rows=True)


def _check_shapes(draft_tokens, draft_probs, target_probs, num_draft):
    t = _check_tokens(draft_tokens)
    B, K = t.shape
    p = as_array(target_probs, "target_probs")
    if p.ndim != 3 or tuple(p.shape[:2]) != (B, K + 1):
        raise ValueError(f"target_probs must have shape [B, K+1, V] = [{B}, {K + 1}, V], got {tuple(p.shape)}")
    if np.dtype(p.dtype).kind != "f":
        raise TypeError(f"target_probs must be a floating-point array, got dtype {p.dtype}")
    check_vocab_axis(p, "target_probs")
    V = p.shape[2]
    q = None
    if draft_probs is not None:
        q = as_array(draft_probs, "draft_probs")
        if tuple(q.shape) != (B, K, V):
            raise ValueError(f"draft_probs must have shape [B, K, V] = [{B}, {K}, {V}], got {tuple(q.shape)}")
        if np.dtype(q.dtype).kind != "f":
            raise TypeError(f"draft_probs must be a floating-point array, got dtype {q.dtype}")
    xp = namespace(t, q, p)
    nd = _check_num_draft(num_draft, B, K, xp)
    valid = xp.arange(K)[None, :] < nd[:, None]                      # [B, K]: the drafts that exist
    if bool(xp.any(valid & ((t < 0) | (t >= V)))):
        raise ValueError(f"draft_tokens has ids outside [0, V) = [0, {V}) in used positions")
    return xp, t, q, p, nd, valid, B, K, V


def sample_rows(weights, u):
    """One index per row of non-negative weights [B, V], by inverse CDF with uniforms u [B] in [0, 1).

    Float64 throughout.  A zero-weight index is never returned: index i is picked iff
    cdf[i-1] <= u * total < cdf[i], impossible when cdf[i-1] == cdf[i]; a product that rounds
    up to the total is sent to the last index of positive weight.
    """
    xp = namespace(weights)
    w = to_float64(weights)                                  # float32 subnormals kept (CuPy: -ftz)
    cdf = xp.cumsum(w, axis=-1)
    x = u * cdf[:, -1]
    idx = xp.sum(cdf <= x[:, None], axis=-1)
    V = w.shape[-1]
    last = V - 1 - xp.argmax((w > 0)[:, ::-1], axis=-1)
    return xp.minimum(idx, last).astype(xp.int64)


@dlpack_interop
def verify(draft_tokens, draft_probs, target_probs, *, rng, num_draft=None, uniforms=None,
           validate=True) -> VerifyResult:
    """Speculative sampling of one round for a batch; exact in distribution.

    draft_tokens [B, K] int; draft_probs [B, K, V], the q each draft was drawn from (after any
    temperature / top-k / top-p); target_probs [B, K+1, V]; num_draft [B] int in [0, K] for
    ragged rows (default K): positions at or past a row's num_draft are never used and may
    hold -1 or NaN.  rng: numpy.random.Generator (cupy.random.Generator for CuPy arrays);
    uniforms [B, K] in [0, 1) replaces the acceptance uniforms (tests).

    What it reads must be finite and non-negative: each draft's p(x), and the rows it samples
    from (p at the position a round ends on, and q there after a rejection), which must also
    sum to 1 (within target_sum_atol of their dtype).  (A draft whose q(x) is not is rejected,
    and its q row checked.)  The rest of a row cannot change the result, so it is not looked
    at; validate=False skips these checks.

    Inconsistent inputs (a residual with no positive mass: rows not normalised, under
    validate=False, or a rejected draft with q(x) = 0) fall back to p.  Work and extra
    memory: O(B K + B V).
    """
    xp, t, q, p, nd, valid, B, K, V = _check_shapes(draft_tokens, draft_probs, target_probs, num_draft)
    if q is None:
        raise TypeError("draft_probs must be an array, got None")
    _check_rng(rng, xp)
    if uniforms is None:
        u = rng.random((B, K), dtype=xp.float64)
    else:
        u = as_array(uniforms, "uniforms")
        if np.dtype(u.dtype).kind != "f":
            raise TypeError(f"uniforms must be a floating-point array, got dtype {u.dtype}")
        if tuple(u.shape) != (B, K):
            raise ValueError(f"uniforms must have shape [B, K] = [{B}, {K}], got {tuple(u.shape)}")
        u = to_float64(u)
        if bool(xp.any(valid & ~((u >= 0) & (u < 1)))):
            raise ValueError("uniforms must lie in [0, 1)")

    rows = xp.arange(B)[:, None]
    cols = xp.arange(K)[None, :]
    tok = xp.where(valid, t, 0)                                      # a safe index where unused
    q_x = xp.where(valid, to_float64(q[rows, cols, tok]), 0)        # q_j(x_j), gathered: [B, K]
    p_x = xp.where(valid, to_float64(p[rows, cols, tok]), 0)        # p_j(x_j)
    # a bad q(x), or a bad p(x) but +inf, rejects its draft, and the row checks below see that row;
    # p(x) = +inf would pass as an acceptance
    if validate:
        _check_read(p_x, "target_probs", xp.broadcast_to(cols, (B, K)), valid, xp)
    accept = valid & (q_x > 0) & (u * q_x < p_x)
    n = xp.sum(xp.cumprod(accept, axis=1), axis=1).astype(xp.int64)  # accepted before the first rejection

    # the row each round ends on: p at position n, and q there if a draft was rejected
    b = xp.arange(B)
    rejected = n < nd
    p_end = to_float64(p[b, n])                                      # [B, V]
    q_end = xp.where(rejected[:, None], to_float64(q[b, xp.minimum(n, K - 1)]), 0) if K else xp.zeros_like(p_end)
    if validate:
        _check_read(p_end, "target_probs", n, xp.ones(B, dtype=bool), xp, rows=True, dtype=p.dtype)
        _check_read(q_end, "draft_probs", n, rejected, xp, rows=True, dtype=q.dtype)
    residual = xp.maximum(p_end - q_end, 0)
    empty = ~(residual.sum(axis=-1) > 0)                             # inconsistent input: fall back to p
    residual = xp.where(empty[:, None], p_end, residual)
    last = sample_rows(residual, rng.random(B, dtype=xp.float64))

    tokens = xp.where(cols < n[:, None], t, -1).astype(xp.int64)
    tokens = xp.concatenate([tokens, xp.full((B, 1), -1, dtype=xp.int64)], axis=1)
    tokens[b, n] = last
    return VerifyResult(n, tokens)


@dlpack_interop
def verify_greedy(draft_tokens, target_probs, *, num_draft=None, validate=True) -> VerifyResult:
    """Verification at temperature 0: accept while x_j equals argmax p_j; then emit the target argmax.

    Ties in the argmax go to the lowest token id (as numpy/cupy argmax).  Shapes as in verify;
    the rows it reads must be finite and non-negative with some mass (an argmax over a NaN
    would pick the NaN), which validate=False leaves unchecked.
    """
    xp, t, _, p, nd, valid, B, K, V = _check_shapes(draft_tokens, None, target_probs, num_draft)
    if validate:
        _check_prob_rows(p, "target_probs", xp.arange(K + 1)[None, :] <= nd[:, None], xp)
    best = xp.argmax(p, axis=-1).astype(xp.int64)                     # [B, K+1]
    accept = valid & (t == best[:, :K])
    n = xp.sum(xp.cumprod(accept, axis=1), axis=1).astype(xp.int64)
    b = xp.arange(B)
    tokens = xp.where(xp.arange(K)[None, :] < n[:, None], t, -1).astype(xp.int64)
    tokens = xp.concatenate([tokens, xp.full((B, 1), -1, dtype=xp.int64)], axis=1)
    tokens[b, n] = best[b, n]
    return VerifyResult(n, tokens)
