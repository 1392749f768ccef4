"""Samplers with planted bugs: the negative controls of the statistical tests.

An independent, vectorised re-implementation of verify() with a switch per bug.  With
bug=None it is a correct sampler, and the tests check that it passes too, so a failure
with a bug switched on is the bug's doing.
"""

from __future__ import annotations

import numpy as np

from lkref.sampler import VerifyResult, sample_rows

BUGS = ["always_accept", "residual_is_p", "shared_uniform", "bonus_wrong_row", "residual_drafted_only",
        "loose_accept"]


def planted_verify(bug=None):
    def fn(draft_tokens, draft_probs, target_probs, *, rng, num_draft=None, uniforms=None, validate=True):
        t = np.asarray(draft_tokens)
        B, K = t.shape
        b = np.arange(B)
        nd = np.full(B, K) if num_draft is None else np.asarray(num_draft)
        live = np.arange(K)[None, :] < nd[:, None]
        ts = np.where(live, t, 0)
        q_x = np.where(live, np.take_along_axis(draft_probs, ts[..., None], -1)[..., 0], 0)
        p_x = np.where(live, np.take_along_axis(target_probs[:, :K], ts[..., None], -1)[..., 0], 0)
        u = rng.random((B, K)) if uniforms is None else np.asarray(uniforms, dtype=np.float64)
        if bug == "shared_uniform":
            u = np.repeat(u[:, :1], K, axis=1)
        ok = live & (q_x > 0) & ((u * q_x <= p_x) if bug == "loose_accept" else (u * q_x < p_x))
        if bug == "always_accept":
            ok = live.copy()
        n = np.cumprod(ok, axis=1).sum(1)
        bonus = n == nd
        row = n
        if bug == "bonus_wrong_row":
            row = np.where(bonus, np.maximum(n - 1, 0), n)
        p_end = target_probs[b, row].astype(np.float64)
        q_end = np.where(bonus[:, None], 0.0, draft_probs[b, np.minimum(n, K - 1)]) if K else 0 * p_end
        if bug == "residual_is_p":
            res = p_end
        elif bug == "residual_drafted_only":
            x = ts[b, np.minimum(n, K - 1)] if K else np.zeros(B, int)
            res = p_end.copy()
            res[b, x] = np.maximum(p_end[b, x] - q_end[b, x], 0)
        else:
            res = np.maximum(p_end - q_end, 0)
        last = sample_rows(res, rng.random(B))
        tokens = np.where(np.arange(K)[None, :] < n[:, None], t, -1)
        tokens = np.concatenate([tokens, np.full((B, 1), -1)], 1).astype(np.int64)
        tokens[b, n] = last
        return VerifyResult(n.astype(np.int64), tokens)
    return fn
