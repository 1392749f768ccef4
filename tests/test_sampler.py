"""verify() and verify_greedy(): calibrated statistical tests, each with planted-bug controls."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lkref
from lkref.sampler import sample_rows, verify, verify_greedy
from lkref.testing import check_sampler

from .planted import BUGS, planted_verify


def draw(rng, q):
    """One draft token per row of q [..., V] (the test's own sampler, inverse CDF)."""
    cdf = np.cumsum(q, -1)
    u = rng.random(q.shape[:-1])
    return np.minimum((u[..., None] >= cdf).sum(-1), q.shape[-1] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------
# the calibrated suite, on lkref and on the planted bugs


@pytest.mark.parametrize("seed, K, V", [(0, 4, 6), (1, 3, 9), (2, 6, 5), (3, 1, 3)])
def test_verify_passes_the_statistical_suite(seed, K, V):
    report = check_sampler(verify, seed=seed, K=K, V=V)
    assert report.passed, str(report)


def test_the_control_sampler_without_a_bug_passes():
    report = check_sampler(planted_verify(None))
    assert report.passed, str(report)


# Which properties each planted bug must break (the default problem, K = 4); "acceptance[*]"
# means at least one position's acceptance check.  A shared uniform keeps every marginal
# acceptance rate right and only correlates the positions, so it shows at j >= 1 only.
EXPECTED_FAILURES = {
    "always_accept": {"acceptance[0]", "accepted-count", "marginal[0]"},
    "residual_is_p": {"marginal[0]"},
    "shared_uniform": {"acceptance[*]", "accepted-count"},
    "bonus_wrong_row": {"marginal[4]"},
    "residual_drafted_only": {"marginal[0]"},
    "loose_accept": {"p = 0 draft at u = 0"},          # u <= p/q: no sample of this size sees it
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_is_caught(bug):
    report = check_sampler(planted_verify(bug))
    failed = set(report.failed())
    assert not report.passed
    for name in EXPECTED_FAILURES[bug]:
        if name.endswith("[*]"):
            assert any(f.startswith(name[:-3] + "[") for f in failed), f"{bug}: no {name} failed\n{report}"
        else:
            assert name in failed, f"{bug} was not caught by {name}:\n{report}"
    assert "acceptance[0]" not in failed or bug == "always_accept"   # position 0 sees no correlation
    if bug == "loose_accept":
        assert failed == {"p = 0 draft at u = 0"}, str(report)


def _malformed(how):
    """lkref.verify with its result spoiled in one way the structure check must name."""
    def verify_fn(draft_tokens, draft_probs, target_probs, *, rng):
        r = verify(draft_tokens, draft_probs, target_probs, rng=rng)
        n, tok = np.array(r.num_accepted), np.array(r.tokens)
        rows = np.arange(len(n))
        if how == "shapes":
            tok = tok[:, :-1]
        elif how == "count":
            n[0] = tok.shape[1]                            # K + 1 accepted of K drafts
        elif how == "padding":
            tok[tok == -1] = 0
        elif how == "ids":
            tok[rows, n] = draft_probs.shape[-1]           # the emitted token is V
        elif how == "echo":
            first = np.nonzero(n > 0)[0][0]
            tok[first, 0] = (draft_tokens[first, 0] + 1) % draft_probs.shape[-1]
        return SimpleNamespace(num_accepted=n, tokens=tok)
    return verify_fn


@pytest.mark.parametrize("how, detail", [
    ("shapes", r"shapes \(200,\) and \(200, 4\), expected \(200,\) and \(200, 5\)"),
    ("count", r"num_accepted outside \[0, K\]"),
    ("padding", "tokens after the emitted ones are not -1"),
    ("ids", r"emitted token ids outside \[0, V\)"),
    ("echo", "accepted positions do not echo the drafts"),
])
def test_check_sampler_names_a_malformed_result(how, detail):
    """The structure check, each of its clauses against a sampler that breaks only it; the
    statistical checks do not run on a malformed result."""
    assert check_sampler(_malformed(None), trials=200).passed
    report = check_sampler(_malformed(how), trials=200)
    assert report.failed() == ["structure"], str(report)
    assert re.search(detail, report.checks[0].detail), report.checks[0].detail
    assert re.search(detail, str(report))


def test_bonus_bug_is_invisible_to_the_acceptance_checks():
    """The acceptance checks are about acceptance only: a wrong bonus row must pass them."""
    report = check_sampler(planted_verify("bonus_wrong_row"))
    assert set(report.failed()) == {"marginal[4]"}


# --------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_p_equal_to_q_always_accepts_even_with_zeros_and_tiny_values(xp, dtype):
    rng = np.random.default_rng(0)
    B, K = 2000, 5
    q = np.array([0.0, 1e-30, 1e-38, 0.25, 0.75 - 2e-30], dtype=dtype)
    q = np.broadcast_to(q / q.sum(dtype=np.float64).astype(dtype), (B, K, 5)).copy()
    tok = draw(rng, q.astype(np.float64))
    tok[:, 0] = 1                                   # the tiny-probability token, drafted on purpose
    tok[:, 1] = 2
    p = np.concatenate([q, q[:, :1]], axis=1)
    r = verify(xp.asarray(tok), xp.asarray(q), xp.asarray(p), rng=np.random.default_rng(1) if xp is np
               else xp.random.default_rng(1))
    assert np.all(lkref.backend.to_numpy(r.num_accepted) == K)


def test_disjoint_supports_never_accept():
    rng = np.random.default_rng(2)
    B, K, V = 5000, 3, 6
    q = np.zeros((B, K, V))
    q[..., :3] = 1 / 3
    p = np.zeros((B, K + 1, V))
    p[..., 3:] = [0.2, 0.3, 0.5]
    r = verify(draw(rng, q), q, p, rng=rng)
    assert np.all(r.num_accepted == 0)
    counts = np.bincount(r.tokens[:, 0], minlength=V)
    assert np.all(counts[:3] == 0)
    assert lkref.testing.goodness_of_fit("residual", counts, p[0, 0]).passed
    assert np.all(r.tokens[:, 1:] == -1)


def test_a_token_with_zero_target_probability_is_never_accepted_even_at_u_zero():
    q = np.array([[[0.5, 0.5]]])
    p = np.array([[[0.0, 1.0], [0.5, 0.5]]])
    r = verify(np.array([[0]]), q, p, rng=np.random.default_rng(0), uniforms=np.zeros((1, 1)))
    assert r.num_accepted[0] == 0 and r.tokens[0, 0] == 1


def test_a_draft_with_zero_draft_probability_is_never_accepted():
    q = np.array([[[1.0, 0.0]]])                    # inconsistent: token 1 could not have been drawn
    p = np.array([[[0.5, 0.5], [0.5, 0.5]]])
    r = verify(np.array([[1]]), q, p, rng=np.random.default_rng(0), uniforms=np.zeros((1, 1)))
    assert r.num_accepted[0] == 0
    assert r.tokens[0, 0] == 1                      # the residual max(p - q, 0) is all on token 1


def test_inconsistent_rows_fall_back_to_p_and_stay_in_range():
    q = np.array([[[0.5, 0.5, 0.0]]] * 200)
    p = np.array([[[0.1, 0.1, 0.0], [0.0, 0.3, 0.7]]] * 200)   # unnormalised: p < q, residual empty
    r = verify(np.zeros((200, 1), np.int64), q, p, rng=np.random.default_rng(0), validate=False)
    emitted = r.tokens[r.num_accepted == 0, 0]
    assert len(emitted) > 0 and set(emitted.tolist()) <= {0, 1}       # p[0] restricted to p > 0
    bonus = r.tokens[r.num_accepted == 1, 1]
    assert set(bonus.tolist()) <= {1, 2}


def test_k_zero_samples_the_bonus_from_p():
    rng = np.random.default_rng(3)
    p = np.array([0.1, 0.0, 0.6, 0.3])
    B = 20000
    r = verify(np.zeros((B, 0), np.int64), np.zeros((B, 0, 4)), np.broadcast_to(p, (B, 1, 4)), rng=rng)
    assert r.tokens.shape == (B, 1) and np.all(r.num_accepted == 0)
    assert lkref.testing.goodness_of_fit("bonus", np.bincount(r.tokens[:, 0], minlength=4), p).passed
    assert not lkref.testing.goodness_of_fit("control", np.bincount(r.tokens[:, 0], minlength=4),
                                             [0.25, 0.0, 0.45, 0.3]).passed


def test_long_drafts():
    K = 64
    report = check_sampler(verify, K=K, V=5, trials=20000, seed=4)
    assert report.checks[0].passed, str(report)
    rng = np.random.default_rng(5)
    q = np.broadcast_to(np.array([0.2, 0.3, 0.5]), (10, K, 3))
    p = np.broadcast_to(np.array([0.2, 0.3, 0.5]), (10, K + 1, 3))
    r = verify(draw(rng, q), q, p, rng=rng)
    assert np.all(r.num_accepted == K) and np.all(r.tokens >= 0)


def test_two_token_vocabulary_passes_the_suite():
    report = check_sampler(verify, V=3, K=3, seed=6)     # V = 3 with one token zeroed on each side
    assert report.passed, str(report)
    rng = np.random.default_rng(7)
    q = np.broadcast_to([0.3, 0.7], (50000, 2, 2))
    p = np.broadcast_to([0.6, 0.4], (50000, 3, 2))
    r = verify(draw(rng, q), q, p, rng=rng)
    assert lkref.testing.binomial_check("a", int((r.num_accepted > 0).sum()), 50000, 0.7).passed
    assert lkref.testing.goodness_of_fit("m", np.bincount(r.tokens[:, 0], minlength=2), [0.6, 0.4]).passed


def test_large_vocabulary():
    rng = np.random.default_rng(8)
    B, K, V = 64, 3, 50_000
    p = rng.dirichlet(np.full(V, 0.05), size=(B, K + 1))
    q = 0.5 * p[:, :K] + 0.5 * rng.dirichlet(np.full(V, 0.05), size=(B, K))
    r = verify(draw(rng, q), q, p, rng=rng)
    n = r.num_accepted
    for b in range(B):
        emitted = r.tokens[b, : n[b] + 1]
        assert np.all(p[b, np.arange(n[b] + 1), emitted] > 0)
        assert np.all(r.tokens[b, n[b] + 1:] == -1)


def test_ragged_rows_never_use_unused_positions():
    rng = np.random.default_rng(9)
    B, K, V = 3000, 4, 5
    p, q = lkref.testing.sampler_problem(0, K, V)
    nd = rng.integers(0, K + 1, size=B)
    tok = draw(rng, np.broadcast_to(q, (B, K, V)))
    qq = np.broadcast_to(q, (B, K, V)).copy()
    pp = np.broadcast_to(p, (B, K + 1, V)).copy()
    for b in range(B):
        tok[b, nd[b]:] = -1
        qq[b, nd[b]:] = np.nan
        pp[b, nd[b] + 1:] = np.nan
    r = verify(tok, qq, pp, rng=rng, num_draft=nd)
    assert np.all(r.num_accepted <= nd)
    for b in range(0, B, 97):
        assert np.all(r.tokens[b, r.num_accepted[b] + 1:] == -1)
    # a row whose drafts were all accepted takes its bonus from p[num_draft]: check the marginal
    full = r.num_accepted == nd
    for j in range(K + 1):
        sel = full & (nd == j)
        if sel.sum() > 50:
            counts = np.bincount(r.tokens[sel, j], minlength=V)
            assert lkref.testing.goodness_of_fit("bonus", counts, p[j]).passed


def test_one_hot_target_behaves_as_greedy():
    rng = np.random.default_rng(10)
    B, K, V = 500, 4, 7
    logits = rng.standard_normal((B, K + 1, V))
    p = np.eye(V)[logits.argmax(-1)]
    q = rng.dirichlet(np.ones(V), size=(B, K))
    tok = draw(rng, q)
    tok[:250] = logits[:250, :K].argmax(-1)             # half the rows draft the argmax
    a = verify(tok, q, p, rng=rng)
    g = verify_greedy(tok, p)
    np.testing.assert_array_equal(a.num_accepted, g.num_accepted)
    np.testing.assert_array_equal(a.tokens, g.tokens)
    assert np.all(g.num_accepted[:250] == K)


def test_greedy_stops_at_the_first_mismatch():
    p = np.zeros((1, 4, 3))
    p[0, [0, 1, 2, 3], [2, 1, 0, 1]] = 1
    r = verify_greedy(np.array([[2, 1, 1]]), p)
    assert r.num_accepted[0] == 2
    np.testing.assert_array_equal(r.tokens[0], [2, 1, 0, -1])
    r = verify_greedy(np.array([[2, 1, 0]]), p)
    np.testing.assert_array_equal(r.tokens[0], [2, 1, 0, 1])


def test_a_fixed_seed_gives_identical_output():
    p, q = lkref.testing.sampler_problem(1)
    rng = np.random.default_rng(0)
    tok = draw(rng, np.broadcast_to(q, (100, 4, 6)))
    args = (tok, np.broadcast_to(q, (100, 4, 6)), np.broadcast_to(p, (100, 5, 6)))
    a = verify(*args, rng=np.random.default_rng(42))
    b = verify(*args, rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_sample_rows_never_returns_a_zero_weight_index():
    w = np.array([[0.0, 1.0, 0.0, 2.0, 0.0]] * 4)
    u = np.array([0.0, 1 / 3, np.nextafter(1.0, 0), 0.5])
    np.testing.assert_array_equal(sample_rows(w, u), [1, 3, 3, 3])


@given(st.integers(0, 2**32 - 1), st.integers(0, 6), st.integers(2, 8), st.integers(1, 20))
def test_output_is_always_structurally_valid(seed, K, V, B):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, 0.3), size=(B, K + 1))
    p[p < 0.05] = 0
    p /= p.sum(-1, keepdims=True)
    q = rng.dirichlet(np.full(V, 0.3), size=(B, K))
    q[q < 0.05] = 0
    q /= q.sum(-1, keepdims=True)
    nd = rng.integers(0, K + 1, size=B)
    r = verify(draw(rng, q) if K else np.zeros((B, 0), np.int64), q, p, rng=rng, num_draft=nd)
    n, tok = r.num_accepted, r.tokens
    assert tok.shape == (B, K + 1) and tok.dtype == np.int64
    for b in range(B):
        assert 0 <= n[b] <= nd[b]
        emitted = tok[b, : n[b] + 1]
        assert np.all((emitted >= 0) & (emitted < V))
        assert np.all(p[b, np.arange(n[b] + 1), emitted] > 0)      # never a zero-probability token
        assert np.all(tok[b, n[b] + 1:] == -1)


# --------------------------------------------------------------------------------------
# bad input


P3 = np.full((2, 3, 4), 0.25)
Q2 = np.full((2, 2, 4), 0.25)
T2 = np.zeros((2, 2), np.int64)


@pytest.mark.parametrize("args, kw, err, match", [
    ((T2.astype(float), Q2, P3), {}, TypeError, "draft_tokens must be an integer"),
    ((T2[0], Q2, P3), {}, ValueError, "draft_tokens must have shape"),
    ((T2, Q2, P3[:, :2]), {}, ValueError, "target_probs must have shape"),
    ((T2, Q2[:, :, :3], P3), {}, ValueError, "draft_probs must have shape"),
    ((T2 + 4, Q2, P3), {}, ValueError, "draft_tokens has ids outside"),
    ((T2 - 1, Q2, P3), {}, ValueError, "draft_tokens has ids outside"),
    ((T2, -Q2, P3), {}, ValueError, "draft_probs has negative"),
    ((T2, Q2, P3 * np.nan), {}, ValueError, "target_probs has negative or non-finite"),
    ((T2, Q2, P3 * 0), {}, ValueError, "target_probs has an all-zero row"),
    ((T2, Q2, P3), {"num_draft": np.array([3, 0])}, ValueError, "num_draft must lie in"),
    ((T2, Q2, P3), {"num_draft": np.array([1])}, ValueError, "num_draft must have shape"),
    ((T2, Q2, P3), {"uniforms": np.ones((2, 2))}, ValueError, "uniforms must lie in"),
    ((T2, Q2, P3), {"uniforms": np.full((2, 3), 0.5)}, ValueError, r"uniforms must have shape \[B, K\] = \[2, 2\]"),
    ((T2, Q2[..., :0], P3[..., :0]), {}, ValueError, "target_probs has an empty vocabulary"),
    ((T2, Q2, P3), {"rng": 0}, TypeError, "rng must be a numpy.random.Generator"),
    ((T2, Q2, None), {}, TypeError, "target_probs must be an array, got None"),   # an UnboundLocalError before
])
def test_verify_bad_input(args, kw, err, match):
    kw = {"rng": np.random.default_rng(0), **kw}
    with pytest.raises(err, match=match):
        verify(*args, **kw)


def _spoiled(a, b, j, v, value=np.nan):
    a = a.copy()
    a[b, j, v] = value
    return a


def test_verify_checks_every_entry_it_reads_and_no_other():
    """verify reads each draft's q(x) and p(x) and the rows a round samples from (p where it
    ends, and q there after a rejection): each of those is checked wherever it lies (a bad q(x)
    rejects its draft, so q's row there is checked), and an entry it never reads (another token
    of a position it accepts) cannot change the result, so it is left alone; that keeps the
    checks O(B K + B V) (a scan of every row was O(B K V))."""
    rng = np.random.default_rng(3)
    B, K, V = 3, 2, 5
    q = rng.dirichlet(np.ones(V), (B, K))
    p = rng.dirichlet(np.ones(V), (B, K + 1))
    t = np.array([[0, 1], [2, 3], [4, 0]])
    p[0, 0, 0] = 0                                    # row 0 rejects its first draft (p(x) = 0) ...
    p[0, 0] /= p[0, 0].sum()
    u = np.zeros((B, K))                              # ... and rows 1, 2 accept both (u q < p)

    def run(q, p, **kw):
        return verify(t, q, p, rng=np.random.default_rng(1), uniforms=u, **kw)

    want = run(q, p)
    np.testing.assert_array_equal(want.num_accepted, [0, 2, 2])
    unread = run(_spoiled(q, 1, 1, 0), _spoiled(_spoiled(p, 1, 0, 4), 0, 1, 2))   # refused until 2026-12-06
    np.testing.assert_array_equal(unread.tokens, want.tokens)
    for qq, pp, message in [
        (_spoiled(q, 1, 1, 3), p, "draft_probs has negative or non-finite probabilities at position 1"),   # q(x)
        (q, _spoiled(p, 2, 0, 4), "target_probs has negative or non-finite probabilities at position 0"),  # p(x)
        (q, _spoiled(p, 2, 0, 4, np.inf), "target_probs has negative or non-finite probabilities at position 0"),
        (q, _spoiled(p, 1, 2, 0, -1.0), "target_probs has negative or non-finite probabilities at position 2"),  # bonus row
        (q, _spoiled(p, 0, 0, 3, np.inf), "target_probs has negative or non-finite probabilities at position 0"),  # residual's p
        (_spoiled(q, 0, 0, 4, -0.5), p, "draft_probs has negative or non-finite probabilities at position 0"),  # residual's q
        (q, np.where(np.arange(K + 1)[None, :, None] == 2, 0.0, p), "target_probs has an all-zero row at position 2"),
        (np.where(np.arange(B)[:, None, None] == 0, 0.0, q), p, "draft_probs has an all-zero row at position 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(qq, pp)
        run(qq, pp, validate=False)                   # unchecked: it runs (on what it was given)


def test_verify_refuses_rows_it_samples_from_that_do_not_sum_to_one():
    """A top-k cut of the target left unrenormalised: p(x) is too small, so drafts are accepted
    too rarely, and the first emitted token follows neither the cut target nor the full one
    (with the checks off, below: the chi-square test fails on it and passes on the same cut,
    renormalised).  Every round samples from a p row, so verify checks the sums of the rows
    it samples from (O(B V)); such a target never got through unchecked before 2026-12-06."""
    rng = np.random.default_rng(5)
    B, V = 20_000, 6
    full = np.array([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])
    cut = np.where(np.arange(V) < 3, full, 0.0)          # top-3, sums to 0.75
    q = np.broadcast_to(np.array([0.1, 0.2, 0.3, 0.2, 0.1, 0.1]), (B, 1, V))
    t = draw(rng, q)

    def first_tokens(p, **kw):
        r = verify(t, q, np.broadcast_to(p, (B, 2, V)), rng=np.random.default_rng(6), **kw)
        return np.bincount(r.tokens[:, 0], minlength=V)

    with pytest.raises(ValueError, match=r"target_probs rows must sum to 1 \(within 0\.001 for float64\); "
                                         r"the row at position 0 of a used row is off by 0\.25"):
        first_tokens(cut)
    assert not lkref.testing.goodness_of_fit("unrenormalised", first_tokens(cut, validate=False), cut).passed
    assert lkref.testing.goodness_of_fit("renormalised", first_tokens(cut / cut.sum()), cut).passed
    # the draft's rows, where a draft is rejected (its q is what the residual takes away)
    with pytest.raises(ValueError, match="draft_probs rows must sum to 1 .* position 0 of a used row is off by 0.5"):
        verify(t, q * 0.5, np.broadcast_to(full, (B, 2, V)), rng=np.random.default_rng(6))
    # a float32 softmax row, whose sum rounding moves, is a distribution
    z = np.random.default_rng(7).standard_normal((4, 3, 32_000)).astype(np.float32)
    e = np.exp(z - z.max(-1, keepdims=True))
    p32 = e / e.sum(-1, keepdims=True)
    verify(np.zeros((4, 2), np.int64), p32[:, :2], p32, rng=np.random.default_rng(8))


def _nan_at(j):
    p = P3.copy()
    p[1, j, 2] = np.nan
    return p


@pytest.mark.parametrize("args, kw, err, match", [
    ((T2, None), {}, TypeError, "target_probs must be an array, got None"),       # an UnboundLocalError before
    ((T2, _nan_at(1)), {}, ValueError, "target_probs has negative or non-finite probabilities at position 1"),
    ((T2, _nan_at(2)), {}, ValueError, "at position 2"),       # the bonus position: argmax would pick the NaN
    ((T2, -P3), {}, ValueError, "target_probs has negative"),
    ((T2, P3 * 0), {}, ValueError, "target_probs has an all-zero row"),
    ((T2, P3.astype(np.int64)), {}, TypeError, "target_probs must be a floating-point"),
    ((T2 + 4, P3), {}, ValueError, "draft_tokens has ids outside"),
])
def test_verify_greedy_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        verify_greedy(*args, **kw)


def test_verify_greedy_reads_only_the_rows_it_uses():
    """A NaN past a row's num_draft + 1 positions is never read; validate=False skips the scan."""
    p = _nan_at(2)
    p[1, :2] = np.eye(4)[[0, 3]]                          # row 1: accept draft 0 (token 0), emit 3
    r = verify_greedy(T2, p, num_draft=np.array([2, 1]))
    np.testing.assert_array_equal(r.num_accepted, [2, 1])
    np.testing.assert_array_equal(r.tokens, [[0, 0, 0], [0, 3, -1]])
    with pytest.raises(ValueError, match="at position 2"):
        verify_greedy(T2, p)
    assert verify_greedy(T2, p, validate=False).tokens.shape == (2, 3)


@pytest.mark.parametrize("fn, kw, err, match", [
    ("verify", {"trials": 0}, ValueError, "trials must be an int >= 1"),
    ("verify", {"K": 0}, ValueError, "K must be an int >= 1"),
    ("verify", {"V": 1}, ValueError, "V must be an int >= 2"),
    ("verify", {"seed": -1}, ValueError, "seed must be an int >= 0"),
    ("lkref.verify", {}, TypeError, "verify_fn must be a function with lkref.verify's signature, got str"),
    (lambda t, q, p, rng: (t, q), {}, TypeError, "verify_fn must return an object with .num_accepted and .tokens"),
])
def test_check_sampler_checks_its_arguments(fn, kw, err, match):
    with pytest.raises(err, match=match):
        check_sampler(verify if fn == "verify" else fn, **kw)
