"""Conformance vectors for ports of the LK losses, and a checker that names what differs.

export(dir) writes lkref_conformance.npz and manifest.json: for every case the inputs,
the options, the expected loss / grad / alpha (and lambda for LK^lambda), computed by the
readable path in float64 from the stored inputs, and tolerances per input dtype.  The cases
cover the ordinary and the traps: ties, alpha = 0, a point-mass target, a smaller draft
vocabulary, masks, temperature, extreme logits, float32, bfloat16 and float16 inputs (the
2-byte types also at V = 32 000, where a softmax computed in them gets the tie rule wrong,
and with a draft close to its target, where it gets KL wrong).

check(dir, fn) runs a port on every case and returns one row per case.  fn is called as

    fn(loss, draft_logits, target_probs, mask=..., temperature=..., draft_to_target=...,
       eta=..., kl_scale=...)  ->  (loss, grad, alpha)  or an object with .loss .grad .alpha

with NumPy arrays (bfloat16 cases arrive as float32 arrays holding bfloat16 values: cast
them to your bfloat16, losslessly; float16 cases as float16 arrays).  A port whose fn has a
parameter named case_dtype is also given the case's dtype there ("float64", "float32",
"bfloat16" or "float16"), which a float32 array cannot say.  A failing case is compared
with the known wrong variants (VARIANTS), and the row names the one that the port matches.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass

import numpy as np

from . import losses as L
from .positions import LOSSES
from .validation import takes_parameter

__all__ = ["FORMAT", "VERSION", "TOLERANCES", "build_cases", "export", "load", "check", "load_impl",
           "VARIANTS", "CLAMPS", "format_table"]

FORMAT, VERSION = "lkref-conformance", 1
#: Port vs expected (float64 reference on the same stored inputs), by the inputs' dtype.
#: A gradient's atol is rtol times the largest |expected gradient| of the case.
TOLERANCES = {
    "float64": {"rtol": 1e-7, "atol": 1e-10},
    "float32": {"rtol": 2e-4, "atol": 1e-6},
    "bfloat16": {"rtol": 2e-2, "atol": 1e-4},
    "float16": {"rtol": 5e-3, "atol": 1e-5},
}


def _bf16(x):
    """Round float values to the nearest bfloat16 (kept in float32): inputs a bf16 port gets losslessly."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return b.view(np.float32)


def _half(x, dtype):
    """x rounded to a 2-byte type ("bfloat16": kept in float32, as the bfloat16 cases store it;
    "float16": a float16 array)."""
    return _bf16(x) if dtype == "bfloat16" else np.asarray(x).astype(np.float16)


def _half_rows(p, dtype, fixed=None):
    """Rows of probabilities (float64) rounded to a 2-byte type, each row's sum brought back
    to 1 as near as the type allows by choosing up to 8 entries, none of `fixed` (a boolean
    array of p's shape): each time the smallest entry at least 8 times the error left, so
    that the error shrinks some 60-fold a step (rows of 32 000 end within ~1e-12 of 1): a
    target a port gets losslessly, whose KL to a draft near it is not swamped by its sum."""
    b = _half(p, dtype).astype(np.float64)
    for i in range(len(b)):
        free = np.ones(b.shape[1], bool) if fixed is None else ~fixed[i]
        for _ in range(8):
            err = 1.0 - b[i].sum()
            ok = free & (b[i] >= 8 * abs(err))
            if err == 0 or not ok.any():
                break
            k = int(np.argmin(np.where(ok, b[i], np.inf)))
            b[i, k] = _half(b[i, k] + err, dtype)
            free[k] = False
    return _half(b, dtype)


def _near_ties(rng, shape, dtype, ties=32):
    """Logits of a draft near its target and a target, both in a 2-byte type, the target equal
    to the draft's q rounded to that type at up to `ties` of its likeliest tokens per row,
    where the rounding moved q up by more than 1e-4 of itself: there q < p (m = 1) by far
    more than float32's rounding of q, yet a q rounded to the 2-byte type (a softmax computed
    in it) ties with p (m = 0)."""
    t = rng.standard_normal(shape) * 3                   # the target's logits
    z = _half(t + rng.standard_normal(shape), dtype)     # a draft near them
    q = L.softmax(z.astype(np.float64))
    qh = _half(q, dtype).astype(np.float64)
    p = L.softmax(t)
    tie = np.zeros(shape, bool)
    for i in range(shape[0]):
        order = np.argsort(-q[i], kind="stable")          # 2-byte logits repeat: ties in q
        up = order[qh[i, order] - q[i, order] > 1e-4 * q[i, order]][:ties]
        up = up[np.cumsum(qh[i, up]) <= 0.6]             # leave 40 % of the mass to the other tokens
        tie[i, up] = True
        rest = ~tie[i]
        p[i, rest] *= (1 - qh[i, up].sum()) / p[i, rest].sum()
        p[i, up] = qh[i, up]
    return z, _half_rows(p, dtype, fixed=tie)


def _close_draft(rng, shape, dtype, mass=0.6, eps=0.05):
    """Logits of a draft and a target near it (alpha ~ 0.98, KL ~ 1e-3), both in a 2-byte
    type, where 32-56 tokens of each row share one logit holding ~`mass` of q: the number and
    the logit chosen among the type's values so that their q rounded to the type is high by as
    much as can be had (relative error `up`) while their log q rounded to it is high by over 3x
    as much (`off`).  A row's KL then errs by ~mass times that (one sign over 60 % of the mass
    and in every row, not a sum of random roundings that cancel) when q, or log q, is computed
    in the 2-byte type: 10-100x the tolerance, the two far apart, while float32's rounding
    stays far inside (tests/test_conformance.py checks all three on the built case)."""
    n, V = shape
    z = _half(rng.standard_normal(shape) * 1.5, dtype).astype(np.float64)
    for i in range(n):
        order = rng.permutation(V)
        best = None
        for k in range(32, 57):
            tail = np.exp(z[i, order[k:]]).sum()
            c = np.unique(_half(np.log(mass / (1 - mass) * tail / k) + np.linspace(-0.6, 0.6, 97), dtype)
                          .astype(np.float64))
            qg = np.exp(c) / (k * np.exp(c) + tail)
            up = _half(qg, dtype).astype(np.float64) / qg - 1            # q's rounding, relative
            off = _half(np.log(qg), dtype).astype(np.float64) - np.log(qg)   # log q's
            share = k * qg
            score = np.where((off > 3 * up) & (np.abs(share - mass) < 0.15), np.minimum(up, off / 3), -1.0)
            j = int(np.argmax(score))
            if best is None or score[j] > best[0]:
                best = (score[j], k, c[j])
        _, k, c = best
        z[i, order[:k]] = c
    p = L.softmax(z + eps * rng.standard_normal(shape))
    return _half(z, dtype), _half_rows(p, dtype)


def _probs(rng, shape, zero_frac=0.3):
    x = rng.gamma(0.5, size=shape)
    x[rng.random(shape) < zero_frac] = 0
    x[..., 0] += 0.05
    return x / x.sum(-1, keepdims=True)


def build_cases(seed=0):
    """The list of cases: dicts with id, loss, trap, description, dtype, inputs, options."""
    rng = np.random.default_rng(seed)
    cases = []

    def add(cid, trap, desc, dtype, z, p, mask=None, d2t=None, T=1.0, losses=tuple(LOSSES), **extra):
        for loss in losses:
            opts = {"temperature": T}
            if loss == "lk_lambda":
                opts.update({"eta": extra.get("eta", 3.0), "kl_scale": extra.get("kl_scale", 1.0)})
            cases.append({"id": f"{cid}/{loss}", "loss": loss, "trap": trap, "description": desc,
                          "dtype": dtype, "inputs": {"draft_logits": z, "target_probs": p, "mask": mask,
                                                     "draft_to_target": d2t}, "options": opts})

    z = rng.standard_normal((6, 11)) * 2
    add("basic", "", "ordinary rows, float64", "float64", z, _probs(rng, (6, 11)))
    z = (rng.standard_normal((8, 50)) * 3).astype(np.float32)
    add("float32", "precision", "float32 inputs", "float32", z, _probs(rng, (8, 50)).astype(np.float32))
    zb = _bf16(rng.standard_normal((4, 32)) * 3)
    add("bfloat16", "precision", "bfloat16 logits and target (compute in float32)", "bfloat16", zb,
        _half_rows(_probs(rng, (4, 32), 0.0), "bfloat16"))
    z = rng.standard_normal((5, 9)) * 2
    add("temperature", "temperature", "T = 0.7: q = softmax(z / T), gradients carry 1/T", "float64", z,
        _probs(rng, (5, 9)), T=0.7)
    z = rng.standard_normal((7, 10)) * 2
    add("mask_bool", "mask", "a boolean mask: masked positions out of the mean, zero gradient", "float64", z,
        _probs(rng, (7, 10)), mask=np.array([1, 0, 1, 1, 0, 1, 1], bool))
    z = rng.standard_normal((5, 10)) * 2
    add("mask_weights", "mask", "weights as the mask: a weighted mean", "float64", z, _probs(rng, (5, 10)),
        mask=np.array([0.0, 0.5, 2.0, 1.0, 1.0]))
    # ties: equal logits over V = 8 give q = 1/8 exactly in any softmax
    z = np.zeros((3, 8))
    p = np.array([[0.125] * 8,
                  [0.125, 0.125, 0.25, 0.25, 0.0, 0.0, 0.125, 0.125],
                  [0.125, 0.0, 0.375, 0.0, 0.125, 0.125, 0.125, 0.125]])
    add("ties", "ties", "q = p exactly at some tokens (equal logits, V = 8): min taken as p, m = 1[q < p]",
        "float64", z, p)
    z = np.array([[-1000.0, 1000.0, 0.0], [500.0, -500.0, -500.0], [0.0, 0.0, 0.0]])
    p = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    add("alpha_zero", "alpha = 0", "disjoint supports: alpha underflows, -log alpha is exact (no clamp)",
        "float64", z, p)
    z32 = np.array([[-60.0, 60.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    add("alpha_zero_f32", "alpha = 0", "disjoint supports in float32: alpha below float32's range", "float32",
        z32, np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32))
    z = rng.standard_normal((6, 12)) * 3
    p = np.eye(12)[rng.integers(0, 12, 6)]
    add("point_mass", "point mass", "one-hot target: LK^alpha is cross-entropy", "float64", z, p)
    z = rng.standard_normal((5, 6)) * 2
    p = _probs(rng, (5, 10), 0.2)
    d2t = np.array([9, 0, 3, 4, 7, 1])
    p[2] = 0
    p[2, [2, 5, 6, 8]] = 0.25                          # no target mass on the draft vocabulary: dropped
    add("draft_to_target", "smaller vocabulary", "draft vocabulary of 6 inside 10: alpha and TV on the "
        "unrenormalised restricted target, KL on the renormalised one; a row with no mass on D drops out",
        "float64", z, p, d2t=d2t)
    z = (rng.standard_normal((4, 40)) * 80).astype(np.float32)
    add("extreme_logits", "overflow", "logits of size 100s in float32: softmax must subtract the max",
        "float32", z, _probs(rng, (4, 40)).astype(np.float32))
    z = rng.standard_normal((8, 10)) * 3
    p = _probs(rng, (8, 10))
    p[:4] = L.softmax(z[:4]) * 0.5 + p[:4] * 0.5       # rows with very different alpha
    add("lambda_batch", "lambda", "LK^lambda: one lambda from the masked mean alpha of the call", "float64",
        z, p, mask=np.array([1, 1, 0, 1, 1, 0, 1, 1], bool), losses=("lk_lambda",), eta=5.0, kl_scale=0.8)
    for dt in ("bfloat16", "float16"):
        z, p = _near_ties(rng, (4, 32000), dt)
        add(f"{dt}_vocab", "precision", f"{dt} at a real vocabulary (V = 32 000), the target equal to the "
            f"draft's q rounded to {dt} at its likeliest tokens, where q < p by over 1e-4 of q: float32 "
            f"arithmetic sees q < p there, a q rounded to {dt} a tie", dt, z, p)
    for dt in ("bfloat16", "float16"):
        z, p = _close_draft(rng, (4, 4096), dt)
        add(f"{dt}_close", "precision", f"{dt}, a draft close to its target (alpha ~ 0.98, KL ~ 1e-3, V = 4 096), "
            f"32-56 tokens of a row sharing one logit with 60 % of q, where q and log q rounded to {dt} are off "
            f"by most of a step: KL from a {dt} softmax or log_softmax errs by 10-100x the tolerance", dt, z, p)
    return cases


def _expected(case):
    inp, opts = case["inputs"], case["options"]
    fn = LOSSES[case["loss"]]
    z = np.asarray(inp["draft_logits"], np.float64)
    p = np.asarray(inp["target_probs"], np.float64)
    r = fn(z, p, mask=inp["mask"], draft_to_target=inp["draft_to_target"], impl="reference", **opts)
    return {"loss": np.asarray(r.loss), "grad": r.grad, "alpha": r.alpha,
            "lam": None if r.lam is None else np.asarray(r.lam)}


def export(directory, seed=0):
    """Write the vectors (NPZ) and the manifest (JSON) into directory; returns the manifest."""
    from . import __version__

    os.makedirs(directory, exist_ok=True)
    arrays, manifest_cases = {}, []
    for case in build_cases(seed):
        cid = case["id"]
        entry = {k: case[k] for k in ("id", "loss", "trap", "description", "dtype", "options")}
        entry["inputs"], entry["expected"] = {}, {}
        for name, val in case["inputs"].items():
            if val is not None:
                arrays[f"{cid}/in/{name}"] = np.asarray(val)
                entry["inputs"][name] = f"{cid}/in/{name}"
            else:
                entry["inputs"][name] = None
        for name, val in _expected(case).items():
            if val is not None:
                arrays[f"{cid}/out/{name}"] = np.asarray(val, np.float64)
                entry["expected"][name] = f"{cid}/out/{name}"
        manifest_cases.append(entry)
    manifest = {"format": FORMAT, "version": VERSION, "lkref_version": __version__, "seed": seed,
                "tolerances": TOLERANCES, "arrays": "lkref_conformance.npz",
                "rule": "each of loss, grad, alpha passes where max |got - want| / (atol + rtol |want|) <= 1, "
                        "with the tolerances of the case's dtype; for grad, atol is atol + rtol max |want grad|; "
                        "an infinity equals the same infinity",
                "known_mistakes": {name: what for name, (what, _) in VARIANTS.items()},
                "call": "fn(loss, draft_logits, target_probs, mask=, temperature=, draft_to_target=, eta=, "
                        "kl_scale=[, case_dtype=]) -> (loss, grad, alpha)",
                "cases": manifest_cases}
    np.savez_compressed(os.path.join(directory, "lkref_conformance.npz"), **arrays)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def load(directory):
    """(manifest, cases) with arrays filled in, from a directory written by export."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{directory} holds no {FORMAT} v{VERSION} manifest")
    data = np.load(os.path.join(directory, manifest["arrays"]))
    cases = []
    for entry in manifest["cases"]:
        c = dict(entry)
        c["inputs"] = {k: (None if v is None else data[v]) for k, v in entry["inputs"].items()}
        c["expected"] = {k: data[v] for k, v in entry["expected"].items()}
        cases.append(c)
    return manifest, cases


# --------------------------------------------------------------------------------------
# the known wrong variants: what earlier ports did (SPEC section 2)


def _ref(case, **over):
    inp = dict(case["inputs"])
    opts = dict(case["options"])
    fn = LOSSES[over.pop("loss", case["loss"])]
    z = np.asarray(inp["draft_logits"], np.float64)
    p = np.asarray(over.pop("target_probs", inp["target_probs"]), np.float64)
    opts.update(over)
    if fn is not L.lk_lambda:
        opts.pop("eta", None)
        opts.pop("kl_scale", None)
    return fn(z, p, mask=inp["mask"], draft_to_target=inp["draft_to_target"], impl="reference", **opts)


def _parts(case):
    """(z, p, p_kl, w, T) in float64 as the reference sees them: p restricted to the draft
    vocabulary, p_kl renormalised, w the weights with rows that have no target mass dropped."""
    inp = case["inputs"]
    _, z, p, p_kl, w, _, T = L.prepare_inputs(np.asarray(inp["draft_logits"], np.float64),
                                        np.asarray(inp["target_probs"], np.float64), inp["mask"],
                                        case["options"]["temperature"], inp["draft_to_target"], need_kl=True)
    return z, p, p_kl, w, T


def _q(case):
    """The case's draft distribution softmax(z / T) in float64, as the reference has it."""
    z, _, _, _, T = _parts(case)
    return L.softmax(z, T)


def _v_log_of_mean(case):
    if case["loss"] != "lk_alpha":
        return None
    t = _ref(case, loss="tv")
    w = _parts(case)[3]
    mean_alpha = float(np.dot(w, t.alpha) / w.sum())
    return -np.log(mean_alpha), t.grad / mean_alpha, t.alpha


def _v_renormalised_alpha(case):
    d2t = case["inputs"]["draft_to_target"]
    if d2t is None:
        return None
    p = np.asarray(case["inputs"]["target_probs"], np.float64).copy()
    mass = p[:, d2t].sum(-1, keepdims=True)
    keep = np.zeros_like(p)
    keep[:, d2t] = p[:, d2t] / np.where(mass > 0, mass, 1)
    keep[mass[:, 0] == 0] = p[mass[:, 0] == 0]          # rows without mass stay as they were
    r = _ref(case, target_probs=keep)
    return r.loss, r.grad, r.alpha


def _lam(case, mean_alpha):
    """The case's lambda (its eta and kl_scale) from a mean alpha, or one per position from an
    array; outside [0, 1] too (lambda_from_alpha refuses it), as a port with a wrong alpha has it."""
    return case["options"]["kl_scale"] * np.exp(-case["options"]["eta"] * np.asarray(mean_alpha, np.float64))


def _v_per_token_lambda(case):
    if case["loss"] != "lk_lambda":
        return None
    z, p, p_kl, w, T = _parts(case)
    alpha = L.tv_forward(z, p, temperature=T)[1]["alpha"]
    lam = _lam(case, alpha)                             # one lambda per token
    losses, cache = L.lk_lambda_forward(z, p, lam, temperature=T, p_kl=p_kl)
    loss, mc = L.mean_forward(losses, w)
    return loss, L.lk_lambda_backward(L.mean_backward(1.0, mc), cache), alpha


def _v_mean_over_all(case):
    if case["inputs"]["mask"] is None:
        return None
    w = _parts(case)[3]
    share = w.sum() / w.size                           # (x * mask).mean() = share * the masked mean
    if case["loss"] != "lk_lambda":
        r = _ref(case)
        return r.loss * share, r.grad * share, r.alpha
    alpha = _ref(case, loss="tv").alpha
    r = _ref(case, lam=_lam(case, float(np.dot(w, alpha)) / w.size))
    return r.loss * share, r.grad * share, r.alpha


def _v_unmasked_lambda(case):
    if case["loss"] != "lk_lambda" or case["inputs"]["mask"] is None:
        return None
    alpha = _ref(case, loss="tv").alpha
    r = _ref(case, lam=_lam(case, float(alpha.mean())))
    return r.loss, r.grad, r.alpha


def _v_no_stop_gradient(case):
    if case["loss"] != "lk_lambda":
        return None
    r = _ref(case)
    k, t = _ref(case, loss="kl"), _ref(case, loss="tv")
    eta = case["options"]["eta"]
    # d lam / dz = -eta lam d(mean alpha)/dz = eta lam * tv.grad; the loss gains (KL - TV) d lam
    grad = r.grad + (float(k.loss) - float(t.loss)) * eta * float(r.lam) * t.grad
    return r.loss, grad, r.alpha


def _from_q(case, q, ties=0.0, renormalise_kl=True, log_q=None, l1=False, soft_ce=False, weights=None):
    """(loss, grad, alpha) of the case's loss in float64 from a given draft distribution q (the
    formulas of docs/PORTING.md, the softmax's Jacobian taken at q), with the tie rule
    m = 1[q < p] + ties 1[q = p] (0: lkref's, 1: q <= p, 1/2: autograd through torch.minimum,
    or through |q - p| with sign(0) = 0); KL on the restricted target as it is where not
    renormalise_kl, and from log_q where given (else log q); where l1, TV taken as the L1
    distance sum |p - q| = 2 (1 - alpha) and alpha as 1 minus that; where soft_ce, the soft
    cross-entropy -sum p log q = KL + H(p) in KL's place (the same gradient); weights, where
    given, the rows' weights in the mean instead of the reference's."""
    _, p, p_kl, w, T = _parts(case)
    if weights is not None:
        w = np.asarray(weights, np.float64)
    if not renormalise_kl:
        p_kl = p
    d = w / w.sum()
    m = (q < p) + ties * (q == p)
    S = np.sum(q * m, -1, keepdims=True)
    alpha = np.minimum(q, p).sum(-1)
    dtv = -q * (m - S) / T
    if l1:
        alpha, dtv = 2 * alpha - 1, 2 * dtv
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(q) if log_q is None else log_q
        log_p = 0.0 if soft_ce else np.log(np.where(p_kl > 0, p_kl, 1))
        kl = np.sum(np.where(p_kl > 0, p_kl * (log_p - log_q), 0), -1)
    dkl = (q * p_kl.sum(-1, keepdims=True) - p_kl) / T
    if case["loss"] == "kl":
        per, grad = kl, dkl
    elif case["loss"] == "tv":
        per, grad = 1 - alpha, dtv
    elif case["loss"] == "lk_alpha":
        with np.errstate(divide="ignore", invalid="ignore"):      # alpha = 0 only where m = 0 and S = 0:
            per, grad = -np.log(alpha), np.where(alpha[:, None] > 0, dtv / alpha[:, None], 0)   # 0, not 0/0
    else:
        lam = _lam(case, float(np.dot(d, alpha)))
        per, grad = lam * kl + (1 - lam) * (1 - alpha), lam * dkl + (1 - lam) * dtv
    with np.errstate(invalid="ignore"):
        loss = float(np.sum(np.where(d > 0, d * per, 0)))
        return loss, np.where(d[:, None] > 0, grad * d[:, None], 0), alpha


def _v_loose_ties(case):
    if case["trap"] != "ties" or case["loss"] == "kl":
        return None
    return _from_q(case, _q(case), ties=1.0)


def _v_half_ties(case):
    if case["trap"] != "ties" or case["loss"] == "kl":
        return None
    return _from_q(case, _q(case), ties=0.5)


def _v_unrenormalised_kl(case):
    if case["inputs"]["draft_to_target"] is None or case["loss"] not in ("kl", "lk_lambda"):
        return None
    return _from_q(case, _q(case), renormalise_kl=False)


def _v_half_softmax(case):
    if case["dtype"] not in ("bfloat16", "float16"):
        return None
    return _from_q(case, _half(_q(case), case["dtype"]).astype(np.float64))


def _v_half_log_softmax(case):
    if case["dtype"] not in ("bfloat16", "float16") or case["loss"] not in ("kl", "lk_lambda"):
        return None
    q = _q(case)
    return _from_q(case, q, log_q=_half(np.log(q), case["dtype"]).astype(np.float64))


def _v_soft_cross_entropy(case):
    if case["loss"] not in ("kl", "lk_lambda"):
        return None
    return _from_q(case, _q(case), soft_ce=True)


def _v_l1_as_tv(case):
    if case["loss"] == "kl":
        return None
    return _from_q(case, _q(case), l1=True)


def _v_kl_mean_over_vocab(case):
    if case["loss"] not in ("kl", "lk_lambda"):
        return None
    V = np.shape(case["inputs"]["draft_logits"])[-1]
    k = _ref(case, loss="kl")
    if case["loss"] == "kl":
        return k.loss / V, k.grad / V, k.alpha
    t, lam = _ref(case, loss="tv"), float(_ref(case).lam)
    return lam * k.loss / V + (1 - lam) * t.loss, lam * k.grad / V + (1 - lam) * t.grad, k.alpha


def _v_missing_temperature(case):
    T = case["options"]["temperature"]
    if T == 1.0:
        return None
    r = _ref(case)
    return r.loss, r.grad * T, r.alpha


def _restricted_mass(case):
    """(the target's mass on the draft vocabulary per row, the mask's weights) where the case has
    draft_to_target, else None."""
    inp = case["inputs"]
    d2t = inp["draft_to_target"]
    if d2t is None:
        return None
    p = np.asarray(inp["target_probs"], np.float64)
    w = np.ones(len(p)) if inp["mask"] is None else np.asarray(inp["mask"], np.float64)
    return p[:, d2t].sum(-1), w


def _v_massless_rows_kept(case):
    got = _restricted_mass(case)
    if got is None or not np.any((got[0] == 0) & (got[1] > 0)):
        return None
    return _from_q(case, _q(case), weights=got[1])


def _v_argmax_outside_dropped(case):
    got = _restricted_mass(case)
    if got is None:
        return None
    inp = case["inputs"]
    inside = np.isin(np.asarray(inp["target_probs"]).argmax(-1), inp["draft_to_target"])
    w = np.where(inside & (got[0] > 0), got[1], 0)
    if np.array_equal(w > 0, (got[0] > 0) & (got[1] > 0)):
        return None                                     # the same rows as lkref's rule
    return _from_q(case, _q(case), weights=w)


def _v_zero_alpha_as_zero(case):
    """-log alpha taken as 0, with a zero gradient, where alpha underflows to 0, the row still
    counted in the mean: alpha as a port computes it, in float32 (float32 and 2-byte cases, or
    float64 ones a port runs in float32) or in float64."""
    if case["loss"] != "lk_alpha":
        return None
    z, p, _, w, T = _parts(case)
    d = w / w.sum()
    losses, _ = L.lk_alpha_forward(z, p, temperature=T)
    ref = _ref(case)
    out = {}
    for dt in (np.float32, np.float64) if case["dtype"] == "float64" else (np.float32,):
        zero = np.minimum(L.softmax(z.astype(dt), T), p.astype(dt)).sum(-1) == 0
        kept = (d > 0) & ~zero
        if np.array_equal(kept, d > 0):
            continue                                    # nothing underflows here
        out[f"in {np.dtype(dt).name}"] = (float(np.sum(np.where(kept, d * losses, 0))),
                                          np.where(kept[:, None], ref.grad, 0), ref.alpha)
    return out or None


#: The floors ports clamp alpha at (speculators' nla: 1e-5).
CLAMPS = (1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12)


def _v_clamped_alpha(case):
    if case["loss"] != "lk_alpha":
        return None
    t = _ref(case, loss="tv")
    w = _parts(case)[3]
    out = {}
    for eps in CLAMPS:
        a = np.maximum(t.alpha, eps)
        loss = float(np.dot(w, np.where(w > 0, -np.log(a), 0)) / w.sum())
        out[f"at {eps:g}"] = loss, t.grad / a[:, None] * (t.alpha >= eps)[:, None], t.alpha
    return out


#: name -> (what the port did, function building that variant's (loss, grad, alpha) for a case,
#: or a dict of them by a detail such as the floor, or None where the variant does not apply)
VARIANTS = {
    "log_of_mean": ("-log(mean alpha) instead of mean(-log alpha)", _v_log_of_mean),
    "renormalised_alpha": ("alpha on the renormalised draft-vocabulary target", _v_renormalised_alpha),
    "unrenormalised_kl": ("KL on the draft-vocabulary target without renormalising it", _v_unrenormalised_kl),
    "per_token_lambda": ("a lambda per token instead of one per call", _v_per_token_lambda),
    "no_stop_gradient": ("a gradient through lambda (missing stop-gradient)", _v_no_stop_gradient),
    "mean_over_all": ("the masked mean taken as (x * mask).mean(): divided by every position, not by the "
                      "mask's sum", _v_mean_over_all),
    "unmasked_lambda": ("lambda from the mean alpha of every position, masked ones included", _v_unmasked_lambda),
    "loose_ties": ("the tie rule 1[q <= p] instead of 1[q < p]", _v_loose_ties),
    "half_ties": ("half weight at ties, m = 1/2 where q = p (autograd through torch.minimum, or through "
                  "|q - p| with sign(0) = 0) instead of 1[q < p]", _v_half_ties),
    "half_softmax": ("q rounded to the inputs' 2-byte type (a bfloat16 or float16 softmax) before alpha "
                     "and the tie rule; compute in float32", _v_half_softmax),
    "half_log_softmax": ("log q rounded to the inputs' 2-byte type (a log_softmax returned in bfloat16 or "
                         "float16) in the KL term", _v_half_log_softmax),
    "kl_mean_over_vocab": ("KL averaged over every entry, divided by the vocabulary size too (PyTorch's "
                           "kl_div with reduction='mean' rather than 'batchmean')", _v_kl_mean_over_vocab),
    "soft_cross_entropy": ("the soft cross-entropy -sum p log q in KL's place: KL + H(p), the same gradient, "
                           "a loss larger by the target's entropy (harmless to training, not KL)",
                           _v_soft_cross_entropy),
    "l1_as_tv": ("TV taken as the L1 distance sum |p - q|, twice TV (and alpha as 1 minus it)", _v_l1_as_tv),
    "missing_temperature": ("gradients without the 1/T factor", _v_missing_temperature),
    "massless_rows_kept": ("rows whose target has no mass on the draft vocabulary kept in the mean (alpha = 0 "
                           "whatever the draft: they drop out, like masked rows)", _v_massless_rows_kept),
    "argmax_outside_dropped": ("rows whose target's likeliest token is outside the draft vocabulary dropped "
                               "(SpecForge's rule); only rows with no target mass on it drop out",
                               _v_argmax_outside_dropped),
    "zero_alpha_as_zero": ("-log alpha taken as 0 with a zero gradient where alpha underflows to 0, the row "
                           "still counted (a where(alpha > 0, log alpha, 0)) instead of -log alpha in exact log "
                           "space", _v_zero_alpha_as_zero),
    "clamped_alpha": ("alpha clamped at a floor (clamp_min(alpha, eps)) instead of -log alpha in exact log "
                      "space", _v_clamped_alpha),
}


# --------------------------------------------------------------------------------------
# the checker


@dataclass
class CaseResult:
    id: str
    loss: str
    trap: str
    passed: bool
    err_loss: float
    err_grad: float
    err_alpha: float
    message: str


def _err(got, want, rtol, atol):
    """The largest |got - want| / (atol + rtol |want|); <= 1 passes.  An infinity counts as
    equal to the same infinity (a known mistake may give one), else as inf, as do NaN and a
    shape mismatch."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    same = got == want                                 # the same infinities included; never NaN
    finite = np.isfinite(got) & np.isfinite(want)
    if not np.all(same | finite):
        return float("inf")
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(same, 0.0, np.abs(got - want) / (atol + rtol * np.abs(want)))
    return float(np.max(e, initial=0.0))


def _scores(got, expected, tol):
    g = np.asarray(expected["grad"], np.float64)
    g_atol = tol["atol"] + tol["rtol"] * float(np.max(np.abs(g[np.isfinite(g)]), initial=0.0))
    return (_err(got[0], expected["loss"], tol["rtol"], tol["atol"]),
            _err(got[1], expected["grad"], tol["rtol"], g_atol),
            _err(got[2], expected["alpha"], tol["rtol"], tol["atol"]))


class PortResultError(TypeError):
    """A port returned something that is not (loss, grad, alpha)."""


def _unpack(result):
    if hasattr(result, "grad") and hasattr(result, "loss") and hasattr(result, "alpha"):
        return result.loss, result.grad, result.alpha
    if isinstance(result, (tuple, list)) and len(result) == 3:
        return tuple(result)
    what = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) \
        else type(result).__name__
    raise PortResultError(f"the port must return (loss, grad, alpha) or an object with .loss, .grad and "
                          f".alpha; it returned {what}")


def _to_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "float") and hasattr(x, "cpu"):
        x = x.float().cpu()
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x, dtype=np.float64)


def check(directory, fn=None, results=None, losses=None):
    """Run a port (fn) or read its saved results (an NPZ with <id>/loss, /grad, /alpha) on every
    case, or on the cases of `losses` only (names of lkref.LOSSES: for a port of some of them)."""
    manifest, cases = load(directory)
    if losses is not None:
        losses = [losses] if isinstance(losses, str) else list(losses)
        unknown = sorted(set(map(str, losses)) - set(LOSSES))
        if unknown or not losses:
            raise ValueError(f"losses must name some of {sorted(LOSSES)}, got {unknown or losses}")
        cases = [c for c in cases if c["loss"] in losses]
    takes_dtype = fn is not None and takes_parameter(fn, "case_dtype")
    rows = []
    for case in cases:
        tol = manifest["tolerances"][case["dtype"]]
        cid = case["id"]
        try:
            if fn is not None:
                inp = case["inputs"]
                extra = {"case_dtype": case["dtype"]} if takes_dtype else {}
                got = _unpack(fn(case["loss"], inp["draft_logits"], inp["target_probs"], mask=inp["mask"],
                                 draft_to_target=inp["draft_to_target"], **case["options"], **extra))
            else:
                got = tuple(results[f"{cid}/{k}"] for k in ("loss", "grad", "alpha"))
            got = tuple(_to_numpy(x) for x in got)
        except PortResultError as exc:
            rows.append(CaseResult(cid, case["loss"], case["trap"], False, np.inf, np.inf, np.inf, str(exc)))
            continue
        except Exception as exc:
            hint = (" (to check only the losses a port has: --loss NAME, or check(..., losses=...))"
                    if isinstance(exc, (NotImplementedError, KeyError)) and losses is None else "")
            rows.append(CaseResult(cid, case["loss"], case["trap"], False, np.inf, np.inf, np.inf,
                                   f"raised {type(exc).__name__}: {exc}{hint}"))
            continue
        shapes = [f"{name} has shape {g.shape}, expected {np.shape(case['expected'][key])}"
                  for name, key, g in zip(("loss", "gradient", "alpha"), ("loss", "grad", "alpha"), got)
                  if g.shape != np.shape(case["expected"][key])]
        if shapes:
            rows.append(CaseResult(cid, case["loss"], case["trap"], False, np.inf, np.inf, np.inf, "; ".join(shapes)))
            continue
        e = _scores(got, case["expected"], tol)
        ok = all(x <= 1 for x in e)
        msg = "" if ok else _explain(case, got, e, tol)
        rows.append(CaseResult(cid, case["loss"], case["trap"], ok, *e, msg))
    return rows


#: What a non-finite result most likely means, by the case's trap.
_NON_FINITE_HINTS = {
    "alpha = 0": "alpha underflows here: take -log alpha in log space (docs/PORTING.md), not the log of a sum",
    "overflow": "subtract each row's max before exp, and take -log alpha in log space: alpha is tiny here",
    "smaller vocabulary": "a row whose target has no mass on the draft vocabulary has alpha = 0 whatever the "
                          "draft: drop it from the mean like a masked row, and renormalise the KL target only "
                          "where it has mass",
}


def _explain(case, got, e, tol):
    parts = [name for name, x in zip(("loss", "gradient", "alpha"), e) if x > 1]
    if any(not np.all(np.isfinite(np.asarray(g))) for g in got):
        msg = "non-finite values (NaN or inf) in the result"
        hint = _NON_FINITE_HINTS.get(case["trap"])
        msg += f" ({hint})" if hint else ""
    else:
        msg = f"{', '.join(parts)} off by {max(e):.3g}x the tolerance"
    near = []                                          # (how far, name, detail, what) of the variants it matches
    for name, (what, build) in VARIANTS.items():
        try:
            built = build(case)
        except Exception:
            continue
        if built is None:
            continue
        for detail, v in (built.items() if isinstance(built, dict) else [("", built)]):
            sc = _scores(got, {"loss": v[0], "grad": v[1], "alpha": v[2]}, tol)
            if sc[0] <= 1 and sc[1] <= 1:              # alpha is a port's report: not needed to match
                near.append((max(sc), name, detail, what))
    if not near:
        return msg
    _, name, detail, what = min(near)
    return f"{msg}; matches the known mistake '{name}'{f' ({detail})' if detail else ''}: {what}"


def load_impl(spec: str):
    """'module:function' -> the function (the module may be a file path ending in .py)."""
    if ":" not in spec:
        raise ValueError(f"must be module:function, got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        spec_ = importlib.util.spec_from_file_location("lkref_port_under_test", mod_name)
        mod = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    return getattr(mod, fn_name)


def format_table(rows) -> str:
    w = max(len(r.id) for r in rows)
    out = [f"{'case':{w}s}  {'result':6s}  {'loss':>8s} {'grad':>8s} {'alpha':>8s}  note   "
           "(errors in units of the tolerance; <= 1 passes)"]
    for r in rows:
        out.append(f"{r.id:{w}s}  {'pass' if r.passed else 'FAIL':6s}  {r.err_loss:8.2g} {r.err_grad:8.2g} "
                   f"{r.err_alpha:8.2g}  {r.message}")
    n_fail = sum(not r.passed for r in rows)
    out.append(f"{len(rows) - n_fail} passed, {n_fail} failed")
    return "\n".join(out)
