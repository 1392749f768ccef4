"""Several draft positions: K heads (Medusa, MLP speculator) or K steps (EAGLE) at once.

The paper trains K draft positions and adds their losses with weights gamma^(k-1)
(gamma = 0.8), each position with its own lambda for LK^lambda.  Position k's loss is
one call of a reduced loss, so "one lambda per call" is "one lambda per position".

    L = sum_{k=1..K} gamma^(k-1) L_k          dL/dz_k = gamma^(k-1) dL_k/dz_k

The sum is not divided by sum_k gamma^(k-1), as in the paper and SpecForge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from . import losses as _losses
from .backend import dlpack_interop
from .validation import at_position, check_real_scalar

__all__ = ["MultiPositionResult", "multi_position", "LOSSES"]

#: The reduced losses by name, for the command line and multi_position(loss="...").
LOSSES = _losses.LOSSES_BY_NAME


@dataclass(frozen=True)
class MultiPositionResult:
    """loss: the weighted sum; grads: one gradient per position (weights applied);
    weights: gamma^(k-1); positions: each position's own LossResult (unweighted,
    with its own .alpha and, for LK^lambda, its own .lam)."""

    loss: Any
    grads: list
    weights: list
    positions: list


def _per_position(value, name, K):
    if value is None or not isinstance(value, (list, tuple)):
        return [value] * K
    if len(value) != K:
        raise ValueError(f"{name} must have one entry per position ({K}), got {len(value)}")
    return list(value)


@dlpack_interop
def multi_position(loss, draft_logits: Sequence, target_probs: Sequence, *, gamma=0.8,
                   mask=None, **options) -> MultiPositionResult:
    """Combine K draft positions with weights gamma^(k-1), one reduced-loss call per position.

    loss          a name from LOSSES ("kl", "tv", "lk_alpha", "lk_lambda") or one of those functions
    draft_logits  a sequence of K arrays, position k's draft logits (..., V)
    target_probs  a sequence of K arrays, position k's target probabilities
    mask          None, one mask for every position, or a sequence of K masks
    options       passed to every call (temperature, draft_to_target, eta, kl_scale)
    """
    fn = LOSSES.get(loss) if isinstance(loss, str) else loss
    if not any(fn is f for f in LOSSES.values()):   # `is`: an array's == would not give a bool
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or one of those functions, got {loss!r}")
    gamma = check_real_scalar(gamma, "gamma", low=0)
    if not isinstance(draft_logits, (list, tuple)) or not isinstance(target_probs, (list, tuple)):
        raise TypeError("draft_logits and target_probs must be sequences (list or tuple) of K arrays")
    K = len(draft_logits)
    if K == 0:
        raise ValueError("draft_logits must hold at least one position")
    if len(target_probs) != K:
        raise ValueError(f"target_probs must have one entry per position ({K}), got {len(target_probs)}")
    masks = _per_position(mask, "mask", K)
    results, grads, weights, total = [], [], [], 0
    for k in range(K):
        with at_position(k):
            r = fn(draft_logits[k], target_probs[k], mask=masks[k], **options)
        w = gamma ** k
        results.append(r)
        weights.append(w)
        grads.append((r.grad * w).astype(r.grad.dtype, copy=False))
        total = total + w * r.loss
    return MultiPositionResult(total, grads, weights, results)
