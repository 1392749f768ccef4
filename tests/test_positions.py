"""Several draft positions combined with weights gamma^(k-1), one lambda per position."""

from __future__ import annotations

import numpy as np
import pytest

import lkref

from .strategies import make_logits, make_probs


def _problem(K=3, N=5, V=6, seed=0):
    rng = np.random.default_rng(seed)
    zs = [make_logits(rng, (N, V)) for _ in range(K)]
    ps = [make_probs(rng, (N, V)) for _ in range(K)]
    return zs, ps


@pytest.mark.parametrize("name", sorted(lkref.LOSSES))
def test_weights_and_gradients(name):
    zs, ps = _problem()
    r = lkref.multi_position(name, zs, ps, gamma=0.5, temperature=0.9)
    fn = lkref.LOSSES[name]
    singles = [fn(z, p, temperature=0.9) for z, p in zip(zs, ps)]
    assert r.weights == [1.0, 0.5, 0.25]
    np.testing.assert_allclose(r.loss, sum(w * s.loss for w, s in zip(r.weights, singles)), rtol=1e-12)
    for g, w, s in zip(r.grads, r.weights, singles):
        np.testing.assert_allclose(g, w * s.grad, rtol=1e-12)


def test_one_lambda_per_position():
    zs, ps = _problem(seed=1)
    ps[2] = np.exp(zs[2]) / np.exp(zs[2]).sum(-1, keepdims=True)   # position 3 already matches: alpha = 1
    r = lkref.multi_position(lkref.lk_lambda, zs, ps)
    lams = [float(x.lam) for x in r.positions]
    for x in r.positions:
        np.testing.assert_allclose(x.lam, np.exp(-3.0 * x.alpha.mean()), rtol=1e-12)
    assert lams[2] == pytest.approx(np.exp(-3.0))
    assert len(set(lams)) == 3


def test_default_gamma_and_masks_per_position():
    zs, ps = _problem(K=2, N=4)
    masks = [np.array([1, 1, 1, 0], bool), np.array([1, 1, 0, 0], bool)]
    r = lkref.multi_position("lk_alpha", zs, ps, mask=masks)
    assert r.weights == [1.0, 0.8]
    assert np.all(r.grads[1][2:] == 0) and np.all(r.grads[0][3] == 0)


@pytest.mark.parametrize("args, kw, err, match", [
    (("nope", [Z := np.zeros((1, 2))], [np.full((1, 2), 0.5)]), {}, ValueError, "loss must be one of"),
    ((np.zeros(2), [Z], [np.full((1, 2), 0.5)]), {}, ValueError, "loss must be one of"),   # numpy's own error before
    ((None, [Z], [np.full((1, 2), 0.5)]), {}, ValueError, "loss must be one of"),
    (("kl", [], []), {}, ValueError, "at least one position"),
    (("kl", [np.zeros((1, 2))], []), {}, ValueError, "target_probs must have one entry per position"),
    (("kl", np.zeros((1, 1, 2)), [np.full((1, 2), 0.5)]), {}, TypeError, "sequences"),
    (("kl", [np.zeros((1, 2))], [np.full((1, 2), 0.5)]), {"gamma": -1.0}, ValueError, "gamma must be >= 0"),
    (("kl", [np.zeros((1, 2))], [np.full((1, 2), 0.5)]), {"mask": [None, None]}, ValueError, "mask must have one entry"),
    # a bad input names its position, not only its argument
    (("tv", [Z, Z], [np.full((1, 2), 0.5), np.full((1, 2), 0.7)]), {}, ValueError,
     r"^position index 1: target_probs rows must sum to 1"),
    (("tv", [Z, Z[:, :1]], [np.full((1, 2), 0.5)] * 2), {}, ValueError, r"^position index 1: target_probs must have shape \(1, 1\)"),
    (("tv", [Z, Z.astype(int)], [np.full((1, 2), 0.5)] * 2), {}, TypeError, r"^position index 1: draft_logits must be a floating"),
])
def test_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        lkref.multi_position(*args, **kw)
