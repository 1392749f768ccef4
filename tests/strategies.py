"""Hypothesis strategies and seeded builders for logits and target distributions."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**32 - 1)
temperatures = st.floats(min_value=0.25, max_value=4.0, allow_nan=False, allow_subnormal=False)


def make_logits(rng, shape, scale=2.0, dtype=np.float64):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_probs(rng, shape, zero_frac=0.3, dtype=np.float64):
    """Random target rows with about zero_frac exact zeros (never an all-zero row)."""
    x = rng.gamma(0.5, size=shape)
    x = np.where(rng.random(shape) < zero_frac, 0.0, x)
    top = np.argmax(rng.random(shape), axis=-1)
    np.put_along_axis(x, top[..., None], np.maximum(np.take_along_axis(x, top[..., None], -1), 0.1), -1)
    return (x / x.sum(-1, keepdims=True)).astype(dtype)


@st.composite
def problems(draw, max_n=6, max_v=12):
    """(z, p, temperature) float64 problems with arbitrary leading shape (N,) or (B, T)."""
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    v = draw(st.integers(1, max_v))
    lead = draw(st.sampled_from([(draw(st.integers(1, max_n)),), (2, draw(st.integers(1, 3)))]))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    z = make_logits(rng, lead + (v,), scale)
    p = make_probs(rng, lead + (v,), zero_frac=draw(st.sampled_from([0.0, 0.3, 0.7])))
    return z, p, draw(temperatures), seed
