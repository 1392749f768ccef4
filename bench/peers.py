"""Peers for `python -m lkref bench`: other implementations of the same losses, each optional.

Each peer is a function (z, p) -> (loss, grad) on its own arrays, built by a factory that
returns None when its library is missing.  `python -m lkref bench` imports this file from
the checkout's bench/ folder; nothing in lkref/ imports PyTorch or any other peer library.

  numpy-naive     a direct NumPy translation of the formulas with the hand-derived gradient
                  (the baseline of the CPU goal)
  torch-eager     PyTorch autograd on the formulas as issue #5 calls SpecForge's: alpha through
                  torch.minimum, KL through xlogy, the batch-mean lambda (SpecForge's own code,
                  whose KL term is the soft cross-entropy, is the specforge peer)
  torch-compile   torch.compile of the same
  speculators     vLLM speculators' fused Triton losses (speculators.losses.fused), on CUDA:
                  nla for LK^alpha, tv, kl_div, and lk_hybrid for LK^lambda (its lambda is
                  per token, not lkref's batch mean, so its error column is not a rounding
                  error).  They take target logits; log p is passed (-1e4 where p = 0),
                  made before timing.
  liger-fused     Liger-Kernel's fused cross-entropy + TV (liger_kernel.ops.fused_ce_tvd): per-
                  position TV from draft and target logits in one streaming kernel, O(N) saved
                  state, the kernel SPEC.md section 7 timed.  TV is its mean; LK^alpha is
                  -log(1 - TV) per position, composed in PyTorch as speculators composes nla.
                  Its cross-entropy needs labels: zeros, whose term is unused (zero gradient).
                  It takes target logits, made as for speculators.  On CUDA.
  specforge       SpecForge's LK losses as its EAGLE-3 trainer composes them (specforge.core.lk_loss
                  and its Triton KL kernel, specforge.core.loss.LogSoftmaxLoss), on CUDA: KL,
                  LK^alpha ("alpha") and LK^lambda ("lambda", kl_decay = eta = 3), one sequence
                  of N positions, every position valid (prepare takes a mask too).  Its KL term
                  is the soft cross-entropy -sum p log q = KL + H(p): the same gradient, a loss
                  larger by the target's entropy, so its KL and LK^lambda rows are "specforge
                  CE".  Its KL kernel writes the gradient over the logits it was given (free in
                  training, where they are a temporary): prepare gives it its own copy of z, so
                  the first call, the one checked, sees z, and the timed calls after it run on
                  what the call before left there (no kernel's time depends on the values).
  liger-tvd       Liger-Kernel's TV distance (liger_kernel.ops.tvd) on probabilities, after a
                  PyTorch softmax of the logits (autograd carries its gradient back), on CUDA:
                  how one would use Liger's plain TV op; not fused with the softmax.

A peer function may carry a `prepare(z, p)` attribute: the bench calls it once, before
checking and timing, to put the inputs in the peer's own form.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np


# --------------------------------------------------------------------------------------
# NumPy: the formulas, translated directly


def numpy_naive(name):
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def kl(z, p):
        N = z.shape[0]
        logq = z - z.max(-1, keepdims=True)
        logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0)
        loss = np.mean(np.sum(plogp - p * logq, -1))
        return loss, (np.exp(logq) - p) / N

    def tv_parts(z, p):
        q = softmax(z)
        m = q < p
        alpha = np.minimum(p, q).sum(-1)
        S = (q * m).sum(-1, keepdims=True)
        return q, m, alpha, S

    def tv(z, p):
        q, m, alpha, S = tv_parts(z, p)
        return np.mean(1 - alpha), -q * (m - S) / z.shape[0]

    def lk_alpha(z, p):
        q, m, alpha, S = tv_parts(z, p)
        return np.mean(-np.log(alpha)), -q * (m - S) / alpha[:, None] / z.shape[0]

    def lk_lambda(z, p, eta=3.0):
        lk, gk = kl(z, p)
        q, m, alpha, S = tv_parts(z, p)
        lam = np.exp(-eta * alpha.mean())
        return lam * lk + (1 - lam) * np.mean(1 - alpha), lam * gk - (1 - lam) * q * (m - S) / z.shape[0]

    return {"kl": kl, "tv": tv, "lk_alpha": lk_alpha, "lk_lambda": lk_lambda}[name]


# --------------------------------------------------------------------------------------
# PyTorch: the SpecForge formulas under autograd, eager and compiled


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_loss(name, compiled=False, eta=3.0):
    torch = _torch()
    if torch is None:
        return None
    F = torch.nn.functional

    def loss_fn(z, p):
        logq = F.log_softmax(z.float(), dim=-1)
        q = logq.exp()
        alpha = torch.minimum(p, q).sum(-1)
        if name == "lk_alpha":
            return (-torch.log(alpha)).mean()
        tv = (1 - alpha).mean()
        if name == "tv":
            return tv
        kl = (torch.xlogy(p, p) - p * logq).sum(-1).mean()
        if name == "kl":
            return kl
        lam = torch.exp(-eta * alpha.mean().detach())
        return lam * kl + (1 - lam) * tv

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def run(z, p):
        z = z.detach().requires_grad_(True)
        loss = fn(z, p)
        loss.backward()
        return loss.detach(), z.grad
    return run


def target_logits(p):
    """Logits of the target probabilities p for the peers that take logits: log p, with -1e4
    where p = 0 instead of -inf (a target model's logits are finite; exp(-1e4) is 0 in float32,
    so their softmax is p again)."""
    torch = _torch()
    return torch.log(p).clamp_min(-1e4)


# --------------------------------------------------------------------------------------
# vLLM speculators: fused Triton losses from draft and target logits, per position


def _speculators_fused():
    """speculators.losses.fused, or None.

    The package's __init__ pulls in transformers, pydantic, datasets, openai and more, which a
    GPU image may lack (the device image does; its wheels travel with --no-deps, see
    bench/README.md).  The fused losses need only torch, Triton and
    speculators.utils.util.is_npu_available, so when the package import fails the one file
    is loaded alone: the parent packages become empty modules (their __init__ is not run)
    and is_npu_available is False, as on any CUDA machine.  This process is the benchmark's
    own; nothing else in it imports speculators."""
    try:
        from speculators.losses import fused
        return fused
    except Exception:
        pass
    try:
        spec = importlib.util.find_spec("speculators")   # locates, does not run __init__
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "losses", "fused.py")
    if not os.path.isfile(path):
        return None
    for pkg, where in (("speculators", root), ("speculators.utils", os.path.join(root, "utils")),
                       ("speculators.losses", os.path.join(root, "losses"))):
        mod = types.ModuleType(pkg)
        mod.__path__ = [where]
        sys.modules[pkg] = mod
    util = types.ModuleType("speculators.utils.util")
    util.is_npu_available = lambda: False
    sys.modules["speculators.utils.util"] = util
    try:
        fspec = importlib.util.spec_from_file_location("speculators.losses.fused", path)
        fused = importlib.util.module_from_spec(fspec)
        sys.modules[fspec.name] = fused                   # Triton's jit reads the source by module
        fspec.loader.exec_module(fused)
    except Exception as exc:                              # no Triton, or a torch it cannot use
        for name in ("speculators.losses.fused", "speculators.utils.util", "speculators.losses",
                     "speculators.utils", "speculators"):
            sys.modules.pop(name, None)                   # no half-made module for the next call
        print(f"peer speculators: {path} did not load alone: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    fused.LOADED_ALONE = True
    return fused


def speculators_loss(name):
    fused = _speculators_fused()
    if fused is None:
        return None
    per_position = {"lk_alpha": "fused_nla_loss", "tv": "fused_tv_loss", "kl": "fused_kl_div_loss",
                    "lk_lambda": "fused_lk_hybrid_loss"}
    loss_fn = getattr(fused, per_position[name], None)
    if loss_fn is None:
        return None

    def run(z, target_logits):
        z = z.detach().requires_grad_(True)
        loss = loss_fn(z, target_logits).mean()
        loss.backward()
        return loss.detach(), z.grad.reshape(z.shape[1:])

    def prepare(z, p):                                # [1, N, V]: they take (batch, positions, vocab)
        return z[None], target_logits(p)[None]
    run.prepare = prepare
    return run


# --------------------------------------------------------------------------------------
# Liger-Kernel: the fused CE + TV from two logits tensors, and the plain TV op on probabilities


def _liger(module, name, label):
    """liger_kernel.ops.<module>.<name>, or None (said on stderr when Liger is installed but
    this does not import)."""
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("liger_kernel"):   # installed, but something it needs is not
            print(f"peer {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    except Exception as exc:                              # installed, but it does not import here
        print(f"peer {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def liger_fused(name):
    """TV or LK^alpha from Liger's fused CE + TV kernel, or None."""
    if name not in ("tv", "lk_alpha"):
        return None
    LigerFusedCETVDFunction = _liger("fused_ce_tvd", "LigerFusedCETVDFunction", "liger-fused")
    if LigerFusedCETVDFunction is None:
        return None
    torch = _torch()

    def run(z, target_logits, labels):
        z = z.detach().requires_grad_(True)
        _ce, tv = LigerFusedCETVDFunction.apply(z, target_logits, labels)
        loss = tv.mean() if name == "tv" else (-torch.log1p(-tv)).mean()
        loss.backward()
        return loss.detach(), z.grad

    def prepare(z, p):
        return z, target_logits(p), torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
    run.prepare = prepare
    return run


def liger_tv():
    LigerTVDLossFunction = _liger("tvd", "LigerTVDLossFunction", "liger-tvd")
    if LigerTVDLossFunction is None:
        return None

    def run(z, p):
        z = z.detach().requires_grad_(True)
        q = z.float().softmax(-1)
        loss = LigerTVDLossFunction.apply(q, p)      # batchmean: sum_v |q - p| / 2, mean over rows
        loss.backward()
        return loss.detach(), z.grad
    return run


def specforge_loss(name, eta=3.0):
    """SpecForge's KL / LK^alpha / LK^lambda, or None (no SpecForge, or no Triton)."""
    if name not in ("kl", "lk_alpha", "lk_lambda"):
        return None
    try:
        from specforge.core.lk_loss import compute_acceptance_rate, compute_lk_loss
        from specforge.core.loss import LogSoftmaxLoss
    except Exception as exc:
        if not isinstance(exc, ModuleNotFoundError) or not (exc.name or "").startswith("specforge"):
            print(f"peer specforge: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    torch = _torch()
    kind = {"kl": None, "lk_alpha": "alpha", "lk_lambda": "lambda"}[name]

    def run(z, p, mask):
        z = z.detach().requires_grad_(True)             # its KL kernel writes the gradient over z
        kl = LogSoftmaxLoss.apply(z, p, mask)
        if kind is None:
            loss = kl
        else:
            alpha, log_alpha = compute_acceptance_rate(logits=z, target_probs=p, position_mask=mask)
            loss = compute_lk_loss(kl_loss=kl, acceptance_rate=alpha, log_acceptance_rate=log_alpha,
                                   lk_loss_type=kind, kl_scale=1.0, kl_decay=eta)
        loss.backward()
        return loss.detach(), z.grad.reshape(z.shape[1:])

    def prepare(z, p, mask=None):                     # its own copy of z [1, N, V]; a mask [1, N, 1]
        m = torch.ones(z.shape[0]) if mask is None else torch.as_tensor(np.asarray(mask, np.float32))
        return z[None].clone(), p[None], m.reshape(1, -1, 1).to(device=z.device, dtype=torch.float32)
    run.prepare = prepare
    return run


def peers(backend: str, name: str) -> dict:
    """The peers available here for one loss on one backend: {label: (fn, kind)}."""
    out = {}
    if backend == "numpy":
        out["numpy-naive"] = (numpy_naive(name), "numpy")
        for label, compiled in (("torch-eager", False), ("torch-compile", True)):
            fn = torch_loss(name, compiled)
            if fn is not None:
                out[label] = (fn, "torch-cpu")
    else:
        for label, compiled in (("torch-eager", False), ("torch-compile", True)):
            fn = torch_loss(name, compiled)
            if fn is not None:
                out[label] = (fn, "torch-cuda")
        fn = speculators_loss(name)
        if fn is not None:
            out["speculators" if name != "lk_lambda" else "speculators λ/tok"] = (fn, "torch-cuda")
        fn = liger_fused(name)
        if fn is not None:
            out["liger-fused"] = (fn, "torch-cuda")
        fn = specforge_loss(name)
        if fn is not None:
            out["specforge" if name == "lk_alpha" else "specforge CE"] = (fn, "torch-cuda")
        fn = liger_tv() if name == "tv" else None
        if fn is not None:
            out["liger-tvd"] = (fn, "torch-cuda")
    return out
