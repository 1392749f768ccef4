"""The paper's motivating toy (its section 3.3, Fig. 2): one Gaussian fitted to a mixture.

The target is a Gaussian mixture, the draft one Gaussian N(mu, sigma); both are
discretised on a fine grid x_i, so the draft is q = softmax(z) with logits
z_i = -(x_i - mu)^2 / (2 sigma^2), and every loss gradient comes from lkref itself
(d loss / d z), chained by hand into the two parameters mu and s = log sigma:

    dz_i / dmu = (x_i - mu) / sigma^2          dz_i / ds = (x_i - mu)^2 / sigma^2

Reverse KL, KL(q || p) = sum_i q_i (log q_i - log p_i), is not an lkref loss; its
gradient is written here: d/dz_j = q_j (log q_j - log p_j - KL(q || p)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import losses
from ..validation import check_real_scalar
from .optim import AdamW, cosine_lr

__all__ = ["PAPER_MIXTURE", "GaussianFit", "parse_mixture", "check_mixture", "mixture_probs", "fit_gaussian",
           "TOY_LOSSES"]

#: 0.5 N(-4, 1^2) + 0.25 N(0, 0.5^2) + 0.25 N(6, 0.5^2): (weight, mean, std) per component.
PAPER_MIXTURE = ((0.5, -4.0, 1.0), (0.25, 0.0, 0.5), (0.25, 6.0, 0.5))
TOY_LOSSES = ("kl", "reverse_kl", "tv", "lk_alpha", "lk_lambda")


def parse_mixture(text: str):
    """'W:MU:SIGMA,W:MU:SIGMA,...' -> ((w, mu, sigma), ...), weights renormalised."""
    comps = []
    for part in text.split(","):
        try:
            w, mu, s = (float(v) for v in part.split(":"))
        except ValueError as exc:
            raise ValueError(f"mixture component {part!r} is not W:MU:SIGMA") from exc
        if not (np.isfinite([w, mu, s]).all() and w > 0 and s > 0):
            raise ValueError(f"mixture component {part!r} needs finite numbers, W > 0 and SIGMA > 0")
        comps.append((w, mu, s))
    return check_mixture(comps)


#: The most grid points a mixture may need (100 a unit: a span of 20 000 units)
MAX_GRID_POINTS = 2_000_000


def check_mixture(mixture):
    """The mixture as ((w, mu, sigma), ...) floats, its weights renormalised: finite numbers, w > 0,
    sigma > 0, and a grid (grid_for) of at most MAX_GRID_POINTS points."""
    try:
        comps = tuple((float(w), float(mu), float(s)) for w, mu, s in mixture)
    except (TypeError, ValueError):
        raise ValueError("mixture must be a sequence of (weight, mean, std) triples of numbers") from None
    if not comps:
        raise ValueError("mixture must have at least one component")
    for c in comps:
        if not (np.isfinite(c).all() and c[0] > 0 and c[2] > 0):
            raise ValueError(f"mixture component {c} needs finite numbers, weight > 0 and std > 0")
    total = sum(c[0] for c in comps)
    comps = tuple((w / total, mu, s) for w, mu, s in comps)
    points = _grid(comps)[2]
    if points > MAX_GRID_POINTS:
        raise ValueError(f"mixture spans too wide a grid: {points} points at 100 a unit, over {MAX_GRID_POINTS}")
    return comps


def _grid(mixture, points_per_unit=100, margin=8.0):
    """(lo, hi, points) of the grid that covers the mixture."""
    lo = min(mu - margin * s for _, mu, s in mixture) - 4
    hi = max(mu + margin * s for _, mu, s in mixture) + 4
    return lo, hi, int((hi - lo) * points_per_unit) + 1


def grid_for(mixture, points_per_unit=100, margin=8.0):
    return np.linspace(*_grid(mixture, points_per_unit, margin))


def mixture_probs(x, mixture):
    """The mixture discretised on the grid x: log-densities combined by logsumexp, normalised."""
    logs = np.stack([np.log(w) - np.log(s) - 0.5 * ((x - mu) / s) ** 2 for w, mu, s in mixture])
    top = logs.max(0)
    logp = top + np.log(np.exp(logs - top).sum(0))
    logp -= logp.max()
    p = np.exp(logp)
    return p / p.sum()


def _reverse_kl(z, p):
    logq = losses.log_softmax(z)
    q = np.exp(logq)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1)), -np.inf)
    val = np.sum(q * (logq - logp))
    return val, q * (logq - logp - val)


@dataclass
class GaussianFit:
    loss_name: str
    mu: float
    sigma: float
    alpha: float
    loss: float
    steps: int

    def as_dict(self):
        return {"loss_name": self.loss_name, "mu": self.mu, "sigma": self.sigma,
                "alpha": self.alpha, "loss": self.loss, "steps": self.steps}


def fit_gaussian(loss: str, mixture=PAPER_MIXTURE, init=(0.0, 4.0), steps=3000, lr=0.05,
                 eta=3.0) -> GaussianFit:
    """Fit N(mu, sigma) to the mixture by AdamW on (mu, log sigma) with lkref's gradients."""
    if loss not in TOY_LOSSES:
        raise ValueError(f"loss must be one of {TOY_LOSSES}, got {loss!r}")
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ValueError(f"init must be (mu, sigma), got {init!r}")
    check_real_scalar(init[0], "init mu")
    check_real_scalar(init[1], "init sigma", low=0, low_inclusive=False)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    check_real_scalar(lr, "lr", low=0, low_inclusive=False)
    check_real_scalar(eta, "eta", low=0)
    mixture = check_mixture(mixture)
    x = grid_for(mixture)
    p = mixture_probs(x, mixture)
    params = {"mu": np.array(float(init[0])), "s": np.array(np.log(init[1]))}
    opt = AdamW(params, betas=(0.9, 0.95))

    def evaluate(mu, s):
        sigma = np.exp(s)
        z = -0.5 * ((x - mu) / sigma) ** 2
        if loss == "reverse_kl":
            val, dz = _reverse_kl(z, p)
        else:
            r = losses.LOSSES_BY_NAME[loss](z, p, **({"eta": eta} if loss == "lk_lambda" else {}))
            val, dz = float(r.loss), r.grad
        return z, float(val), dz, sigma

    for step in range(steps):
        mu, s = float(params["mu"]), float(params["s"])
        z, val, dz, sigma = evaluate(mu, s)
        d = x - mu
        grads = {"mu": np.array(np.sum(dz * d) / sigma ** 2),
                 "s": np.array(np.sum(dz * d * d) / sigma ** 2)}
        opt.step(grads, cosine_lr(step, steps, lr, warmup=50, floor=0.01))
    mu, s = float(params["mu"]), float(params["s"])
    z, val, _, sigma = evaluate(mu, s)
    q = losses.softmax(z)
    return GaussianFit(loss, mu, float(sigma), float(np.minimum(p, q).sum()), val, steps)
