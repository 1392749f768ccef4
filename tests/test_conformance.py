"""The conformance kit: lkref and a correct independent port pass; each known mistake fails, named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import lkref
from lkref import conformance as C
from lkref import losses as L

from .ports import make_port


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("kit")
    C.export(str(d))
    return str(d)


def test_manifest_is_versioned_and_complete(kit):
    with open(f"{kit}/manifest.json", encoding="utf-8") as f:
        m = json.load(f)
    assert m["format"] == "lkref-conformance" and m["version"] == 1
    assert set(m["tolerances"]) == {"float64", "float32", "bfloat16", "float16"}
    traps = {c["trap"] for c in m["cases"]}
    assert {"ties", "alpha = 0", "point mass", "smaller vocabulary", "mask", "temperature", "overflow",
            "precision", "lambda"} <= traps
    assert {c["loss"] for c in m["cases"]} == set(lkref.LOSSES)
    assert m["known_mistakes"] == {name: what for name, (what, _) in C.VARIANTS.items()}
    assert "atol + rtol max |want grad|" in m["rule"]


def test_lkref_passes_with_both_paths(kit):
    for impl in ("reference", "auto"):
        fn = lambda loss, z, p, **kw: lkref.LOSSES[loss](z, p, impl=impl, **kw)  # noqa: E731
        rows = C.check(kit, fn)
        assert all(r.passed for r in rows), C.format_table(rows)


def test_a_correct_independent_port_passes(kit):
    rows = C.check(kit, make_port(None))
    assert all(r.passed for r in rows), C.format_table(rows)


_CHECKED: dict = {}


@pytest.mark.parametrize("mistake, failing_case", [
    ("log_of_mean", "basic/lk_alpha"),
    ("renormalised_alpha", "draft_to_target/lk_alpha"),
    ("per_token_lambda", "lambda_batch/lk_lambda"),
    ("no_stop_gradient", "lambda_batch/lk_lambda"),
    ("loose_ties", "ties/lk_alpha"),
    ("clamped_alpha", "alpha_zero/lk_alpha"),
    ("half_ties", "ties/tv"),
    ("half_ties", "ties/lk_alpha"),
    ("half_ties", "ties/lk_lambda"),
    ("unrenormalised_kl", "draft_to_target/kl"),
    ("unrenormalised_kl", "draft_to_target/lk_lambda"),
    ("mean_over_all", "mask_bool/tv"),
    ("mean_over_all", "mask_weights/lk_alpha"),
    ("mean_over_all", "mask_bool/lk_lambda"),
    ("unmasked_lambda", "lambda_batch/lk_lambda"),
    ("half_softmax", "bfloat16_vocab/tv"),
    ("half_softmax", "bfloat16_vocab/lk_alpha"),
    ("half_softmax", "bfloat16_vocab/lk_lambda"),
    ("half_softmax", "float16_vocab/kl"),                # q underflows in float16 where p > 0: KL = inf
    ("half_softmax", "float16_vocab/tv"),
    ("half_softmax", "float16_vocab/lk_alpha"),
    ("half_softmax", "float16_vocab/lk_lambda"),
    ("half_softmax", "bfloat16_close/kl"),               # a draft near its target: KL off at first order
    ("half_softmax", "float16_close/kl"),
    ("half_log_softmax", "bfloat16_close/kl"),
    ("half_log_softmax", "float16_close/kl"),
    ("missing_temperature", "temperature/kl"),
    ("missing_temperature", "temperature/lk_alpha"),
    ("soft_cross_entropy", "basic/kl"),
    ("soft_cross_entropy", "lambda_batch/lk_lambda"),
    ("soft_cross_entropy", "draft_to_target/kl"),
    ("kl_mean_over_vocab", "basic/kl"),
    ("kl_mean_over_vocab", "lambda_batch/lk_lambda"),
    ("kl_mean_over_vocab", "draft_to_target/kl"),        # V of the draft vocabulary: what kl_div sees
    ("l1_as_tv", "basic/tv"),
    ("l1_as_tv", "basic/lk_lambda"),
    ("l1_as_tv", "bfloat16_close/lk_alpha"),             # alpha > 1/2: -log(2 alpha - 1) is finite
    ("zero_alpha_as_zero", "alpha_zero/lk_alpha"),       # the port works in float64: rows 0 and 1 underflow
    ("massless_rows_kept", "draft_to_target/tv"),        # the row adds TV = 1 and a count
    ("massless_rows_kept", "draft_to_target/lk_alpha"),  # -log 0 = inf, and the gradient of the rest scaled
    ("argmax_outside_dropped", "draft_to_target/kl"),
    ("argmax_outside_dropped", "draft_to_target/tv"),
    ("argmax_outside_dropped", "draft_to_target/lk_alpha"),
    ("argmax_outside_dropped", "draft_to_target/lk_lambda"),
])
def test_each_known_mistake_fails_and_is_named(kit, mistake, failing_case):
    if (kit, mistake) not in _CHECKED:                 # one run of the kit per planted port
        _CHECKED[kit, mistake] = {r.id: r for r in C.check(kit, make_port(mistake))}
    row = _CHECKED[kit, mistake][failing_case]
    assert not row.passed
    assert f"'{mistake}'" in row.message, row.message
    assert C.VARIANTS[mistake][0] in row.message


@pytest.mark.parametrize("clamp", C.CLAMPS)
def test_a_clamped_alpha_is_named_with_its_floor(kit, clamp):
    """speculators' nla clamps alpha at 1e-5, others at 1e-8: the row names the floor, the one the
    port used and no other."""
    row = next(r for r in C.check(kit, make_port("clamped_alpha", clamp=clamp)) if r.id == "alpha_zero/lk_alpha")
    assert not row.passed
    assert f"'clamped_alpha' (at {clamp:g})" in row.message, row.message


def test_alpha_taken_as_zero_where_float32_underflows_is_named_in_float32(kit):
    """A port in float32 (NVIDIA-NeMo/Automodel's LK^alpha: where(alpha > 0, log(clamp(alpha, tiny)), 0))
    drops the rows whose float32 alpha is 0 from the loss and the gradient, counting them still:
    alpha_zero_f32's first row (alpha = 8e-53, 0 in float32), named with the dtype."""
    def float32_port(loss, z, p, **kw):
        r = lkref.LOSSES[loss](z, p, **kw)
        losses, _ = lkref.lk_alpha_forward(np.asarray(z, np.float64), np.asarray(p, np.float64))
        zero = np.minimum(L.softmax(np.asarray(z, np.float32)), np.asarray(p, np.float32)).sum(-1) == 0
        return float(np.mean(np.where(zero, 0, losses))), np.where(zero[:, None], 0, r.grad), r.alpha
    row = next(r for r in C.check(kit, float32_port, losses="lk_alpha") if r.id == "alpha_zero_f32/lk_alpha")
    assert not row.passed
    assert "'zero_alpha_as_zero' (in float32)" in row.message, row.message


@pytest.mark.parametrize("case", ["alpha_zero/lk_alpha", "alpha_zero_f32/lk_alpha"])
def test_a_non_finite_result_says_what_the_trap_needs(kit, case):
    """A port that takes -log of a sum gets inf where alpha underflows; the row says why."""
    def log_of_sum(loss, z, p, **kw):
        r = lkref.LOSSES[loss](z, p, **kw)
        e = np.exp(z - z.max(-1, keepdims=True))
        with np.errstate(divide="ignore"):
            return float(np.mean(-np.log(np.minimum(e / e.sum(-1, keepdims=True), p).sum(-1)))), r.grad, r.alpha
    row = next(r for r in C.check(kit, log_of_sum) if r.id == case)
    assert not row.passed and "non-finite" in row.message and "log space" in row.message, row.message


def test_a_row_without_target_mass_kept_by_autograd_is_told_to_drop_it(kit):
    """Kept in the mean, such a row has alpha = 0: autograd gives -log 0 = inf and a NaN gradient
    (-1/0 times 0), which matches no variant; the row says what the trap needs."""
    def kept(loss, z, p, draft_to_target=None, **kw):
        r = lkref.LOSSES[loss](z, p, draft_to_target=draft_to_target, **kw)
        if draft_to_target is None:
            return r
        grad = r.grad.copy()
        grad[np.asarray(p)[:, draft_to_target].sum(-1) == 0] = np.nan
        return np.inf, grad, r.alpha
    row = next(r for r in C.check(kit, kept) if r.id == "draft_to_target/lk_alpha")
    assert not row.passed and "non-finite" in row.message and "drop it from the mean" in row.message, row.message


@pytest.mark.parametrize("losses", [["lk_alpha"], ("tv", "kl"), "lk_lambda"])
def test_check_of_some_losses(kit, losses):
    rows = C.check(kit, make_port(None), losses=losses)
    want = {losses} if isinstance(losses, str) else set(losses)
    assert {r.loss for r in rows} == want and all(r.passed for r in rows)
    assert len(rows) == sum(c["loss"] in want for c in C.load(kit)[1])


@pytest.mark.parametrize("losses", [["lk_alpha", "nla"], [], "KL"])
def test_check_refuses_unknown_losses(kit, losses):
    with pytest.raises(ValueError, match="losses must name some of"):
        C.check(kit, make_port(None), losses=losses)


def test_a_softmax_without_the_max_is_told_so(kit):
    def no_max(loss, z, p, **kw):
        r = lkref.LOSSES[loss](z, p, **kw)
        with np.errstate(over="ignore", invalid="ignore"):
            q = np.exp(z) / np.exp(z).sum(-1, keepdims=True)       # inf / inf at logits of size 100s
        return r.loss, r.grad + 0 * q, r.alpha
    row = next(r for r in C.check(kit, no_max) if r.id == "extreme_logits/tv")
    assert not row.passed and "non-finite" in row.message and "row's max" in row.message, row.message


def test_a_port_naming_case_dtype_is_told_each_case_dtype(kit):
    """alpha_zero_f32's float32 logits hold only bfloat16 values, so the arrays cannot say a case's
    dtype; a port with a case_dtype parameter is told it, one without is called as before."""
    seen = {}

    def port(loss, z, p, case_dtype, **kw):
        seen[loss, z.tobytes(), p.tobytes()] = case_dtype
        return lkref.LOSSES[loss](z, p, **kw)
    assert all(r.passed for r in C.check(kit, port))
    _, cases = C.load(kit)
    for c in cases:
        key = c["loss"], c["inputs"]["draft_logits"].tobytes(), c["inputs"]["target_probs"].tobytes()
        assert seen[key] == c["dtype"], c["id"]
    assert {c["dtype"] for c in cases} == {"float64", "float32", "bfloat16", "float16"}


def test_results_file_and_cli(kit, tmp_path):
    port = make_port("log_of_mean")
    _, cases = C.load(kit)
    res = {}
    for c in cases:
        inp = c["inputs"]
        out = port(c["loss"], inp["draft_logits"], inp["target_probs"], mask=inp["mask"],
                   draft_to_target=inp["draft_to_target"], **c["options"])
        for k, v in zip(("loss", "grad", "alpha"), out):
            res[f"{c['id']}/{k}"] = np.asarray(v)
    np.savez(tmp_path / "res.npz", **res)
    proc = subprocess.run([sys.executable, "-m", "lkref", "conformance", "check", kit, "--results",
                           str(tmp_path / "res.npz")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "log_of_mean" in proc.stdout
    (tmp_path / "good.py").write_text(
        "import lkref\ndef run(loss, z, p, **kw):\n    return lkref.LOSSES[loss](z, p, **kw)\n")
    proc = subprocess.run([sys.executable, "-m", "lkref", "conformance", "check", kit, "--impl",
                           f"{tmp_path / 'good.py'}:run"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "65 passed, 0 failed" in proc.stdout


def test_a_port_that_raises_or_returns_nan_is_reported(kit):
    def nan_port(loss, z, p, **kw):
        r = lkref.LOSSES[loss](z, p, **kw)
        return r.loss, r.grad * np.nan, r.alpha

    rows = C.check(kit, nan_port)
    assert all(not r.passed and "non-finite" in r.message for r in rows)

    def raising(loss, z, p, **kw):
        raise RuntimeError("boom")
    assert all("raised RuntimeError: boom" in r.message for r in C.check(kit, raising))


@pytest.mark.parametrize("port, said", [
    (lambda loss, z, p, **kw: (1.0,), "the port must return (loss, grad, alpha) or an object with .loss, .grad "
                                      "and .alpha; it returned a tuple of 1"),
    (lambda loss, z, p, **kw: None, "it returned NoneType"),
    (lambda loss, z, p, **kw: (lambda r: (r.loss, r.grad[:1], r.alpha))(lkref.LOSSES[loss](z, p, **kw)),
     "gradient has shape (1, "),
])
def test_a_port_returning_the_wrong_thing_is_told_what(kit, port, said):
    """Not 'raised ValueError: not enough values to unpack' (lkref's own unpacking) nor 'off by inf'."""
    rows = C.check(kit, port)
    assert not any(r.passed for r in rows)
    assert all(said in r.message for r in rows), rows[0].message


def test_2_byte_cases_hold_values_of_their_type(kit):
    """The manifest tells ports to cast the bfloat16 cases' float32 arrays to bfloat16 losslessly
    (float16 cases are float16 arrays): logits and target are values of that type, and the
    target's rows sum to 1 within 1e-9 (a few entries chosen so: a KL near 0 needs it)."""
    _, cases = C.load(kit)
    for dt, stored in (("bfloat16", np.float32), ("float16", np.float16)):
        half = [c for c in cases if c["dtype"] == dt]
        assert {c["id"].split("/")[0] for c in half} == ({"bfloat16", "bfloat16_vocab", "bfloat16_close"}
                                                          if dt == "bfloat16" else {"float16_vocab", "float16_close"})
        for c in half:
            for name in ("draft_logits", "target_probs"):
                x = c["inputs"][name]
                assert x.dtype == stored and np.array_equal(x, C._half(x, dt)), (c["id"], name)
            sums = c["inputs"]["target_probs"].astype(np.float64).sum(-1)
            assert np.all(np.abs(sums - 1) < 1e-9), (c["id"], sums)


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_vocab_cases_separate_float32_from_2_byte_arithmetic(kit, dt):
    """Where the case makes q < p by over 1e-4 of q (m = 1), q rounded to the 2-byte type equals p
    (a tie, m = 0): at dozens of the draft's likeliest tokens per row, so a softmax in that type
    flips m where it matters, while float32 (q within ~1e-6 of itself) gets every such token right."""
    from lkref import losses as L
    _, cases = C.load(kit)
    c = next(c for c in cases if c["id"] == f"{dt}_vocab/tv")
    q = L.softmax(c["inputs"]["draft_logits"].astype(np.float64))
    p = c["inputs"]["target_probs"].astype(np.float64)
    flipped = (q < p) & (C._half(q, dt).astype(np.float64) == p)
    assert np.all(flipped.sum(-1) >= 20)
    # a flip moves the TV gradient entry q (m - S) by q: in every row by over 5x the type's
    # tolerance (rtol of the row's largest entry), so each row fails such a port on its own
    m = q < p
    g = np.abs(q * (m - np.sum(q * m, -1, keepdims=True)))
    assert np.all(np.where(flipped, q, 0).max(-1) > 5 * C.TOLERANCES[dt]["rtol"] * g.max(-1))
    big = q > 1e-3 * q.max(-1, keepdims=True)
    assert np.min(np.abs(q - p)[big] / q[big]) > 1e-4      # no near-tie that float32 could get wrong


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_close_cases_put_a_2_byte_softmax_into_kl_at_first_order(kit, dt):
    """A draft near its target: KL ~ 1e-3, so the case's KL tolerance is ~1e-4 (bfloat16).  In every
    row, the KL of q rounded to the 2-byte type, and of log q rounded to it, differs from the true
    one by over 5x that tolerance, the same way in every row (the mean does not cancel it), and
    the two differ from each other by over 5x too (the checker can tell which a port did)."""
    from lkref import losses as L
    _, cases = C.load(kit)
    c = next(c for c in cases if c["id"] == f"{dt}_close/kl")
    q = L.softmax(c["inputs"]["draft_logits"].astype(np.float64))
    p = c["inputs"]["target_probs"].astype(np.float64)
    kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0), -1)
    assert np.all((kl > 2e-4) & (kl < 5e-3)) and np.all(c["expected"]["alpha"] > 0.97)
    tol = C.TOLERANCES[dt]
    bound = 5 * (tol["atol"] + tol["rtol"] * kl.mean())
    err_q = np.sum(p * (np.log(q) - np.log(C._half(q, dt).astype(np.float64))), -1)
    err_log = np.sum(p * (np.log(q) - C._half(np.log(q), dt).astype(np.float64)), -1)
    for err in (err_q, err_log):
        assert np.all(np.abs(err) > bound) and (np.all(err > 0) or np.all(err < 0)), err
    assert np.all(np.abs(err_q - err_log) > bound)


def test_a_port_taking_bfloat16_in_bfloat16_passes(kit):
    """Cast losslessly to a real bfloat16 type, lkref (float32 work) passes the bfloat16 cases."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    _, cases = C.load(kit)
    fn = lambda loss, z, p, **kw: lkref.LOSSES[loss](z.astype(ml_dtypes.bfloat16), p.astype(ml_dtypes.bfloat16), **kw)  # noqa: E731
    rows = [r for r in C.check(kit, fn) if r.id.startswith("bfloat16")]
    assert len(rows) == 12 and all(r.passed for r in rows), C.format_table(rows)


def test_lkref_passes_the_float16_cases_in_float16(kit):
    """The float16 cases arrive as float16 arrays; lkref takes them as they are (float32 work)."""
    _, cases = C.load(kit)
    assert all(c["inputs"]["draft_logits"].dtype == np.float16 for c in cases if c["dtype"] == "float16")
    rows = [r for r in C.check(kit, lambda loss, z, p, **kw: lkref.LOSSES[loss](z, p, **kw))
            if r.id.startswith("float16")]
    assert len(rows) == 8 and all(r.passed for r in rows), C.format_table(rows)
