"""The paper's optimiser for the toys: AdamW (beta = (0.9, 0.95)), a cosine schedule with
linear warm-up, and gradient clipping by global norm.  Parameters and gradients are dicts
of NumPy arrays; updates are in place on the optimiser's own parameter arrays."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["AdamW", "cosine_lr", "clip_by_global_norm"]


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def clip_by_global_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient so that their joint L2 norm is at most max_norm; return the norm before."""
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    if norm > max_norm > 0:
        for g in grads.values():
            g *= max_norm / norm
    return norm


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), bias-corrected."""

    def __init__(self, params: dict, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, no_decay=()):
        self.params = params
        self.b1, self.b2 = betas
        self.eps = eps
        self.wd = weight_decay
        self.no_decay = set(no_decay)
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict, lr: float) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            if self.wd and k not in self.no_decay:
                p -= lr * self.wd * p
            p -= lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)
