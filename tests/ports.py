"""Independent NumPy ports of the losses, written from the SPEC without lkref, with switches
for the mistakes earlier ports made.  The correct one must pass the conformance kit; each
wrong one must fail it, with a message naming the mistake."""

from __future__ import annotations

import numpy as np


def make_port(mistake=None, clamp=1e-8):
    """A port; `mistake` one of conformance.VARIANTS' names or None; `clamp` the floor of
    'clamped_alpha'."""
    def softmax(z, T):
        x = (z - z.max(-1, keepdims=True)) / T
        e = np.exp(x)
        return e / e.sum(-1, keepdims=True), x - np.log(e.sum(-1, keepdims=True))

    def rounded(x, half):                                   # x rounded to the 2-byte type, in float64
        if half == "float16":
            return x.astype(np.float16).astype(np.float64)
        b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32).astype(np.float64)

    def parts(z, p, T, half=None):
        q, logq = softmax(z, T)
        if mistake == "half_softmax" and half:              # q as a softmax in the inputs' 2-byte type returns it
            q = rounded(q, half)
            with np.errstate(divide="ignore"):
                logq = np.log(q)
        m = (q <= p) if mistake == "loose_ties" else (q < p)
        mw = m + 0.5 * (q == p) if mistake == "half_ties" else m   # torch.minimum's gradient: half at ties
        mq = q * mw
        alpha = np.where(m, q, p).sum(-1)
        with np.errstate(divide="ignore"):
            log_alpha = np.log(np.where(m, q, p).sum(-1)) if mistake == "clamped_alpha" else \
                np.logaddexp.reduce(np.where(m, logq, np.log(np.where(p > 0, p, 1e-300)) + np.where(p > 0, 0, -np.inf)), -1)
        S = mq.sum(-1, keepdims=True)
        dalpha = q * (mw - S) / T                           # d alpha_t / d z_t
        return q, logq, mw, alpha, log_alpha, dalpha

    def port(loss, draft_logits, target_probs, mask=None, temperature=1.0, draft_to_target=None,
             eta=3.0, kl_scale=1.0, case_dtype=None):
        half = case_dtype if case_dtype in ("bfloat16", "float16") else None
        z = np.asarray(draft_logits, np.float64)
        p_full = np.asarray(target_probs, np.float64)
        T = temperature
        N = z.shape[0]
        w = np.ones(N) if mask is None else np.asarray(mask, np.float64)
        if draft_to_target is not None:
            p = p_full[:, draft_to_target]
            mass = p.sum(-1)
            if mistake != "massless_rows_kept":
                w = np.where(mass > 0, w, 0)
            if mistake == "argmax_outside_dropped":          # SpecForge's rule
                w = np.where(np.isin(p_full.argmax(-1), draft_to_target), w, 0)
            p_kl = p / np.where(mass > 0, mass, 1)[:, None]
            if mistake == "renormalised_alpha":
                p = p_kl
            if mistake == "unrenormalised_kl":
                p_kl = p
        else:
            p, p_kl = p_full, p_full
        d = w / len(w) if mistake == "mean_over_all" else w / w.sum()
        q, logq, m, alpha, log_alpha, dalpha = parts(z, p, T, half)
        if mistake == "l1_as_tv":                           # TV as sum |p - q|, alpha as 1 minus it
            alpha, dalpha = 2 * alpha - 1, 2 * dalpha
            with np.errstate(invalid="ignore", divide="ignore"):
                log_alpha = np.log(alpha)
        logq_kl = rounded(logq, half) if mistake == "half_log_softmax" and half else logq   # log_softmax in 2 bytes
        if mistake == "clamped_alpha":
            log_alpha = np.log(np.maximum(alpha, clamp))
        if mistake == "zero_alpha_as_zero":                 # where(alpha > 0, log(clamp(alpha, tiny)), 0)
            with np.errstate(divide="ignore"):
                log_alpha = np.where(alpha > 0, np.log(np.maximum(alpha, np.finfo(np.float64).tiny)), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_t = np.sum(np.where(p_kl > 0, p_kl * (np.log(np.where(p_kl > 0, p_kl, 1)) - logq_kl), 0), -1)
        dkl = (q - p_kl) / T
        if mistake == "soft_cross_entropy":                 # -sum p log q: KL + H(p), the same gradient
            with np.errstate(divide="ignore", invalid="ignore"):
                kl_t = np.sum(np.where(p_kl > 0, -p_kl * logq_kl, 0), -1)
        if mistake == "kl_mean_over_vocab":                 # kl_div(reduction="mean"): over N * V entries
            kl_t, dkl = kl_t / z.shape[1], dkl / z.shape[1]
        if mistake == "unrenormalised_kl":                  # autograd's gradient of that KL: q sum p - p
            dkl = (q * p_kl.sum(-1, keepdims=True) - p_kl) / T
        tv_t = 1 - alpha
        if loss == "kl":
            return np.dot(d, kl_t), d[:, None] * dkl, alpha
        if loss == "tv":
            return np.dot(d, tv_t), -d[:, None] * dalpha, alpha
        if loss == "lk_alpha":
            if mistake == "log_of_mean":
                a = np.dot(d, alpha)
                return -np.log(a), -d[:, None] * dalpha / a, alpha
            live = w > 0
            if mistake == "l1_as_tv":
                with np.errstate(invalid="ignore", divide="ignore"):
                    return np.dot(d, np.where(live, -log_alpha, 0)), -(d / alpha)[:, None] * dalpha, alpha
            if mistake == "clamped_alpha":
                inv = 1 / np.maximum(alpha, clamp) * (alpha >= clamp)
                return np.dot(d, np.where(live, -log_alpha, 0)), -(d * inv)[:, None] * dalpha, alpha
            if mistake == "zero_alpha_as_zero":
                live = live & (alpha > 0)
            # 1/alpha in log space: r = m q / alpha, the gradient is -(r - q sum r) / T
            la = np.where(live, log_alpha, 0)[:, None]
            r = np.where(m > 0, m * np.exp(np.minimum(logq - la, 0)), 0)
            grad = -(d * live)[:, None] * (r - q * r.sum(-1, keepdims=True)) / T
            return np.dot(d, np.where(live, -log_alpha, 0)), grad, alpha
        # lk_lambda
        if mistake == "per_token_lambda":
            lam = kl_scale * np.exp(-eta * alpha)
            return (np.dot(d, lam * kl_t + (1 - lam) * tv_t),
                    d[:, None] * (lam[:, None] * dkl - (1 - lam)[:, None] * dalpha), alpha)
        lam = kl_scale * np.exp(-eta * (alpha.mean() if mistake == "unmasked_lambda" else np.dot(d, alpha)))
        loss_v = lam * np.dot(d, kl_t) + (1 - lam) * np.dot(d, tv_t)
        grad = d[:, None] * (lam * dkl - (1 - lam) * dalpha)
        if mistake == "no_stop_gradient":
            dlam = -eta * lam * d[:, None] * dalpha          # d lam / d z through mean alpha
            grad = grad + dlam * (np.dot(d, kl_t) - np.dot(d, tv_t))
        return loss_v, grad, alpha

    if mistake != "missing_temperature":
        return port

    def no_one_over_t(loss, draft_logits, target_probs, temperature=1.0, **kw):
        value, grad, alpha = port(loss, draft_logits, target_probs, temperature=temperature, **kw)
        return value, grad * temperature, alpha             # the softmax's 1/T left out of the gradient

    return no_one_over_t
