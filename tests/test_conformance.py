"""The conformance kit: lkref and a correct independent port pass; each known mistake fails, named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import lkref
from lkref import conformance as C

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
    assert set(m["tolerances"]) == {"float64", "float32", "bfloat16"}
    traps = {c["trap"] for c in m["cases"]}
    assert {"ties", "alpha = 0", "point mass", "smaller vocabulary", "mask", "temperature", "overflow",
            "precision", "lambda"} <= traps
    assert {c["loss"] for c in m["cases"]} == set(lkref.LOSSES)


def test_lkref_passes_with_both_paths(kit):
    for impl in ("reference", "auto"):
        fn = lambda loss, z, p, **kw: lkref.LOSSES[loss](z, p, impl=impl, **kw)  # noqa: E731
        rows = C.check(kit, fn)
        assert all(r.passed for r in rows), C.format_table(rows)


def test_a_correct_independent_port_passes(kit):
    rows = C.check(kit, make_port(None))
    assert all(r.passed for r in rows), C.format_table(rows)


@pytest.mark.parametrize("mistake, failing_case", [
    ("log_of_mean", "basic/lk_alpha"),
    ("renormalised_alpha", "draft_to_target/lk_alpha"),
    ("per_token_lambda", "lambda_batch/lk_lambda"),
    ("no_stop_gradient", "lambda_batch/lk_lambda"),
    ("loose_ties", "ties/lk_alpha"),
    ("clamped_alpha", "alpha_zero/lk_alpha"),
])
def test_each_known_mistake_fails_and_is_named(kit, mistake, failing_case):
    rows = {r.id: r for r in C.check(kit, make_port(mistake))}
    row = rows[failing_case]
    assert not row.passed
    assert f"'{mistake}'" in row.message, row.message
    assert C.VARIANTS[mistake][0] in row.message


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
    assert "49 passed, 0 failed" in proc.stdout


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
