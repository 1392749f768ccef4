"""Acceptance-length theory for speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

Letters: K draft tokens per round; alpha_j the acceptance rate of draft position j given
that positions 1..j-1 were accepted; N the number of accepted drafts in a round;
tau = N + 1 the tokens emitted per target call (the accepted drafts plus one token from
the target).

    P(N = n) = (prod_{i<=n} alpha_i) (1 - alpha_{n+1})   for n < K,   P(N = K) = prod_{i<=K} alpha_i
    E[tau]   = 1 + sum_{k=1..K} prod_{j<=k} alpha_j       ( = (1 - a^(K+1)) / (1 - a) for constant a)
    speed-up = (1 - a^(K+1)) / ((1 - a)(K c + 1))        (Leviathan Thm 3.8; c = draft/target cost)

Every function is vectorised over leading axes and checks its inputs.  They run on
NumPy or CuPy arrays alike.
"""

from __future__ import annotations

from .backend import dlpack_interop, namespace
from .validation import as_array, check_probs, check_real_scalar

__all__ = ["acceptance_rate", "expected_accept_length", "accept_length_pmf", "speedup"]


@dlpack_interop
def acceptance_rate(p, q):
    """alpha = sum_v min(p_v, q_v) over the last axis, for probability rows p and q of one shape."""
    p = check_probs(p, "p")
    q = check_probs(q, "q", shape=p.shape)
    xp = namespace(p, q)
    return xp.sum(xp.minimum(p, q), axis=-1)


def _check_alphas(alphas, name="alphas"):
    a = as_array(alphas, name)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
    if a.ndim < 1:
        raise ValueError(f"{name} must have a last axis of K draft positions, got a 0-d array")
    xp = namespace(a)
    a = a.astype(xp.float64 if a.dtype.itemsize >= 8 or a.dtype.kind != "f" else xp.float32, copy=False)
    if not bool(xp.all(xp.isfinite(a))) or not bool(xp.all((a >= 0) & (a <= 1))):
        raise ValueError(f"{name} must lie in [0, 1] (acceptance rates), got values outside it or NaN")
    return xp, a


@dlpack_interop
def expected_accept_length(alphas):
    """E[tau] = 1 + sum_k prod_{j<=k} alpha_j; alphas (..., K) -> (...).  K = 0 gives 1."""
    xp, a = _check_alphas(alphas)
    return 1 + xp.sum(xp.cumprod(a, axis=-1), axis=-1)


@dlpack_interop
def accept_length_pmf(alphas):
    """P(N = n) for n = 0..K; alphas (..., K) -> (..., K + 1), each row summing to 1."""
    xp, a = _check_alphas(alphas)
    ones = xp.ones(a.shape[:-1] + (1,), dtype=a.dtype)
    reach = xp.concatenate([ones, xp.cumprod(a, axis=-1)], axis=-1)    # P(N >= n), n = 0..K
    stop = xp.concatenate([1 - a, ones], axis=-1)                      # P(stop at n | reached n)
    return reach * stop


@dlpack_interop
def speedup(alpha, k, cost_ratio):
    """Expected walltime improvement factor (1 - a^(k+1)) / ((1 - a)(k c + 1)) (Leviathan Thm 3.8).

    alpha: constant per-position acceptance rate in [0, 1] (array or scalar); k: draft
    length (int >= 0); cost_ratio c >= 0: the cost of one draft call over one target call.
    At alpha = 1 the limit (k + 1) / (k c + 1) is used.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    c = check_real_scalar(cost_ratio, "cost_ratio", low=0)
    xp, a = _check_alphas(as_array(alpha, "alpha")[..., None], "alpha")
    a = a[..., 0]
    # (1 - a^(k+1)) / (1 - a) = sum_{i=0..k} a^i, exact at a = 1 and free of 0/0
    tokens = xp.sum(a[..., None] ** xp.arange(k + 1), axis=-1)
    return tokens / (k * c + 1)
