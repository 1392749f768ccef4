"""generate(): the whole loop keeps the target's joint distribution, with negative controls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import lkref.decoding as gen
from lkref.decoding import MarkovChain, generate, warp
from lkref.testing import goodness_of_fit

from .planted import planted_verify

V = 3


def chains(seed=0):
    rng = np.random.default_rng(seed)
    target = rng.dirichlet(np.ones(V), size=V)
    target[0, 2] = 0.0                              # a transition the target never makes
    target /= target.sum(-1, keepdims=True)
    draft = 0.5 * target + 0.5 * rng.dirichlet(np.ones(V), size=V)
    return target, draft


def joint(transition, first, length):
    """P(x_1..x_length | x_0 = first) of a Markov chain, over all V^length sequences."""
    cells = list(itertools.product(range(V), repeat=length))
    probs = []
    for seq in cells:
        prev, pr = first, 1.0
        for x in seq:
            pr *= transition[prev, x]
            prev = x
        probs.append(pr)
    return cells, np.array(probs)


def joint_counts(tokens, length):
    idx = np.zeros(len(tokens), dtype=np.int64)
    for j in range(length):
        idx = idx * V + tokens[:, j]
    return np.bincount(idx, minlength=V ** length)


def run(target, draft, k, B=40_000, length=3, seed=1, **kw):
    prompt = np.zeros((B, 1), dtype=np.int64)
    return generate(MarkovChain(target), MarkovChain(draft) if draft is not None else None, prompt,
                    max_new_tokens=length, k=k, rng=np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_speculative_output_has_the_targets_joint_distribution(k):
    target, draft = chains()
    r = run(target, draft, k)
    _, probs = joint(target, 0, 3)
    check = goodness_of_fit("joint", joint_counts(r.tokens, 3), probs)
    assert check.passed, check.detail
    assert r.tokens.shape == (40_000, 3)


def test_negative_control_a_planted_sampler_bug_breaks_the_joint(monkeypatch):
    target, draft = chains()
    monkeypatch.setattr(gen, "verify", planted_verify("residual_is_p"))
    r = run(target, draft, 2)
    _, probs = joint(target, 0, 3)
    assert not goodness_of_fit("joint", joint_counts(r.tokens, 3), probs).passed


def test_negative_control_a_q_that_is_not_the_drafts_distribution_breaks_the_joint(monkeypatch):
    """The transformers bug: verify() told a q other than the one the drafts came from."""
    target, draft = chains()
    real = gen.verify

    def lying(tokens, q, p, **kw):
        return real(tokens, np.full_like(q, 1 / V), p, **kw)
    monkeypatch.setattr(gen, "verify", lying)
    r = run(target, draft, 2)
    _, probs = joint(target, 0, 3)
    assert not goodness_of_fit("joint", joint_counts(r.tokens, 3), probs).passed


def test_temperature_and_top_k_apply_to_target_and_draft_alike():
    target, draft = chains(2)
    r = run(target, draft, 2, temperature=0.7, top_k=2)
    warped = warp(target, 0.7, top_k=2)
    _, probs = joint(warped, 0, 3)
    check = goodness_of_fit("joint", joint_counts(r.tokens, 3), probs)
    assert check.passed, check.detail
    _, plain = joint(target, 0, 3)              # the control: the unwarped target does not fit
    assert not goodness_of_fit("joint", joint_counts(r.tokens, 3), plain).passed


def test_plain_autoregressive_sampling_through_the_same_interface():
    target, _ = chains()
    r = run(target, None, 0)
    _, probs = joint(target, 0, 3)
    assert goodness_of_fit("joint", joint_counts(r.tokens, 3), probs).passed
    assert r.target_calls == 3 and r.tau == 1.0


def test_per_position_acceptance_of_a_context_free_draft():
    """With rows of the chain that ignore the context, alpha_j is a constant we can test."""
    rng = np.random.default_rng(4)
    pt, pd = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    target, draft = np.tile(pt, (V, 1)), np.tile(pd, (V, 1))
    alpha = np.minimum(pt, pd).sum()
    k = 3
    r = run(target, draft, k, B=20_000, length=k + 1)   # one round per row: num_draft = k
    from lkref.testing import binomial_check
    for j in range(k):
        c = binomial_check(f"a{j}", int(r.accepted_at[j]), int(r.reached[j]), alpha)
        assert c.passed, c.detail
    np.testing.assert_allclose(r.position_accept_rate, r.accepted_at / r.reached)


def test_greedy_follows_the_target_argmax():
    target, draft = chains()
    r = run(target, draft, 3, B=4, length=6, temperature=0)
    x, expected = 0, []
    for _ in range(6):
        x = int(np.argmax(target[x]))
        expected.append(x)
    assert np.all(r.tokens == expected)


def test_statistics_add_up():
    target, draft = chains()
    r = run(target, draft, 3, B=500, length=10)
    acc = r.accepted
    assert acc.shape == (r.target_calls, 500)
    emitted = np.where(acc >= 0, acc + 1, 0).sum(0)
    assert np.all(emitted == 10)                    # no row overshoots max_new_tokens
    assert r.tau == pytest.approx(emitted.sum() / (acc >= 0).sum())


def test_fixed_seed_is_reproducible():
    target, draft = chains()
    a, b = run(target, draft, 2, B=50, seed=7), run(target, draft, 2, B=50, seed=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_warp_top_p_keeps_the_smallest_prefix_reaching_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(warp(p, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    np.testing.assert_allclose(warp(p, top_p=0.1), [1, 0, 0, 0])
    np.testing.assert_allclose(warp(p, temperature=0.5), p ** 2 / (p ** 2).sum())


@pytest.mark.parametrize("kw, err, match", [
    ({"prompt": np.zeros((2, 1))}, TypeError, "prompt must be an integer"),
    ({"prompt": np.zeros((2, 0), np.int64)}, ValueError, "prompt must have shape"),
    ({"k": -1}, ValueError, "k must be a non-negative int"),
    ({"max_new_tokens": 1.5}, ValueError, "max_new_tokens must be a non-negative int"),
    ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
    ({"top_k": 0}, ValueError, "top_k must be a positive int"),
    ({"top_p": 1.5}, ValueError, "top_p must be <= 1"),
    ({"draft": None}, ValueError, "draft must be a model when k > 0"),
])
def test_bad_input(kw, err, match):
    target, draft = chains()
    args = dict(prompt=np.zeros((2, 1), np.int64), max_new_tokens=2, k=2, rng=np.random.default_rng(0))
    args.update(kw)
    d = args.pop("draft") if "draft" in args else MarkovChain(draft)
    with pytest.raises(err, match=match):
        generate(MarkovChain(target), d, args.pop("prompt"), **args)


class Returns:
    """A model whose next_token_probs gives what make(tokens) builds (to plant bad outputs)."""

    def __init__(self, make):
        self.make = make

    def next_token_probs(self, tokens):
        return self.make(tokens)


def uniform(tokens, V=V):
    return np.full(tokens.shape + (V,), 1 / V)


@pytest.mark.parametrize("which", ["target", "draft"])
@pytest.mark.parametrize("make, err, match", [
    (lambda t: uniform(t)[:, :1], ValueError,
     r"next_token_probs returned shape \(2, 1, 3\) for tokens of shape \(2, \d\); it must be \[2, \d, V\]"),
    (lambda t: uniform(t)[..., 0], ValueError, r"next_token_probs returned shape"),
    (lambda t: np.where(uniform(t) > 0, np.nan, 0), ValueError, "negative or non-finite probabilities"),
    (lambda t: uniform(t) - 0.5, ValueError, "negative or non-finite probabilities"),
    (lambda t: uniform(t) * 0, ValueError, "an all-zero row"),
    (lambda t: uniform(t).astype(np.int64), TypeError, "next_token_probs returned integers"),
    (lambda t: uniform(t, V=4), ValueError, "the draft and the target disagree on the vocabulary: 3 and 4|4 and 3"),
])
def test_bad_model_output_is_named(which, make, err, match):
    """A model's output is checked where generate() uses it: shape, values, and one vocabulary."""
    target, draft = chains()
    models = {"target": MarkovChain(target), "draft": MarkovChain(draft)}
    models[which] = Returns(make)
    with pytest.raises(err, match=match) as exc:
        generate(models["target"], models["draft"], np.zeros((2, 1), np.int64), max_new_tokens=3, k=1,
                 rng=np.random.default_rng(0))
    if "disagree" not in match:
        assert str(exc.value).startswith(f"{which}.next_token_probs")


def test_unnormalised_model_rows_are_weights():
    """Rows are renormalised (warp) before sampling, so a model may return unnormalised weights."""
    target, draft = chains()
    scaled = Returns(lambda t: 3.0 * target[t])
    a = generate(MarkovChain(target), MarkovChain(draft), np.zeros((5, 1), np.int64), max_new_tokens=4, k=2,
                 rng=np.random.default_rng(3))
    b = generate(scaled, MarkovChain(draft), np.zeros((5, 1), np.int64), max_new_tokens=4, k=2,
                 rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_a_one_dimensional_prompt_is_one_row():
    """A prompt [L0] runs as [1, L0]: the same tokens from the same seed."""
    target, draft = chains()
    kw = dict(max_new_tokens=5, k=2)
    a = generate(MarkovChain(target), MarkovChain(draft), np.array([2, 1]), rng=np.random.default_rng(4), **kw)
    b = generate(MarkovChain(target), MarkovChain(draft), np.array([[2, 1]]), rng=np.random.default_rng(4), **kw)
    assert a.tokens.shape == (1, 5)                     # [B, max_new_tokens], B = 1
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_k_beyond_a_multi_head_drafts_heads_is_refused():
    from lkref.toy.lm import HeadsDraft, TargetLM
    target, draft = TargetLM(vocab=6, hidden=8, seed=1), HeadsDraft(vocab=6, heads=2, hidden=8, seed=2)
    generate(target, draft, np.zeros((2, 1), np.int64), max_new_tokens=3, k=2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"k = 3 is more drafts than the draft has heads \(2\)"):
        generate(target, draft, np.zeros((2, 1), np.int64), max_new_tokens=3, k=3, rng=np.random.default_rng(0))


@pytest.mark.parametrize("models, rng, err, match", [
    ((None, "chain"), "ok", TypeError, r"target must be a model: an object with next_token_probs\(tokens\)"),
    (("chain", object()), "ok", TypeError, r"draft must be a model: an object with next_token_probs\(tokens\) "
                                           r"or head_probs\(tokens\)"),
    (("chain", "chain"), None, TypeError, "rng must be a numpy.random.Generator"),
    (("chain", "chain"), 0, TypeError, "rng must be a numpy.random.Generator"),
])
def test_models_and_rng_are_checked_before_any_call(models, rng, err, match):
    target, draft = chains()
    t, d = (MarkovChain(target) if m == "chain" else m for m in models)
    with pytest.raises(err, match=match):
        generate(t, d, np.zeros((2, 1), np.int64), max_new_tokens=2, k=1,
                 rng=np.random.default_rng(0) if rng == "ok" else rng)


def test_greedy_needs_no_rng():
    target, draft = chains()
    r = generate(MarkovChain(target), MarkovChain(draft), np.zeros((2, 1), np.int64), max_new_tokens=3, k=2,
                 rng=None, temperature=0)
    assert r.tokens.shape == (2, 3)


def test_prompt_ids_outside_the_vocabulary():
    target, draft = chains()
    with pytest.raises(ValueError, match="prompt has token ids below 0"):
        generate(MarkovChain(target), MarkovChain(draft), np.full((2, 1), -1), max_new_tokens=2, k=1,
                 rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"prompt has token ids outside \[0, 3\)"):    # known from vocab_size
        generate(MarkovChain(target), MarkovChain(draft), np.full((2, 1), 3), max_new_tokens=2, k=1,
                 rng=np.random.default_rng(0))
    wide = Returns(lambda t: np.full(t.shape + (3,), 1 / 3))                          # no vocab_size: after its call
    with pytest.raises(ValueError, match=r"prompt has token ids outside \[0, 3\)"):
        generate(wide, None, np.full((2, 1), 7), max_new_tokens=2, k=0, rng=np.random.default_rng(0))


@pytest.mark.parametrize("kw, err, match", [
    ({"temperature": -1.0}, ValueError, "temperature must be > 0"),     # p^(1/T) would invert the ranking
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"top_k": 0}, ValueError, "top_k must be a positive int"),
    ({"top_k": 1.5}, ValueError, "top_k must be a positive int"),
    ({"top_p": 0.0}, ValueError, "top_p must be > 0"),
    ({"top_p": 2.0}, ValueError, "top_p must be <= 1"),
])
def test_warp_checks_its_options(kw, err, match):
    with pytest.raises(err, match=match):
        warp(np.full((2, 3), 1 / 3), **kw)


@pytest.mark.parametrize("probs, err, match", [
    (np.array([[0.2, 0.8], [0.0, 0.0]]), ValueError, "probs has a row with no mass"),   # NaN rows before
    (np.array([[0.2, np.nan]]), ValueError, "probs contains non-finite"),
    (np.array([[0.2, np.inf]]), ValueError, "probs contains non-finite"),
    (np.array([[1.2, -0.2]]), ValueError, "probs contains negative"),
    (np.array([[1, 3]]), TypeError, "probs must be a floating-point"),
    (np.array([[0.5, 0.5]], np.complex128), TypeError, "probs must be a floating-point"),
    (np.zeros((2, 0)), ValueError, r"probs has an empty vocabulary \(last axis has size 0\)"),
    (np.float64(1.0), ValueError, r"probs must have a vocabulary axis \(at least 1-d\), got a 0-d array"),
    (None, TypeError, "probs must be an array, got None"),                 # an AttributeError before
])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5, "top_p": 0.9}])
def test_warp_checks_its_probs(probs, err, match, kw):
    with pytest.raises(err, match=match):
        warp(probs, **kw)


def test_warp_takes_unnormalised_weights_and_leaves_them_alone():
    w = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    before = w.copy()
    np.testing.assert_allclose(warp(w), [[0.25, 0.75, 0.0], [0.25, 0.25, 0.5]], rtol=1e-15)
    np.testing.assert_allclose(warp(w.tolist(), top_k=1), [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(w, before)


@pytest.mark.parametrize("transition, err, match", [
    (np.array([[1.5, -0.5], [0.5, 0.5]]), ValueError, "transition contains negative"),
    (np.array([[0.5, 0.4], [0.5, 0.5]]), ValueError, "transition rows must sum to 1"),
    (np.eye(2, dtype=np.int64), TypeError, "transition must be a floating-point"),
    (np.full((2, 3), 1 / 3), ValueError, r"transition must be a square \[V, V\] matrix"),
])
def test_markov_chain_checks_its_transition(transition, err, match):
    with pytest.raises(err, match=match):
        MarkovChain(transition)
