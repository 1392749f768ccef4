"""Fast paths for the reduced losses, checked against lkref/losses.py (the specification).

NumPy (this file): the rows are cut into chunks small enough to stay in cache; every
chunk is worked on in place in the gradient's own memory plus a small float work buffer,
with one exp per element.  Chunks can run on several threads (NumPy releases the GIL
inside its loops).  Peak extra memory is the work buffers plus O(N), whatever N is.

q is formed with exactly the operations of losses.softmax_parts, so q and with it the tie
rule 1[q < p] agree with the reference bit for bit; alpha, S and the gradients agree to
rounding.
LK^alpha rows whose alpha is too small for 1/alpha (alpha < ALPHA_FLOOR) are recomputed
with the reference's log-space code, so disjoint supports stay exact here too.

Per chunk, with g the gradient rows (holding q after the softmax) and t a work buffer:

    g = exp((z - max z) / T) * (1 / sum)    q
    t = min(g, p)                           alpha = sum_v t
    t = 1[g < p]  (m as 0.0 / 1.0)          S = sum_v g t      (TV, LK^alpha, LK^lambda)
    TV:        g = q (S c - m c),  c = d / T
    LK^alpha:  g = q (S c - m c),  c = d / (alpha T)
    KL:        g = (q sum p - p) * d / T
    LK^lambda: g = lam * KL's + (1 - lam) * TV's
with d = w / sum w the weight of the row in the masked mean.  Row sums (_rowsum, and
_rowdot for S, which never writes q m) are einsum over blocks, then pairwise: they release
the GIL, which the other chunk threads wait for
(NumPy's matmul does not); masked selections are arithmetic on 0/1 floats, never np.where
or where=, which run many times slower on random masks (except in the float16 conversions,
_widen and _narrow, whose masks are mostly one-sided).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import losses as ref
from .backend import work_dtype
from .validation import (as_array, call_reduce, check_index_map, check_mask, check_real_scalar, check_target_sums,
                         check_vocab_axis, env_flag, target_sum_atol)

__all__ = ["numpy_loss", "ALPHA_FLOOR", "MIN_TEMPERATURE", "CHUNK_BYTES", "default_threads"]

#: LK^alpha rows with alpha below this go through the reference's log-space code.
ALPHA_FLOOR = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-290}
#: Temperatures below this go to the reference (numpy_loss returns None): the fast paths fold
#: d / (alpha T) into one factor per row, which overflows float32 for alpha near ALPHA_FLOOR
#: once T < 1 / (ALPHA_FLOOR * float32 max) ~ 3e-9, and then 0 * inf gives NaN where the
#: reference, dividing by T last, gives 0.
MIN_TEMPERATURE = 1e-8
#: Size of one chunk of float work rows: small enough to stay in cache over the chunk's
#: passes, large enough that its ~15 NumPy calls (each a GIL round trip) are few.  1.5 MiB
#: ran 5-12 % faster than 1 MiB on the 2-core CI machine, and as fast as 2 MiB.
CHUNK_BYTES = 3 << 19


def default_threads(elements: int) -> int:
    """LKREF_THREADS if set, else one thread per core (at most 8) for problems of 1M elements or more."""
    env = os.environ.get("LKREF_THREADS", "").strip()
    if env:
        if not (env.isdigit() and int(env) >= 1):      # "0", "-2", "1.5", "auto" ran on one thread, or a bare int()
            raise ValueError(f"LKREF_THREADS must be a whole number of threads, 1 or more, got {env!r}")
        return int(env)
    if elements < (1 << 20):
        return 1
    return max(1, min(8, os.cpu_count() or 1))


#: float16's smallest normal number, 2^-14.
HALF_TINY = np.float32(2.0 ** -14)


def _widen(dst, src):
    """dst[...] = src (float16, bfloat16, ...) in dst's float dtype; returns dst.

    float16 subnormals (below HALF_TINY: 96 % of a float16 softmax over 32 000 entries) by
    hand when they are most of src: NumPy converts them some 5 times slower than normal
    numbers (a float16 target, N = 64, V = 32 000, on the 2-core machine: 16 ms, against
    2.7 ms here), but where= costs more than it saves on a mix.  A subnormal is m 2^-24, m
    its 10 low bits: 0x3F000000 | m are the float32 bits of 0.5 + m 2^-24, and subtracting
    0.5 leaves m 2^-24 exactly.  Worked in dst's own memory: the only temporaries are two
    boolean masks."""
    if src.dtype != np.float16 or dst.dtype != np.float32:
        np.copyto(dst, src, casting="unsafe")
        return dst
    bits = src.view(np.uint16)
    sub = (bits & np.uint16(0x7C00)) == 0           # exponent 0: zero or subnormal
    if 4 * np.count_nonzero(sub) < 3 * sub.size:
        np.copyto(dst, src, casting="unsafe")
        return dst
    m = dst.view(np.uint32)
    np.copyto(m, bits)
    np.bitwise_and(m, np.uint32(0x3FF), out=m)
    np.bitwise_or(m, np.uint32(0x3F000000), out=m)
    np.subtract(dst, np.float32(0.5), out=dst)      # m 2^-24 (the normal entries are overwritten below)
    negative = bits >= np.uint16(0x8000)
    if negative.any():
        np.negative(dst, out=dst, where=negative)
    np.copyto(dst, src, casting="unsafe", where=~sub)
    return dst


def _narrow(dst, src, scratch):
    """dst[...] = src, rounded to dst's dtype as NumPy rounds it, bit for bit; src and
    scratch (float32, src's shape) are work memory and are overwritten.

    float32 to float16 by hand where float16 is subnormal: NumPy converts values below
    HALF_TINY (6.1e-5, where most entries of a gradient divided by N fall) some 25 times
    slower than others (N = 64, V = 32 000 on the 2-core machine: 133 ms, against 3 ms here).
    |x| + 0.5 rounds |x| to a multiple of 2^-24, to nearest even, as float16's subnormals
    are spaced; its float32 bits are then 0x3F000000 + m with |x| = m 2^-24 (m = 1024 where
    it rounds up to HALF_TINY), and m with x's sign bit is the float16.  where= is slower
    than 0/1 arithmetic on random masks, but these are mostly one-sided (a measured 3-21 ms
    against 133-75 ms here)."""
    if dst.dtype != np.float16 or src.dtype != np.float32:
        np.copyto(dst, src, casting="unsafe")
        return
    m = np.abs(src, out=scratch)
    tiny = m < HALF_TINY
    if not tiny.any():
        np.copyto(dst, src, casting="unsafe")
        return
    np.copyto(dst, src, casting="unsafe", where=~tiny)
    np.add(m, np.float32(0.5), out=m)
    m = m.view(np.uint32)
    np.subtract(m, np.uint32(0x3F000000), out=m)
    sign = src.view(np.uint32)
    np.right_shift(sign, np.uint32(16), out=sign)
    np.bitwise_and(sign, np.uint32(0x8000), out=sign)
    np.bitwise_or(m, sign, out=m)
    np.copyto(dst.view(np.uint16), m, casting="unsafe", where=tiny)


def _check_value_rows(zc, pc_full, pb, buf, errors):
    """The value checks of validation.py on one chunk, while it is in cache.

    Returns (max z, target row sums) (the softmax and KL need them), or None after recording
    the error (a row sum off by more than target_sum_atol is recorded in pb.sum_errs, for
    _raise_first).
    Each input gets one combined test, a Python float (few small NumPy calls: they hold the
    GIL that the other chunk threads wait for); the exact check runs only when it fails."""
    mx = zc.max(axis=1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        # a NaN or +inf shows in the max; a -inf in the row sum (one einsum, cheaper than a
        # min); a sum that overflows on huge finite logits is sent to the exact check
        if not math.isfinite(float(mx.sum()) + float(np.einsum("ij->i", zc).sum())) and not np.isfinite(zc).all():
            errors.append(ValueError("draft_logits contains non-finite values (NaN or inf)"))
            return None
        psum = _rowsum(pc_full)
        if not math.isfinite(float(psum.sum())) and not np.isfinite(pc_full).all():
            errors.append(ValueError("target_probs contains non-finite values (NaN or inf)"))
            return None
        if not float(pc_full.min()) >= 0:
            errors.append(ValueError("target_probs contains negative probabilities"))
            return None
        worst = float(np.abs(psum - 1).max())       # a sum that overflowed is off by inf
    pb.sum_errs.append(worst)
    if worst > pb.sum_atol:                     # _raise_first says so; computing on would only warn
        return None
    return mx, psum


class _Problem:
    """Everything the chunks share; built once per call after the cheap checks."""

    def __init__(self, name, z, p, mask, temperature, index, lam, eta, kl_scale, out):
        self.name = name
        self.wd = work_dtype(z.dtype, "draft_logits")
        self.lead, self.V = tuple(z.shape[:-1]), z.shape[-1]
        self.N = int(np.prod(self.lead)) if self.lead else 1
        self.z = z.reshape(self.N, self.V)
        self.p = p.reshape(self.N, p.shape[-1])
        self.index = index
        self.T = temperature
        self.w = (np.ones(self.N, self.wd) if mask is None
                  else np.asarray(mask).reshape(self.N).astype(self.wd))
        self.eta, self.kl_scale = eta, kl_scale
        self.out = out.reshape(self.N, self.V)
        self.direct = out.dtype == self.wd          # compute straight into out
        self.alias = np.shares_memory(out, z)
        self.need_kl = name in ("kl", "lk_lambda")
        self.need_tv = name in ("tv", "lk_alpha", "lk_lambda")
        rows = max(1, CHUNK_BYTES // (self.V * self.wd.itemsize))
        self.chunks = [(a, min(a + rows, self.N)) for a in range(0, self.N, rows)]
        # per-row results
        self.alpha = np.zeros(self.N, self.wd)
        self.S = np.zeros(self.N, self.wd)
        self.kl = np.zeros(self.N, self.wd)          # KL per row (KL and LK^lambda)
        self.psum_kl = np.zeros(self.N, self.wd)     # sum of the KL target per row (pass 1, for pass 2)
        self.pmass = np.ones(self.N, self.wd)        # target mass on the draft vocabulary
        self.losses = np.zeros(self.N, self.wd)
        self.sum_errs: list = []                      # worst |row sum - 1| per chunk
        self.fallback: dict = {}                      # chunk start -> LK^alpha rows in log space
        self.floor = ALPHA_FLOOR.get(self.wd, 1e-30)
        self.sum_atol = target_sum_atol(p.dtype)      # for the row sums, once, not per chunk
        # the floor of p in log p, as a row: NumPy 2.4's maximum with a scalar operand is not
        # vectorised (3.5x an add on the 2-core machine) and with a broadcast row it is
        self.tiny_row = np.full((1, self.V), np.finfo(self.wd).tiny, self.wd) if self.need_kl else None


class _Buffers:
    """One thread's work memory: a float chunk t, and g / z / p chunks only where needed."""

    def __init__(self, pb, rows):
        V, wd = pb.V, pb.wd
        self.t = np.empty((rows, V), wd)
        self.g = None if pb.direct else np.empty((rows, V), wd)   # out has another dtype
        self.z = np.empty((rows, V), wd) if pb.alias else None     # out is z: keep the logits
        self.p = None if pb.p.dtype == wd else np.empty((rows, pb.p.shape[-1]), wd)   # the target, widened


def _rows(pb: _Problem, buf: _Buffers, a, b, errors, check=True):
    """Chunk [a, b) in the work dtype: (zc, pc, pc_kl, max z, row sums of the full target);
    None after a failed value check (the last two are None without the check).

    pc is the target on the draft vocabulary (not renormalised), pc_kl the one KL uses."""
    n = b - a
    zc = pb.z[a:b]
    if zc.dtype != pb.wd:
        zc = zc.astype(pb.wd)
    elif pb.alias:
        np.copyto(buf.z[:n], zc)                    # out is z: keep the logits for the fallback
        zc = buf.z[:n]
    pc_full = pb.p[a:b]
    if pc_full.dtype != pb.wd:                      # once, for the check and the loss
        pc_full = _widen(buf.p[:n], pc_full)
    mx = psum = None
    if check:
        got = _check_value_rows(zc, pc_full, pb, buf, errors)
        if got is None:
            return None
        mx, psum = got
    pc = pc_full if pb.index is None else np.take(pc_full, pb.index, axis=1)
    pc_kl = pc
    if pb.index is not None:
        mass = pc.sum(axis=1)
        pb.pmass[a:b] = mass
        if pb.need_kl:
            pc_kl = pc / np.where(mass > 0, mass, 1)[:, None]
    return zc, pc, pc_kl, mx, psum


def _softmax_into(g, zc, T, mx=None, weights=None, scratch=None):
    """g = q = exp((z - max z) / T) * (1 / sum), the same operations as losses.softmax_parts.

    Returns (max z, sum, weights . x per row) with x = (z - max z) / T; the last is None
    without weights.  With weights, scratch (an array of g's shape) receives weights * x
    (it must be given then)."""
    if mx is None:
        mx = zc.max(axis=1, keepdims=True)
    np.subtract(zc, mx, out=g)
    if T != 1.0:
        np.divide(g, T, out=g)
    wx = None
    if weights is not None:
        with np.errstate(invalid="ignore"):
            wx = _rowsum(np.multiply(weights, g, out=scratch))
        if math.isnan(float(wx.sum())):          # 0 * -inf: x overflowed where the weight is 0;
            for r in np.nonzero(np.isnan(wx))[0]:   # such terms are 0 (0 log q = 0), as in the reference
                wx[r] = np.sum(np.where(weights[r] > 0, scratch[r], 0))
    np.exp(g, out=g)
    s = g.sum(axis=1, keepdims=True)
    np.multiply(g, 1 / s, out=g)
    return mx, s, wx


#: Row sums add blocks of this many values with einsum, then the block sums pairwise.
SUM_BLOCK = 256


def _rowsum(a, out=None):
    """sum_v a[i, v] for every row i, nearly as accurate as the reference's pairwise sums
    (float32: ~1e-7 relative, where one einsum over the row gives ~6e-7) and three times as
    fast as them (np.add.reduce).  Not a BLAS product with a vector of ones, as fast and as
    accurate: NumPy's matmul holds the GIL (numpy#11821) and so stalls the other chunk
    threads; einsum and add.reduce release it."""
    return _blocked_rows(a, out=out)


def _rowdot(a, b, out=None):
    """sum_v a[i, v] b[i, v] for every row i, summed as _rowsum sums (one pass, no product
    array: S = q . m is formed without writing u = q m)."""
    return _blocked_rows(a, b, out=out)


def _blocked_rows(*arrays, out=None):
    """sum_v of the product of arrays[.][i, v] per row: einsum over blocks of SUM_BLOCK
    columns, the block sums pairwise (np.add.reduce), the columns past the last block last."""
    n, V = arrays[0].shape
    k = V // SUM_BLOCK
    whole = ",".join(["ij"] * len(arrays)) + "->i"
    if k < 2:
        return np.einsum(whole, *arrays, out=out)
    cut = k * SUM_BLOCK
    head = np.einsum(",".join(["ijk"] * len(arrays)) + "->ij",
                     *(x[:, :cut].reshape(n, k, SUM_BLOCK) for x in arrays))
    total = np.add.reduce(head, axis=1, out=out)
    if cut < V:
        total += np.einsum(whole, *(x[:, cut:] for x in arrays))
    return total


def _mask(g, pc, t):
    """t = m = 1[q < p] as 0.0 / 1.0, the rule of S = q . m and of the gradient."""
    np.less(g, pc, out=t, casting="unsafe")


def _pass1(pb: _Problem, buf: _Buffers, a, b, errors):
    """q into the gradient rows g; per row alpha, S, KL; the LK^alpha fallback rows.

    Returns (pc, pc_kl, g), or None after a failed value check.  Leaves m = 1[q < p] in
    buf.t for TV, LK^alpha and LK^lambda."""
    got = _rows(pb, buf, a, b, errors)
    if got is None:
        return None
    zc, pc, pc_kl, mx, psum = got
    n = b - a
    g = pb.out[a:b] if pb.direct else buf.g[:n]
    t = buf.t[:n]
    # KL: sum_v p log q = sum_v p x - log s sum_v p, with x = (z - max z) / T <= 0 taken before
    # the exp (sum p z - max z sum p would cancel digits of the size of the logits)
    mx, s, px = _softmax_into(g, zc, pb.T, mx, weights=pc_kl if pb.need_kl else None, scratch=t)
    if pb.need_kl:
        if pb.index is None:                        # the target's row sums, from the check
            pb.psum_kl[a:b] = psum
        else:
            _rowsum(pc_kl, out=pb.psum_kl[a:b])
        psum_kl = pb.psum_kl[a:b]
        p_logq = px - np.log(s[:, 0]) * psum_kl
        np.maximum(pc_kl, pb.tiny_row, out=t)
        np.log(t, out=t)
        np.multiply(pc_kl, t, out=t)
        pb.kl[a:b] = _rowsum(t) - p_logq            # 0 log tiny = 0 where p = 0
    np.minimum(g, pc, out=t)
    _rowsum(t, out=pb.alpha[a:b])
    if pb.need_tv:
        _mask(g, pc, t)
        _rowdot(g, t, out=pb.S[a:b])
    if pb.name == "lk_alpha" and float(pb.alpha[a:b].min()) < pb.floor:
        low = np.nonzero((pb.pmass[a:b] > 0) & (pb.alpha[a:b] < pb.floor))[0]
        if len(low):                                # the reference's log space, at unit weight
            losses, cache = ref.lk_alpha_forward(zc[low], pc[low], temperature=pb.T)
            unit = ref.lk_alpha_backward(np.ones(len(low), pb.wd), cache)
            pb.fallback[a] = (low, losses, unit)
            pb.alpha[a + low] = cache["alpha"]
    return pc, pc_kl, g


def _pass2(pb: _Problem, buf: _Buffers, a, b, chunk, d, lam, mask_valid):
    """The gradient rows from q (in g) and the pass-1 row values; d = the rows' weights."""
    pc, pc_kl, g = chunk
    n = b - a
    t = buf.t[:n]
    T = pb.T
    if pb.need_tv:
        c_tv = d / T
        if pb.name == "lk_alpha":                   # rows under the floor: the fallback's, below
            c_tv = c_tv / np.maximum(pb.alpha[a:b], pb.floor)
        elif pb.name == "lk_lambda":
            c_tv = (1 - lam) * c_tv
        if not mask_valid:
            _mask(g, pc, t)
        # g = q (S - m) c_tv [+ q c_kl sum p] = q (S c_tv [+ c_kl sum p] - m c_tv)
        row = pb.S[a:b] * c_tv
        if pb.need_kl:
            c_kl = lam * d / T
            row = row + c_kl * pb.psum_kl[a:b]
        np.multiply(t, c_tv[:, None], out=t)
        np.subtract(row[:, None], t, out=t)
        np.multiply(g, t, out=g)
    if pb.name == "kl":
        c_kl = d / T
        np.multiply(g, (c_kl * pb.psum_kl[a:b])[:, None], out=g)
    if pb.need_kl:
        np.multiply(pc_kl, c_kl[:, None], out=t)
        np.subtract(g, t, out=g)                    # - p c_kl
    if a in pb.fallback:
        low, _, unit = pb.fallback[a]
        g[low] = unit * d[low, None]
    if not pb.direct:
        _narrow(pb.out[a:b], g, t)


def _run(pb: _Problem, threads: int, fn):
    """Apply fn(buffers, a, b) to every chunk, on `threads` threads, each with its own buffers.

    The threads are started at each call (some 0.3 ms on the 2-core machine), not kept in a
    pool: workers woken from a wait were put on one core after any pause between calls, and
    ran at one thread's speed (26-28 ms against 17 at N = 512); new threads go to idle cores.
    Nor does the calling thread take a share: with one thread started instead of two, calls
    after a 5 ms pause took 4.3-4.4 ms against 3.4-3.7 at N = 64, 7.6-8.0 against 5.6-5.8 at
    N = 128."""
    rows = pb.chunks[0][1] - pb.chunks[0][0] if pb.chunks else 0
    if threads <= 1 or len(pb.chunks) <= 1:
        buf = _Buffers(pb, rows)
        for a, b in pb.chunks:
            fn(buf, a, b)
        return

    def worker(group):
        buf = _Buffers(pb, rows)
        for a, b in group:
            fn(buf, a, b)
    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(worker, [pb.chunks[i::threads] for i in range(threads)]))


def numpy_loss(name, draft_logits, target_probs, *, mask=None, temperature=1.0, draft_to_target=None,
               eta=3.0, kl_scale=1.0, lam=None, out=None, threads=None, reduce=None):
    """The chunked NumPy path of a reduced loss; same arguments and result as losses.<name>.

    With a reduce hook the mean needs every row's loss before any gradient, so the rows take
    two passes (q waits in the gradient's memory between them); the hook is called in the
    same order as on the reference path: (LK^lambda) sum w alpha, then sum w loss.

    out: an array of draft_logits' shape and dtype, C-contiguous, to receive the gradient;
    it may be draft_logits itself.  threads: chunks run on this many threads
    (default: default_threads).
    """
    z = as_array(draft_logits, "draft_logits")
    wd = work_dtype(z.dtype, "draft_logits")
    check_vocab_axis(z, "draft_logits")
    p = as_array(target_probs, "target_probs")
    work_dtype(p.dtype, "target_probs")
    lead, V = tuple(z.shape[:-1]), z.shape[-1]
    if draft_to_target is None:
        if tuple(p.shape) != lead + (V,):
            raise ValueError(f"target_probs must have shape {lead + (V,)}, got {tuple(p.shape)}")
        index = None
    else:
        check_vocab_axis(p, "target_probs")
        if tuple(p.shape[:-1]) != lead:
            raise ValueError(f"target_probs must have the leading shape {lead} of draft_logits, got {tuple(p.shape)}")
        index = np.asarray(check_index_map(draft_to_target, "draft_to_target", V, p.shape[-1]))
    mask = check_mask(mask, "mask", lead, wd)
    T = check_real_scalar(temperature, "temperature", low=0, low_inclusive=False)
    if T < MIN_TEMPERATURE:
        return None
    out = check_out(out, z, p, mask)
    pb = _Problem(name, z, p, mask, T, index, lam, eta, kl_scale, out)
    threads = default_threads(pb.N * V) if threads is None else max(1, int(threads))
    errors: list = []
    if (name == "lk_lambda" and lam is None) or index is not None or reduce is not None:
        # lambda, the weights (rows without target mass drop out) or the all-reduced mean need
        # every row's pass 1 before any gradient
        _run(pb, threads, lambda buf, a, b: _pass1(pb, buf, a, b, errors))
        _raise_first(pb, errors)
        w = _weights(pb)
        lam_v = _lambda(pb, w, lam, reduce)
        loss, scale = _loss(pb, w, lam_v, reduce)
        d = w * scale

        def second(buf, a, b):
            if pb.direct:                           # q is waiting in out
                _, pc, pc_kl, _, _ = _rows(pb, buf, a, b, errors, check=False)
                chunk = (pc, pc_kl, pb.out[a:b])
            else:                                   # q lived in a buffer: form it again
                zc, pc, pc_kl, _, _ = _rows(pb, buf, a, b, errors, check=False)
                _softmax_into(buf.g[:b - a], zc, pb.T)          # q again; the sums are known
                chunk = (pc, pc_kl, buf.g[:b - a])
            _pass2(pb, buf, a, b, chunk, d[a:b], lam_v, mask_valid=False)
        _run(pb, threads, second)
    else:
        w = _weights(pb)
        lam_v = None if lam is None else float(lam)
        count = float(w.sum())
        d = w * (1 / count if count > 0 else 0)

        def one(buf, a, b):
            chunk = _pass1(pb, buf, a, b, errors)
            if chunk is not None:
                _pass2(pb, buf, a, b, chunk, d[a:b], lam_v, mask_valid=True)
        _run(pb, threads, one)
        _raise_first(pb, errors)
        loss, _ = _loss(pb, w, lam_v, None)
    result_lam = np.asarray(lam_v, dtype=wd) if name == "lk_lambda" else None
    return ref.LossResult(loss, out, pb.alpha.reshape(lead), result_lam)


def check_out(out, z, p, mask, same_backend=False):
    """None -> a new array; else out must be z's shape and dtype, C-contiguous, writeable,
    and share memory with nothing but (all of) draft_logits.  same_backend: out is of z's
    array type (CuPy for CuPy); otherwise a NumPy array."""
    if out is None:
        return np.empty(z.shape, z.dtype)
    kind_ok = type(out) is type(z) if same_backend else isinstance(out, np.ndarray)
    if not kind_ok or tuple(out.shape) != tuple(z.shape) or out.dtype != z.dtype:
        raise ValueError(f"out must be an array of shape {tuple(z.shape)} and dtype {z.dtype} "
                         "on the backend of draft_logits")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not getattr(out.flags, "writeable", True):     # CuPy has no flag
        raise ValueError("out is read-only")
    if p is not None:
        if _overlap(out, p) or (mask is not None and _overlap(out, mask)):
            raise ValueError("out may share memory with draft_logits only")
        if _overlap(out, z) and not (z.flags.c_contiguous and _bounds(out)[0] == _bounds(z)[0]):
            raise ValueError("out overlaps draft_logits without being the same array")
    return out


def _bounds(a):
    """[first byte, last byte + 1) of an array's memory, for NumPy and CuPy arrays alike."""
    ptr = a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr
    lo = hi = ptr
    for n, st in zip(a.shape, a.strides):
        if n == 0:
            return ptr, ptr
        lo += min(0, (n - 1) * st)
        hi += max(0, (n - 1) * st)
    return lo, hi + a.itemsize


def _overlap(a, b) -> bool:
    if not hasattr(b, "shape") or type(b) is not type(a):
        return False
    if isinstance(a, np.ndarray):
        return bool(np.shares_memory(a, b))
    (a0, a1), (b0, b1) = _bounds(a), _bounds(b)
    return a0 < b1 and b0 < a1


#: Whether impl="auto" takes the CuPy kernels (fused_cupy.py): yes since the GPU tests passed on
#: an H100 (bench/results/gpu-NVIDIA-H100-80GB-HBM3-run2-35dc2c3-tests.txt: 175 of 175; the
#: kernels have changed since, checked on the CPU stand-in and by NVRTC, and at first use by
#: CUPY_SELF_CHECK); LKREF_CUPY_FUSED=1 or 0 overrides it.
CUPY_FUSED_BY_DEFAULT = True


def cupy_fused_by_default() -> bool:
    flag = env_flag("LKREF_CUPY_FUSED")
    return CUPY_FUSED_BY_DEFAULT if flag is None else flag


#: Whether impl="auto" checks each CuPy kernel variant against the readable path at its first use
#: in a process (lkref/self_check.py), and takes the readable path for one that fails: their
#: source has changed since the H100 run, and no other GPU has run them.  LKREF_CUPY_SELF_CHECK=1
#: or 0 overrides it; impl="fused" never checks.
CUPY_SELF_CHECK = True


def cupy_self_check() -> bool:
    flag = env_flag("LKREF_CUPY_SELF_CHECK")
    return CUPY_SELF_CHECK if flag is None else flag


def dispatch(name, draft_logits, target_probs, *, out=None, required=False, **options):
    """The fast path for these arrays, or None (then the caller runs the reference)."""
    from .backend import is_cupy_array

    if is_cupy_array(draft_logits):
        if not (required or cupy_fused_by_default()):
            return None
        from .fused_cupy import cupy_loss

        return cupy_loss(name, draft_logits, target_probs, out=out, check=not required and cupy_self_check(), **options)
    return numpy_loss(name, draft_logits, target_probs, out=out, **options)


def _raise_first(pb, errors):
    if errors:
        raise errors[0]
    check_target_sums(max(pb.sum_errs, default=0.0), pb.p.dtype)


def _weights(pb):
    return np.where(pb.pmass > 0, pb.w, 0) if pb.index is not None else pb.w


def _mean(pb, w, values, reduce):
    """(mean, 1 / count) of the rows' values with weights w, over all ranks when reduce is given."""
    # a row of weight 0 adds nothing, even when its loss is infinite (as losses.mean_forward)
    total, count = np.asarray(np.dot(w, np.where(w > 0, values, 0)), pb.wd), np.asarray(w.sum(), pb.wd)
    if reduce is not None:
        total, count = call_reduce(reduce, total, count)
    scale = 1 / float(count) if float(count) > 0 else 0.0
    return float(total) * scale, scale


def _lambda(pb, w, lam, reduce):
    if pb.name != "lk_lambda":
        return None
    if lam is not None:
        return float(lam)
    mean_alpha, _ = _mean(pb, w, pb.alpha, reduce)
    return float(ref.lambda_from_alpha(np.asarray(mean_alpha, pb.wd), eta=pb.eta, kl_scale=pb.kl_scale))


def _loss(pb, w, lam, reduce):
    """(the mean loss as a 0-d array, 1 / count) from pass 1's row values."""
    live = pb.pmass > 0
    if pb.name == "kl":
        per = pb.kl
    elif pb.name == "tv":
        per = 1 - pb.alpha
    elif pb.name == "lk_alpha":
        per = -np.log(np.where(pb.alpha > 0, pb.alpha, 1))
        for a, (low, losses, _) in pb.fallback.items():
            per[a + low] = losses                     # the log-space loss of the fallback rows
    else:
        per = (lam * pb.kl if lam != 0 else 0) + (1 - lam) * (1 - pb.alpha)     # lam = 0: no KL, even inf
    per = np.where(live, per, 0)
    pb.losses = per
    mean, scale = _mean(pb, w, per, reduce)
    return np.asarray(mean, dtype=pb.wd), scale
