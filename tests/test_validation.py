"""Bad input raises a TypeError or ValueError that names the argument."""

from __future__ import annotations

import numpy as np
import pytest

import lkref
from lkref import testing, theory
from lkref.multistep import accept_length_forward

from .test_losses import PAIRS

REDUCED = [lkref.kl, lkref.tv, lkref.lk_alpha, lkref.lk_lambda]
Z = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])
P = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])


@pytest.mark.parametrize("fn", REDUCED)
@pytest.mark.parametrize("z, p, kw, err, match", [
    (Z, P[:, :2], {}, ValueError, "target_probs must have shape"),
    (Z, P[:1], {}, ValueError, "target_probs must have shape"),
    (Z, P, {"mask": np.ones(3)}, ValueError, "mask must have the leading shape"),
    (Z, P, {"mask": np.array([1.0, -1.0])}, ValueError, "mask contains negative"),
    (Z, P, {"mask": np.array([1.0, np.nan])}, ValueError, "mask contains non-finite"),
    (Z, P, {"mask": np.array(["a", "b"])}, TypeError, "mask must hold"),
    (Z, P, {"mask": np.array([1e308, 1e308])}, ValueError, "mask's weights sum to inf, more than float64"),
    (Z.astype(np.float32), P.astype(np.float32), {"mask": np.array([3e38, 3e38], np.float32)}, ValueError,
     "mask's weights sum to 6e.38, more than float32"),
    (Z.astype(np.float32), P.astype(np.float32), {"mask": np.array([3e38, 3e38])}, ValueError,
     "more than float32"),                                 # float64 weights, float32 work
    (Z.astype(np.float32), P.astype(np.float32), {"mask": np.array([1e-41, 0.0], np.float32)}, ValueError,
     "mask's weights sum to 1e-41, below the smallest normal float32"),   # 1 / sum overflows
    (Z, P, {"mask": np.array([1e-310, 0.0])}, ValueError, "below the smallest normal float64"),
    (np.where(Z > 0.5, np.nan, Z), P, {}, ValueError, "draft_logits contains non-finite"),
    (np.where(Z > 0.5, np.inf, Z), P, {}, ValueError, "draft_logits contains non-finite"),
    (np.ones((2, 3), dtype=np.int64), P, {}, TypeError, "draft_logits must be a floating-point"),
    (Z.astype(bool), P, {}, TypeError, "draft_logits must be a floating-point"),
    (np.zeros((2, 0)), np.zeros((2, 0)), {}, ValueError, "draft_logits has an empty vocabulary"),
    (np.float64(1.0), np.float64(1.0), {}, ValueError, "draft_logits must have a vocabulary axis"),
    (Z, P - 0.2, {}, ValueError, "target_probs contains negative"),
    (Z, P * 1.01, {}, ValueError, "target_probs rows must sum to 1"),
    (Z, np.where(P > 0.2, 1e308, P), {}, ValueError, "target_probs rows must sum to 1.*off by inf"),  # sum overflows
    (Z, np.where(P > 0.4, np.nan, P), {}, ValueError, "target_probs contains non-finite"),
    (Z, (P > 0.4).astype(np.int64), {}, TypeError, "target_probs must be a floating-point"),
    (Z, P, {"temperature": 0.0}, ValueError, "temperature must be > 0"),
    (Z, P, {"temperature": -1.0}, ValueError, "temperature must be > 0"),
    (Z, P, {"temperature": float("nan")}, ValueError, "temperature must be finite"),
    (Z, P, {"temperature": "1"}, TypeError, "temperature must be a real number"),
    (Z, P, {"draft_to_target": np.array([0, 1, 3])}, ValueError, r"draft_to_target has entries outside \[0, 3\)"),
    (Z, P, {"draft_to_target": np.array([0, -1, 2])}, ValueError, "draft_to_target has entries outside"),
    (Z, P, {"draft_to_target": np.array([0, 1, 1])}, ValueError, "draft_to_target has duplicate"),
    (Z, P, {"draft_to_target": np.array([0.0, 1.0, 2.0])}, TypeError, "draft_to_target must be an integer"),
    (Z, P, {"draft_to_target": np.array([0, 1])}, ValueError, r"draft_to_target must have shape \(3,\)"),
])
def test_bad_input_names_the_argument(fn, z, p, kw, err, match):
    z_before, p_before = np.array(z, copy=True), np.array(p, copy=True)
    with pytest.raises(err, match=match):
        fn(z, p, **kw)
    np.testing.assert_array_equal(z, z_before)
    np.testing.assert_array_equal(p, p_before)


def test_target_rows_within_the_stated_tolerance_are_accepted():
    ok = P * (1 + 0.9 * lkref.TARGET_SUM_ATOL)
    lkref.lk_alpha(Z, ok)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        lkref.lk_alpha(Z, P * (1 + 1.1 * lkref.TARGET_SUM_ATOL))


def test_target_sum_tolerance_follows_the_targets_rounding():
    """target_sum_atol = TARGET_SUM_ATOL + the dtype's unit roundoff: rounding the entries of a
    normalised row to bfloat16 (8-bit significands) moves its sum by up to 2^-8 of it, so a row
    whose largest entry is 0.748 (bfloat16's nearest: 0.746 or 0.75) is off by 1.9e-3, beyond
    TARGET_SUM_ATOL alone; such a target is accepted by every path, a row 1 % off is not."""
    assert lkref.target_sum_atol(np.float32) == lkref.TARGET_SUM_ATOL + 2.0 ** -24
    assert lkref.target_sum_atol(np.float16) == lkref.TARGET_SUM_ATOL + 2.0 ** -11
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    assert lkref.target_sum_atol(bf16) == lkref.TARGET_SUM_ATOL + 2.0 ** -8
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 1000)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * (1 - 0.748)
    p[:, 0] += 0.748
    p = p.astype(bf16)
    off = np.abs(p.astype(np.float64).sum(-1) - 1).max()
    assert lkref.TARGET_SUM_ATOL < off < lkref.target_sum_atol(bf16)   # what the widening is for
    z = rng.standard_normal((4, 1000)).astype(np.float32)
    for impl in ("reference", "fused"):
        lkref.lk_alpha(z, p, impl=impl)
        with pytest.raises(ValueError, match=r"rows must sum to 1 \(within 0.00491 for bfloat16\)"):
            lkref.lk_alpha(z, (p.astype(np.float32) * 1.01).astype(bf16), impl=impl)


def test_draft_to_target_with_leading_shape_mismatch():
    with pytest.raises(ValueError, match="target_probs must have the leading shape"):
        lkref.tv(Z, np.full((3, 4), 0.25), draft_to_target=np.array([0, 1, 2]))


@pytest.mark.parametrize("kw, err, match", [
    ({"eta": -1.0}, ValueError, "eta must be >= 0"),
    ({"eta": float("inf")}, ValueError, "eta must be finite"),
    ({"kl_scale": -0.5}, ValueError, "kl_scale must be >= 0"),
    ({"lam": -0.1}, ValueError, "lam must be >= 0"),
    ({"lam": "x"}, TypeError, "lam must be a real number"),
])
def test_lk_lambda_options(kw, err, match):
    with pytest.raises(err, match=match):
        lkref.lk_lambda(Z, P, **kw)


def test_non_array_inputs():
    with pytest.raises(TypeError, match="draft_logits must be an array"):
        lkref.kl(None, P)
    r = lkref.kl(Z.tolist(), P.tolist())       # nested lists are fine: they become NumPy arrays
    assert r.grad.shape == Z.shape


def test_pair_functions_check_shapes_and_temperature():
    with pytest.raises(ValueError, match="z and p must have the same shape"):
        lkref.tv_forward(Z, P[:, :2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lkref.lk_alpha_forward(Z, P, temperature=0)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("z, p, err, match", [
    (None, P, TypeError, "z must be an array, got None"),          # an AttributeError before
    (Z, None, TypeError, "p must be an array, got None"),
    (Z, "abc", TypeError, "p must be a floating-point array"),
    (Z.astype(np.complex128), P, TypeError, "z must be a floating-point array, got dtype complex128"),  # ran before
    (Z.astype(bool), P, TypeError, "z must be a floating-point array"),
    (np.ones((2, 3), np.int64), P, TypeError, "z must be a floating-point array"),
    (Z, P.astype(np.complex128), TypeError, "p must be a floating-point array"),
    (np.zeros((2, 0)), np.zeros((2, 0)), ValueError, r"z has an empty vocabulary \(last axis has size 0\)"),
    (np.float64(1.0), np.float64(1.0), ValueError, r"z must have a vocabulary axis \(at least 1-d\), got a 0-d array"),
    (np.where(Z > 0.5, np.nan, Z), P, ValueError, r"z contains non-finite values \(NaN or inf\)"),  # NaN losses before
    (np.where(Z > 0.5, -np.inf, Z), P, ValueError, "z contains non-finite"),
    (Z, np.where(P > 0.4, np.nan, P), ValueError, r"p contains non-finite values \(NaN or inf\)"),
    (Z, np.where(P > 0.4, np.inf, P), ValueError, "p contains non-finite values"),
    (Z, P - 0.2, ValueError, "p contains negative probabilities"),
])
def test_pair_functions_check_what_they_are_given(name, z, p, err, match):
    forward, _, extra = PAIRS[name]
    with pytest.raises(err, match=match):
        forward(z, p, **extra)


def test_lk_lambda_pair_names_p_kl():
    with pytest.raises(ValueError, match=r"z and p_kl must have the same shape"):
        lkref.lk_lambda_forward(Z, P, 0.5, p_kl=P[:, :2])
    with pytest.raises(TypeError, match="p_kl must be a floating-point array"):
        lkref.lk_lambda_forward(Z, P, 0.5, p_kl=(P > 0.2))
    with pytest.raises(ValueError, match="p_kl contains non-finite values"):
        lkref.lk_lambda_forward(Z, P, 0.5, p_kl=P * np.nan)
    with pytest.raises(TypeError, match="z must be an array"):       # before lam is looked at
        lkref.lk_lambda_forward(None, P, np.ones(2))
    losses, _ = lkref.lk_lambda_forward(Z.tolist(), P.tolist(), 0.5)  # nested lists become arrays
    np.testing.assert_array_equal(losses, lkref.lk_lambda_forward(Z, P, 0.5)[0])


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dlosses, err, match", [
    (np.ones(3), ValueError, r"dlosses must have the leading shape \(2,\) of the forward's logits"),
    (np.ones((2, 2)), ValueError, r"dlosses must have the leading shape \(2,\)"),   # broadcasts to a wrong shape
    (np.ones((2, 1)), ValueError, r"dlosses must have the leading shape \(2,\)"),
    (np.array([1.0, np.nan]), ValueError, "dlosses contains non-finite"),
    (np.array([1.0, np.inf]), ValueError, "dlosses contains non-finite"),
    (np.array([True, False]), TypeError, "dlosses must hold real numbers"),
    ("1", TypeError, "dlosses must"),
    (None, TypeError, "dlosses must be an array"),
])
def test_pair_backward_checks_the_upstream_gradient(name, dlosses, err, match):
    forward, backward, extra = PAIRS[name]
    _, cache = forward(Z, P, **extra)
    with pytest.raises(err, match=match):
        backward(dlosses, cache)


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_backward_takes_a_scalar_and_keeps_the_forward_dtype(name):
    forward, backward, extra = PAIRS[name]
    z, p = Z.astype(np.float32), P.astype(np.float32)
    _, cache = forward(z, p, **extra)
    want = backward(np.full(2, 2.0, np.float32), cache)
    for d in (2.0, np.float64(2.0), np.full(2, 2.0), [2.0, 2.0]):      # float64 upstream: float32 out
        got = backward(d, cache)
        assert got.dtype == np.float32 and got.shape == Z.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_backward_names_a_cache_of_another_loss(name):
    forward, backward, extra = PAIRS[name]
    other = "kl" if name != "kl" else "lk_alpha"
    _, cache = PAIRS[other][0](Z, P, **PAIRS[other][2])
    with pytest.raises(TypeError, match=f"cache must be what {name}_forward returned"):
        backward(np.ones(2), cache)


@pytest.mark.parametrize("lam, err, match", [
    (float("nan"), ValueError, "lam must be finite"),
    (-0.5, ValueError, "lam must be >= 0"),
    ("0.5", TypeError, "lam must be a real number"),
    (np.array([0.5, 0.5, 0.5]), ValueError, r"lam must be a scalar or have the leading shape \(2,\)"),
    (np.array([0.5, -0.1]), ValueError, "lam must be finite and >= 0"),
])
def test_lk_lambda_pair_checks_lam(lam, err, match):
    with pytest.raises(err, match=match):
        lkref.lk_lambda_forward(Z, P, lam)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("hook, err, match", [
    (lambda t, c: (t,), TypeError, r"reduce must return a pair \(total, count\), got a tuple of 1"),
    (lambda t, c: 3.0, TypeError, r"reduce must return a pair \(total, count\), got float"),
    (lambda t, c: (np.ones(2), c), ValueError, r"reduce returned a total of shape \(2,\)"),
    (lambda t, c: (t, "2"), TypeError, "reduce returned a count that is not a real number"),
    (5, TypeError, r"reduce must be a function \(total, count\) -> \(total, count\), got int"),
    # values: each passed on before (a NaN loss, or a loss that looks right with twice the gradient)
    (lambda t, c: (t * np.nan, c), ValueError, r"reduce returned a non-finite sum: total nan, count 2\.0, from finite"),
    (lambda t, c: (t, c * np.inf), ValueError, r"reduce returned a non-finite sum: total .*, count inf"),
    (lambda t, c: (t / 2, c / 2), ValueError, r"reduce returned a count of 1\.0, below this rank's own 2\.0: .* not AVG"),
    (lambda t, c: (t, -c), ValueError, r"reduce returned a count of -2\.0, below this rank's own 2\.0"),
])
def test_reduce_hook_results_are_checked(impl, hook, err, match):
    for fn in REDUCED:
        with pytest.raises(err, match=match):
            fn(Z, P, impl=impl, reduce=hook)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_reduce_hook_may_return_python_numbers(impl):
    """As in lkref.distributed's PyTorch example: floats from .item()."""
    for fn in REDUCED:
        want = fn(Z, P, impl=impl)
        got = fn(Z, P, impl=impl, reduce=lambda t, c: (float(t), float(c)))
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12)
        np.testing.assert_allclose(got.grad, want.grad, rtol=1e-12)


def test_reduce_hook_may_return_torch_tensors():
    torch = pytest.importorskip("torch")
    for fn in REDUCED:
        want = fn(Z, P)
        got = fn(Z, P, reduce=lambda t, c: (torch.tensor(float(t), dtype=torch.float64),
                                           torch.tensor(float(c), dtype=torch.float64)))
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-12)


@pytest.mark.parametrize("losses, weights, err, match", [
    (np.ones(4), np.ones((4, 4)), ValueError, r"weights must have the leading shape \(4,\)"),  # broadcast before
    (np.ones(4), -np.ones(4), ValueError, "weights contains negative"),                     # loss 0 before
    (np.ones(4), np.array([1.0, np.nan, 1.0, 1.0]), ValueError, "weights contains non-finite"),
    (np.ones(4, np.int64), None, TypeError, "losses must be a floating-point array"),
    (np.array([1.0, np.nan, 1.0, 1.0]), None, ValueError, "losses must not hold NaN"),          # a NaN mean before
    (np.array([1.0, np.nan, 1.0, 1.0]), np.array([1.0, 0.0, 1.0, 1.0]), ValueError, "losses must not hold NaN"),
])
def test_mean_pair_checks_its_inputs(losses, weights, err, match):
    with pytest.raises(err, match=match):
        lkref.mean_forward(losses, weights)


def test_mean_pair_takes_an_infinite_loss_of_weight_zero():
    # inf is a loss (KL, or -log 0): it makes the mean inf, and a weight of 0 drops it
    loss, _ = lkref.mean_forward(np.array([1.0, np.inf, 3.0]), np.array([1.0, 0.0, 1.0]))
    assert float(loss) == 2.0
    loss, _ = lkref.mean_forward(np.array([1.0, np.inf, 3.0]))
    assert float(loss) == np.inf


@pytest.mark.parametrize("dloss, err, match", [
    (np.ones(3), ValueError, r"dloss must be a scalar, got shape \(3,\)"),
    (float("nan"), ValueError, "dloss contains non-finite"),
    ("1", TypeError, "dloss must hold real numbers"),
])
def test_mean_backward_checks_dloss_and_cache(dloss, err, match):
    _, cache = lkref.mean_forward(np.ones(4), np.ones(4))
    with pytest.raises(err, match=match):
        lkref.mean_backward(dloss, cache)
    with pytest.raises(TypeError, match="cache must be what mean_forward returned"):
        lkref.mean_backward(1.0, {"q": 1})


@pytest.mark.parametrize("kw, err, match", [
    ({"mean_alpha": float("nan")}, ValueError, "mean_alpha must lie in"),      # NaN lambda before
    ({"mean_alpha": 2.0}, ValueError, "mean_alpha must lie in"),
    ({"mean_alpha": 0.5, "eta": -1.0}, ValueError, "eta must be >= 0"),         # lambda > kl_scale before
    ({"mean_alpha": 0.5, "kl_scale": float("inf")}, ValueError, "kl_scale must be finite"),
    ({"mean_alpha": "0.5"}, TypeError, "mean_alpha must hold real numbers"),
])
def test_lambda_from_alpha_checks_its_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        lkref.lambda_from_alpha(**kw)


def test_lambda_from_alpha_takes_lists_and_keeps_the_dtype():
    np.testing.assert_allclose(lkref.lambda_from_alpha([0.0, 0.5], eta=2.0), np.exp([0.0, -1.0]))
    assert lkref.lambda_from_alpha(np.float32(0.5)).dtype == np.float32


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_a_reduce_hook_whose_mean_alpha_is_above_one_is_caught_at_lambda(impl):
    """Finite sums, a count not below the rank's own: call_reduce passes them, lambda does not."""
    with pytest.raises(ValueError, match="mean_alpha must lie in"):
        lkref.lk_lambda(Z, P, impl=impl, reduce=lambda t, c: (t * 10, c))


# --------------------------------------------------------------------------------------
# every public function of arrays, every array argument: what is not an array of its kind is
# refused with a TypeError or ValueError that names the argument (each of these raised
# AttributeError, UnboundLocalError or NumPy's own messages, or ran on, before 2026-12-05)

_fz_rng = np.random.default_rng(0)
_Z = _fz_rng.standard_normal((3, 5))
_P = _fz_rng.dirichlet(np.ones(5), 3)
_T = _fz_rng.integers(0, 5, (2, 3))
_Q3, _P3 = _fz_rng.dirichlet(np.ones(5), (2, 3)), _fz_rng.dirichlet(np.ones(5), (2, 4))
_CHAIN = lkref.MarkovChain(_fz_rng.dirichlet(np.ones(5), 5))

#: (function, valid arguments, the array arguments to spoil); every call here is valid as it is
CALLS = [
    *[(fn, dict(draft_logits=_Z, target_probs=_P, mask=np.ones(3)), ("draft_logits", "target_probs", "mask"))
      for fn in (lkref.kl, lkref.tv, lkref.lk_alpha, lkref.lk_lambda)],
    *[(fn, dict(z=_Z, p=_P), ("z", "p")) for fn in (lkref.kl_forward, lkref.tv_forward, lkref.lk_alpha_forward)],
    (lkref.lk_lambda_forward, dict(z=_Z, p=_P, lam=0.5, p_kl=_P), ("z", "p", "lam", "p_kl")),
    (lkref.mean_forward, dict(losses=np.ones(3), weights=np.ones(3)), ("losses", "weights")),
    (lkref.verify, dict(draft_tokens=_T, draft_probs=_Q3, target_probs=_P3, rng=np.random.default_rng(1),
                        num_draft=np.array([1, 3]), uniforms=np.full((2, 3), 0.5)),
     ("draft_tokens", "draft_probs", "target_probs", "num_draft", "uniforms")),
    (lkref.verify_greedy, dict(draft_tokens=_T, target_probs=_P3, num_draft=np.array([1, 3])),
     ("draft_tokens", "target_probs", "num_draft")),
    (lkref.warp, dict(probs=_P), ("probs",)),
    (theory.acceptance_rate, dict(p=_P, q=_P[::-1].copy()), ("p", "q")),
    (theory.expected_accept_length, dict(alphas=np.array([0.5, 0.6])), ("alphas",)),
    (theory.accept_length_pmf, dict(alphas=np.array([0.5, 0.6])), ("alphas",)),
    (accept_length_forward, dict(alphas=np.full((3, 2), 0.5)), ("alphas",)),
    (lkref.MarkovChain, dict(transition=np.full((4, 4), 0.25)), ("transition",)),
    (lkref.generate, dict(target=_CHAIN, draft=_CHAIN, prompt=np.array([[0], [1]]), max_new_tokens=3, k=2,
                          rng=np.random.default_rng(2)), ("prompt",)),
    (testing.goodness_of_fit, dict(name="x", counts=np.array([3, 4]), probs=np.array([0.5, 0.5])), ("counts", "probs")),
]
SPOILS = {
    "None": None, "a string": "abc", "a ragged list": [[1, 2], [3]],
    "complex numbers": "complex", "objects": "object",
}
OPTIONAL = {"mask", "weights", "num_draft", "uniforms", "lam", "p_kl"}      # None means "not given"


def _spoil(value, how):
    if how == "complex":
        return np.asarray(value).astype(np.complex128)
    if how == "object":
        return np.asarray(value).astype(object)
    return how


def _cases():
    for fn, kwargs, args in CALLS:
        for arg in args:
            for label, how in SPOILS.items():
                if how is None and arg in OPTIONAL:
                    continue
                yield pytest.param(fn, kwargs, arg, how, id=f"{fn.__name__}-{arg}-{label}")


@pytest.mark.parametrize("fn, kwargs, arg, how", list(_cases()))
def test_every_array_argument_refuses_what_is_not_an_array_of_its_kind(fn, kwargs, arg, how):
    fn(**kwargs)                                    # the call is valid before it is spoiled
    bad = dict(kwargs, **{arg: _spoil(kwargs[arg], how)})
    with pytest.raises((TypeError, ValueError)) as info:
        fn(**bad)
    assert arg in str(info.value), f"{fn.__name__}: the error does not name {arg}: {info.value}"
