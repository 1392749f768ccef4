"""Calibrated statistics for testing samplers, and check_sampler() for anyone's verify().

Every check here fixes its seed and derives its bound from the sample size:
  * a count that should be Binomial(n, a) must lie within 5 sigma = 5 sqrt(n a (1 - a));
    with a in {0, 1} the count must be exact;
  * a histogram that should follow a distribution must pass a chi-square test with
    p-value >= 1e-6 (bins with expected count < 5 are pooled), and a cell of probability
    zero must have a count of exactly zero.
With these bounds a correct sampler fails a check with probability about 1e-6; the fixed
seed makes every run give the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .backend import to_numpy
from .theory import accept_length_pmf
from .validation import check_real_scalar, takes_parameter

__all__ = ["SIGMAS", "MIN_P_VALUE", "chi2_sf", "binomial_check", "goodness_of_fit",
           "Check", "SamplerReport", "sampler_problem", "check_sampler", "zero_probability_draft_check"]

SIGMAS = 5.0
MIN_P_VALUE = 1e-6


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularised upper incomplete gamma Q(dof/2, x/2)."""
    if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)):
        raise TypeError(f"dof must be an int, got {type(dof).__name__}")
    if dof <= 0:
        raise ValueError(f"dof must be positive, got {dof}")
    x = check_real_scalar(x, "x")
    if x <= 0:
        return 1.0
    a, y = dof / 2.0, x / 2.0
    log_pre = a * math.log(y) - y - math.lgamma(a)
    if y < a + 1:                              # series for the lower function P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= y / n
            total += term
            if term < total * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_pre))
    # continued fraction for Q (modified Lentz)
    tiny = 1e-300
    b = y + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return math.exp(log_pre) * h


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def binomial_check(name: str, k: int, n: int, a: float, sigmas: float = SIGMAS) -> Check:
    """k successes out of n trials against rate a, within `sigmas` binomial standard deviations."""
    for arg, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if k > n:
        raise ValueError(f"k must be <= n (successes out of trials), got k = {k}, n = {n}")
    check_real_scalar(a, "a", low=0, high=1)
    check_real_scalar(sigmas, "sigmas", low=0, low_inclusive=False)
    mean = n * a
    sd = math.sqrt(max(n * a * (1 - a), 0.0))
    ok = abs(k - mean) <= sigmas * sd if sd > 0 else k == round(mean)
    z = (k - mean) / sd if sd > 0 else (0.0 if ok else math.inf)
    return Check(name, bool(ok), f"{k}/{n} = {k / max(n, 1):.5f} vs {a:.5f} ({z:+.2f} sigma, bound {sigmas:g})")


def _host_floats(values, name):
    """values as a float64 NumPy array, or a TypeError naming the argument."""
    if values is None or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(values).__name__}")
    try:
        a = to_numpy(values)
    except (TypeError, ValueError) as exc:           # ragged lists, ...
        raise TypeError(f"{name} must be an array of numbers, got {type(values).__name__}") from exc
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def goodness_of_fit(name: str, counts, probs, min_p: float = MIN_P_VALUE) -> Check:
    """Chi-square test of counts against probs (weights: normalised here); zero-probability
    cells must be empty."""
    counts, probs = _host_floats(counts, "counts"), _host_floats(probs, "probs")
    if counts.shape != probs.shape or counts.ndim != 1:
        raise ValueError(f"counts and probs must be 1-d of one length, got shapes {counts.shape} and {probs.shape}")
    if not (np.all(np.isfinite(counts)) and np.all(counts >= 0) and np.all(counts == np.round(counts))):
        raise ValueError("counts must be non-negative whole numbers")
    if not (np.all(np.isfinite(probs)) and np.all(probs >= 0) and probs.sum() > 0):
        raise ValueError("probs must be finite, non-negative and not all zero")
    check_real_scalar(min_p, "min_p", low=0, high=1)
    probs = probs / probs.sum()
    n = counts.sum()
    zero = probs <= 0
    if np.any(counts[zero] > 0):
        return Check(name, False, f"{int(counts[zero].sum())} draws landed on zero-probability cells")
    if n == 0:
        return Check(name, True, "no samples")
    expected = probs[~zero] * n
    obs = counts[~zero]
    order = np.argsort(expected, kind="stable")   # pool the smallest cells until each expects >= 5
                                                  # (stable: equal cells pool alike on every machine)
    e_s, o_s = expected[order], obs[order]
    bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(e_s, o_s):
        acc_e += e
        acc_o += o
        if acc_e >= 5:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0:
        if bins_e:
            bins_e[-1] += acc_e
            bins_o[-1] += acc_o
        else:
            bins_e, bins_o = [acc_e], [acc_o]
    bins_e, bins_o = np.array(bins_e), np.array(bins_o)
    dof = len(bins_e) - 1
    if dof == 0:
        return Check(name, True, f"one cell after pooling (n = {int(n)})")
    stat = float(np.sum((bins_o - bins_e) ** 2 / bins_e))
    pv = chi2_sf(stat, dof)
    return Check(name, pv >= min_p, f"chi2 = {stat:.1f}, dof = {dof}, p = {pv:.3g} (bound {min_p:g}, n = {int(n)})")


@dataclass
class SamplerReport:
    checks: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list:
        return [c.name for c in self.checks if not c.passed]

    def __str__(self) -> str:
        w = max((len(c.name) for c in self.checks), default=10)
        lines = [f"{'property':{w}s}  result  detail"]
        lines += [f"{c.name:{w}s}  {'pass' if c.passed else 'FAIL':6s}  {c.detail}" for c in self.checks]
        return "\n".join(lines)


def sampler_problem(seed=0, K=4, V=6, closeness=0.6):
    """Per-position distributions p_j (K+1 rows) and q_j (K rows) with zeros on both sides.

    q_j = closeness * p_j + (1 - closeness) * noise, then a few entries zeroed, so alpha_j is
    moderate and every path of the sampler (accept, reject, bonus) is exercised often.
    """
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V), size=K + 1)
    p[:, 0] = 0.0                                   # a token the target never emits
    p /= p.sum(-1, keepdims=True)
    q = closeness * p[:K] + (1 - closeness) * rng.dirichlet(np.ones(V), size=K)
    q[:, 1] = 0.0                                   # a token the draft never proposes
    q /= q.sum(-1, keepdims=True)
    return p, q


def check_sampler(verify_fn, *, seed=0, trials=100_000, K=4, V=6) -> SamplerReport:
    """Run the calibrated statistical suite against a function with lkref.verify's signature.

    verify_fn(draft_tokens [B, K], draft_probs [B, K, V], target_probs [B, K+1, V], *, rng)
    must return an object with .num_accepted [B] and .tokens [B, K+1] (as lkref.verify).
    Every row of the batch is one independent round with the same per-position p_j and
    q_j, so B = trials rounds are checked at once.  Properties:

      structure        shapes, -1 padding, ids in [0, V), accepted drafts echoed unchanged
      acceptance[j]    acceptances at j / rounds reaching j  ~  Binomial(reached, alpha_j)
      accepted-count   histogram of N  ~  theory.accept_length_pmf(alpha)   (chi-square)
      marginal[j]      token emitted at position j (rounds with N >= j)  ~  p_j   (chi-square)
      p = 0 draft at u = 0   where verify_fn takes uniforms=: a draft the target gives
                       p = 0 is rejected with every uniform 0.0 (zero_probability_draft_check)
    """
    if not callable(verify_fn):
        raise TypeError(f"verify_fn must be a function with lkref.verify's signature, got {type(verify_fn).__name__}")
    for name, value, low in (("seed", seed, 0), ("trials", trials, 1), ("K", K, 1), ("V", V, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    p, q = sampler_problem(seed, K, V)
    alphas = np.minimum(p[:K], q).sum(-1)
    rng = np.random.default_rng(seed + 1)
    B = trials
    # drafts drawn from q_j: inverse CDF with the test's own stream
    cdf = np.cumsum(q, axis=-1)
    u = rng.random((B, K))
    drafts = np.minimum((u[..., None] >= cdf[None]).sum(-1), V - 1).astype(np.int64)
    dq = np.broadcast_to(q, (B, K, V))
    dp = np.broadcast_to(p, (B, K + 1, V))
    res = verify_fn(drafts, dq, dp, rng=np.random.default_rng(seed + 2))
    if not (hasattr(res, "num_accepted") and hasattr(res, "tokens")):
        raise TypeError(f"verify_fn must return an object with .num_accepted and .tokens (as lkref.verify), "
                        f"got {type(res).__name__}")
    n = np.asarray(res.num_accepted)
    tok = np.asarray(res.tokens)
    report = SamplerReport()

    cols = np.arange(K + 1)[None, :]
    problems = []
    if n.shape != (B,) or tok.shape != (B, K + 1):
        problems.append(f"shapes {n.shape} and {tok.shape}, expected ({B},) and ({B}, {K + 1})")
    else:
        if np.any((n < 0) | (n > K)):
            problems.append("num_accepted outside [0, K]")
        nn = np.clip(n, 0, K)[:, None]
        if np.any(tok[cols > nn] != -1):
            problems.append("tokens after the emitted ones are not -1")
        if np.any((tok[cols <= nn] < 0) | (tok[cols <= nn] >= V)):
            problems.append("emitted token ids outside [0, V)")
        if np.any((tok[:, :K] != drafts) & (cols[:, :K] < nn)):
            problems.append("accepted positions do not echo the drafts")
    report.checks.append(Check("structure", not problems, "; ".join(problems) or f"{B} rounds, all well-formed"))
    if problems:
        return report

    for j in range(K):
        reached = int(np.sum(n >= j))
        acc = int(np.sum(n > j))
        report.checks.append(binomial_check(f"acceptance[{j}]", acc, reached, float(alphas[j])))
    hist = np.bincount(n, minlength=K + 1)
    report.checks.append(goodness_of_fit("accepted-count", hist, accept_length_pmf(alphas)))
    for j in range(K + 1):
        sel = n >= j
        counts = np.bincount(tok[sel, j], minlength=V)
        report.checks.append(goodness_of_fit(f"marginal[{j}]", counts, p[j]))
    if takes_parameter(verify_fn, "uniforms"):
        report.checks.append(zero_probability_draft_check(verify_fn, p, q))
    return report


def zero_probability_draft_check(verify_fn, p, q, rows=64) -> Check:
    """A draft the target gives p = 0 must be rejected even when its uniform is 0.0.

    No sample of reasonable size sees this: an acceptance test u <= p/q instead of
    u q < p accepts such a draft only when u is exactly 0.0, which a float32 uniform is with
    probability 2^-24.  So for a verify_fn that takes its acceptance uniforms (uniforms=,
    as lkref.verify does) it is tried directly: drafts of token 0, which sampler_problem's
    target never emits and its draft does, with every uniform 0.0; each row must reject at
    position 0 and emit something else."""
    K, V = q.shape
    drafts = np.zeros((rows, K), np.int64)
    res = verify_fn(drafts, np.broadcast_to(q, (rows, K, V)), np.broadcast_to(p, (rows, K + 1, V)),
                    rng=np.random.default_rng(0), uniforms=np.zeros((rows, K)))
    n, tok = np.asarray(res.num_accepted), np.asarray(res.tokens)
    bad = int(np.sum((n != 0) | (tok[:, 0] == 0)))
    detail = (f"rejected in all {rows} rows" if not bad else
              f"accepted or emitted in {bad} of {rows} rows (an acceptance test u <= p/q instead of u q < p?)")
    return Check("p = 0 draft at u = 0", not bad, detail)
