"""python -m lkref bench: check every fast path against the readable path, then time it.

For each backend x loss x size: build fp32 draft logits z [N, V] and target probabilities
p [N, V]; check each path against impl="reference" (loss, alpha, gradient; the gradient's
memory filled with NaN first, so that an entry left unwritten shows, and a NaN matches nothing); time
forward + backward (perf_counter on the CPU, in interleaved rounds over the block's
implementations so that ratios survive a noisy machine; CUDA events on a GPU, one
implementation after the other) and report p20 / p50 /
p80, the effective bandwidth (read z, read p, write the gradient: 12 N V bytes), its share
of the measured copy bandwidth, the time that bandwidth allows, and the peak extra memory.
Peers from the checkout's bench/peers.py run in the same process on the same data, when
their libraries are installed.  Rows go to a CSV stamped with the machine, the versions
and the git sha.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from .backend import cupy_available, fill_nan, namespace, nan_allocations, to_numpy
from .positions import LOSSES
from .self_check import off_ties

DEFAULT_SIZES = {"numpy": [(512, 32_000)], "cupy": [(4096, 32_000), (4096, 128_256)]}
#: Largest relative difference from the readable path at which a fast path is still timed
#: (float32 logits and target; see tolerance() for the others).
TOLERANCE = 1e-4
#: The input dtypes the benchmark can run (logits and target alike; bfloat16 needs ml_dtypes).
DTYPES = ("float32", "float16", "bfloat16")
QUICK_SIZES = {"numpy": [(128, 32_000)], "cupy": [(4096, 32_000)]}


@dataclass
class Row:
    backend: str
    impl: str
    loss: str
    N: int
    V: int
    p20_ms: float
    p50_ms: float
    p80_ms: float
    gbps: float
    pct_copy_bw: float
    limit_ms: float
    peak_extra_mib: float
    max_rel_err: float
    vs_baseline: float = float("nan")
    extra: dict = field(default_factory=dict)
    dtype: str = "float32"


def machine_name(backend: str) -> str:
    if backend == "cupy":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else name
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def git_sha() -> str:
    """The checkout's short sha; LKREF_GIT_SHA where the copy has no .git (a device machine)."""
    if os.environ.get("LKREF_GIT_SHA"):
        return os.environ["LKREF_GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def load_peers():
    """bench/peers.py from the checkout (cwd, or beside the package); None if absent."""
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        path = os.path.join(root, "bench", "peers.py")
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("lkref_bench_peers", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    return None


def make_problem(xp, N, V, seed=0, dtype="float32"):
    """Logits and a peaked target (most mass on a few tokens), like a language model's, made in
    float32 and both rounded to dtype (one of DTYPES)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, V), dtype=np.float32) * 2).astype(np.float32)
    logits = rng.standard_normal((N, V), dtype=np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    z, p = xp.asarray(z), xp.asarray(p)
    if dtype != "float32":      # on the GPU where there is one: NumPy rounds into float16's subnormals slowly
        dt = np_dtype(dtype)
        z, p = z.astype(dt), p.astype(dt)
    return z, p


def np_dtype(name):
    """The NumPy dtype of one of DTYPES (bfloat16: ml_dtypes', an ImportError without it)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def tolerance(dtype) -> float:
    """TOLERANCE, or for a 2-byte gradient its rounding: the fast path and the reference each
    round to it, so they may differ by one unit in the last place of the largest entry (eps)."""
    if np_dtype(dtype).itemsize >= 4:
        return TOLERANCE
    return 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10


def copy_bandwidth(xp, nbytes=256 << 20) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    a = xp.ones(nbytes // 4, dtype=xp.float32)
    b = xp.empty_like(a)
    times = timed(xp, lambda: xp.copyto(b, a), repeat=5, warmup=1)
    return 2 * a.nbytes / (np.median(times) / 1e3)


def timed(xp, fn, repeat, warmup=2):
    """Milliseconds per call: CUDA events on CuPy, perf_counter on NumPy."""
    for _ in range(warmup):
        fn()
    once = _stopwatch(xp, fn)
    return [once() for _ in range(repeat)]


def peak_extra(xp, fn, result_bytes) -> float:
    """Peak memory allocated during fn beyond its result's gradient, in MiB."""
    if xp is np:
        tracemalloc.start()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return max(0, peak - result_bytes) / 2**20
    # the pool's cached free blocks first handed back, so that what it holds after fn (in use or
    # cached) is what fn needed at its peak (CuPy keeps no peak count); used_bytes() before and
    # total_bytes() after counted another call's cached blocks (256 MiB in the first GPU run).
    # Small arrays that fit the free room of a chunk the pool keeps for live arrays do not
    # show: below a MiB this is a lower bound (the fused path's 36 bytes a row read 0.0).
    pool = xp.get_default_memory_pool()
    xp.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    fn()
    xp.cuda.Device().synchronize()
    return max(0, pool.total_bytes() - before - result_bytes) / 2**20


def rel_err(a, b, keep=None) -> float:
    """max |a - b| / max |b|, over the entries where keep is True (all without keep).  With b a
    float32 or float64 CuPy array, on the device (a may be a torch CUDA tensor): at N = 4096,
    V = 128 256 the host would copy and widen 4 GB per comparison."""
    xp = namespace(b)
    if xp is np or np.dtype(b.dtype) not in (np.float32, np.float64):
        xp, a, b = np, to_numpy(a), to_numpy(b)
        keep = None if keep is None else to_numpy(keep)
    else:
        a = xp.asarray(a)                     # a CuPy array, or a torch CUDA tensor (__cuda_array_interface__)
        keep = None if keep is None else xp.asarray(keep)
    if b.size == 0:
        return 0.0
    a, b = a.astype(xp.float64), b.astype(xp.float64)
    scale = max(float(xp.max(xp.abs(b))), 1e-30)
    d = xp.abs(a - b)
    if keep is not None:
        d = xp.where(keep, d, 0)
    worst = float(xp.max(d))
    return worst / scale if not math.isnan(worst) else math.inf     # a NaN entry matches nothing


def _entries(xp, backend, fn, loss, z, p, out, N, V):
    """(label, call, allocates a new gradient) for lkref's own paths on this backend."""
    if backend == "numpy":
        entries = [("lkref", lambda: fn(z, p), True), ("lkref out=", lambda: fn(z, p, out=out), False)]
    else:
        entries = [("lkref fused", lambda: fn(z, p, impl="fused"), True),
                   ("lkref fused out=", lambda: fn(z, p, impl="fused", out=out), False)]
        if loss == "lk_lambda":
            entries.append(("lkref fused lam=", lambda: fn(z, p, impl="fused", lam=0.5), True))
        if loss in ("lk_alpha", "lk_lambda") and z.dtype == np.float32:      # persistent grids, one launch
            lam = 0.5 if loss == "lk_lambda" else None
            tail = " lam=" if lam else ""
            for threads, share in PIPE_SHAPES:
                if _pipelines(V, threads, share):
                    entries.append((pipe_label(threads, share) + tail,
                                    _shaped(fn, z, p, out, threads, share, lam=lam, pipeline=True), False))
            entries.append((AHEAD_LABEL + tail, _shaped(fn, z, p, out, lam=lam, l2_ahead=True), False))
            for frac in LEAD_FRACTIONS:
                entries.append((lead_label(frac) + tail, _shaped(fn, z, p, out, lam=lam, l2_lead=frac), False))
        if loss in ("kl", "lk_lambda") and z.dtype == np.float32:    # one launch each (lam= for LK^lambda)
            lam = 0.5 if loss == "lk_lambda" else None
            entries.append((LOGF_LABEL + (" lam=" if lam else ""), _shaped(fn, z, p, out, lam=lam, fast_log=False), False))
        if loss == "lk_alpha" and z.dtype == np.float32:   # launch shapes to tune the defaults with
            for threads, share, cache in TUNING_SHAPES:
                entries.append((shape_label(threads, share, cache), _shaped(fn, z, p, out, threads, share, cache), False))
            entries.append((GENERIC_LABEL, _shaped(fn, z, p, out, specialize=False), False))
            entries.append((EXPF_LABEL, _shaped(fn, z, p, out, exp2=False), False))
            entries.append((SCALAR_LABEL, _shaped(fn, z, p, out, vec=False), False))
            for threads in STREAM_THREADS:
                entries.append((f"fused stream {threads}t", _shaped(fn, z, p, out, threads, stream=True), False))
            if _meets_on_this_gpu(xp, V) is False:     # what GPUs without clusters run, timed on this one
                entries.append((MEETING_LABEL, _shaped(fn, z, p, out, clusters=False), False))
        if loss == "lk_alpha" and z.dtype != np.float32:   # 2-byte logits one column at a time: a 2-byte
            entries.append((SCALAR_LABEL, _shaped(fn, z, p, out, vec=False), False))   # target kept at first read
        if loss == "lk_alpha" and p.dtype.itemsize == 2:   # ... or copied in pairs as the launch starts
            entries.append((PAIRS_LABEL, _shaped(fn, z, p, out, vec=False, pair_prefetch=True), False))
    if N * V <= 512 * 32_000 or backend == "cupy":
        entries.append(("lkref reference", lambda: fn(z, p, impl="reference"), True))
    return entries


#: (threads per block, floats of a row per block, target cache) tried for LK^alpha on CuPy,
#: beside the default (512, 16 384, True: two blocks of 64 registers per thread fit an SM;
#: V = 32 000 takes clusters of 2, V = 128 256 of 8), fastest of these on the H100, whose
#: first default was (512, 32 768, True): 1.4x slower there, one block per SM.  (256 threads
#: at 32 768 floats would need 125 logits and 255 registers per thread: one block of 8 warps
#: per SM, and 15 s of NVRTC per variant.)  (256, 8 192, True) holds as many logits an SM as
#: the default, in 4 blocks of 8 warps instead of 2 of 16 (clusters of 4 at V = 32 000; at
#: V = 128 256 it streams): run 2's profile found a block's phases (read, reduce, statistics,
#: write) one after another with the memory idle between them, and more blocks an SM, each in a
#: phase of its own, may keep it busier (untimed).
TUNING_SHAPES = [(512, 32_768, True), (512, 16_384, False), (1024, 32_768, True), (1024, 16_384, True),
                 (256, 16_384, True), (256, 8_192, True)]


#: Threads per block of the streamed rows the benchmark times beside the shapes ("fused stream
#: <T>t": fused_cupy.STREAM, every row read from memory in each phase, with small looping code).
STREAM_THREADS = (512, 1024)
GENERIC_LABEL = "fused generic-mode"
#: The default kernel with expf for each element's exp (fused_cupy.EXP2 off), as run 2 had it
#: (with the IEEE division by T, which the kernels no longer take): what exp2f saves.
EXPF_LABEL = "fused expf"
#: The default kernel with one column every THREADS for each thread (fused_cupy.VEC off), as run 2
#: had it: what the accesses of 4 adjacent columns save (16 bytes of float32, 8 of a 2-byte type,
#: whose target is then kept in shared memory at its first read).
SCALAR_LABEL = "fused scalar"
#: KL, and LK^lambda with lam= (one launch), with logf for every log p of the KL sums
#: (fused_cupy.FAST_LOG off, as run 2 had it): what __logf below p = 0.5 saves.
LOGF_LABEL = "fused logf"


#: LK^alpha, and LK^lambda with lam=, on a persistent grid whose blocks copy the logits and the
#: target of the rows ahead into shared memory (fused_cupy.PIPELINE), in these (threads, floats
#: a block), where its rows fit clusters of up to 8 (V = 32 000: 4): 16 warps an SM, or 32 with
#: half the entries a thread, should the pipelined kernel wait on its own instructions.
PIPE_SHAPES = ((512, 8_192), (1024, 8_192))
#: The same, at the default shape, with L2 asked for each block's next row instead of stages in
#: shared memory (fused_cupy.L2_AHEAD): both goal sizes.
AHEAD_LABEL = "fused L2 ahead"
#: The default grid (a block, or cluster, a row) with each block asking L2 for its share of a
#: row ahead as it starts (fused_cupy.L2_LEAD): that many of the rows the GPU holds at once, a
#: quarter, half and all of them (on an H100 at V = 32 000: 33, 66 and 132 rows, 8, 17 and 33 MiB
#: of its 50 MiB L2 asked for ahead); both goal sizes.
LEAD_FRACTIONS = (0.25, 0.5, 1.0)


def lead_label(frac):
    """The benchmark's name for the default grid with fused_cupy.L2_LEAD = frac, e.g. 'fused L2 lead 0.25'."""
    return f"fused L2 lead {frac:g}"


def pipe_label(threads, share):
    """The benchmark's name for the pipelined grid in a shape, e.g. 'fused pipelined 512t/8k'."""
    return f"fused pipelined {threads}t/{share // 1024}k"


def _pipelines(V, threads, share):
    """Whether a row of V takes registers and a cluster (not streamed) at this shape."""
    from . import fused_cupy
    with fused_cupy.configured(threads=threads, block_share=share):
        return fused_cupy.plan(V)[0] > 0


def shape_label(threads, share, cache):
    """The benchmark's name for a launch shape, e.g. 'fused 512t/16k'."""
    return f"fused {threads}t/{share // 1024}k" + ("" if cache else " nocache")


MEETING_LABEL = "fused global-meet"
#: A 2-byte target copied to shared memory in 4-byte pairs as the launch starts (PAIR_PREFETCH),
#: one column at a time: with VEC it is copied 4 entries at a time instead.
PAIRS_LABEL = "fused 2-byte pairs"


def _meets_on_this_gpu(xp, V):
    """None where a row of V has one block; else whether this GPU's blocks meet in global
    memory rather than in a cluster.  Where they form a cluster, the benchmark also times them
    meeting in memory, as GPUs without clusters run them: what that exchange costs."""
    from . import fused_cupy
    if fused_cupy.plan(V)[1] == 1:
        return None
    return not fused_cupy._uses_clusters(xp)


def _shaped(fn, z, p, out, threads=None, share=None, cache=None, lam=None, **switches):
    """The fused call in another launch shape, or with fused_cupy.configured's on/off switches
    (lam: LK^lambda's given lambda, for one launch)."""
    from . import fused_cupy
    given = {} if lam is None else {"lam": lam}

    def call():
        with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache, **switches):
            return fn(z, p, impl="fused", out=out, **given)
    return call


def run(backends=("numpy",), losses=tuple(LOSSES), sizes=None, repeat=10, with_peers=True, say=print,
        skip_peers=(), only_peers=None, csv_path=None, dtype="float32"):
    """sizes: a list of (N, V) for every backend, or a dict backend -> list (default DEFAULT_SIZES).

    csv_path: each block's rows are appended there as soon as the block is done, so a run
    stopped by a time limit keeps what it measured.  dtype: the logits' and the target's (the
    gradient's too; the peers get the same values, as torch tensors of that dtype where they
    take torch's; those that take target logits get log p in it)."""
    itemsize = np_dtype(dtype).itemsize
    sizes = DEFAULT_SIZES if sizes is None else sizes
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())     # the run's, on every CSV row
    import lkref
    say(f"== lkref {lkref.__version__}, git {git_sha()}, {stamp}")
    rows = []
    peer_mod = load_peers() if with_peers else None
    for backend in backends:
        if backend == "cupy" and not cupy_available():
            say("cupy: not available (CuPy with a CUDA device), skipped")
            continue
        xp = np if backend == "numpy" else sys.modules["cupy"]
        bw = copy_bandwidth(xp)
        say(f"{backend} on {machine_name(backend)}: measured copy bandwidth {bw / 1e9:.1f} GB/s")
        for N, V in (sizes[backend] if isinstance(sizes, dict) else sizes):
            try:
                z, p = make_problem(xp, N, V, dtype=dtype)
            except (TypeError, ValueError) as exc:        # a CuPy without bfloat16 arrays
                say(f"{backend}: no {dtype} arrays here ({type(exc).__name__}: {exc}), skipped")
                break
            nbytes = 3 * N * V * itemsize
            limit_ms = nbytes / bw * 1e3
            for loss in losses:
                fn = LOSSES[loss]
                ref = fn(z, p, impl="reference")
                out = xp.empty_like(z)
                keep = off_ties(loss, z, p)
                cands = _lkref_candidates(xp, backend, fn, loss, z, p, out, N, V, ref, say, tolerance(dtype), keep)
                if peer_mod is not None:
                    cands += _peer_candidates(peer_mod, xp, backend, loss, z, p, ref, say, skip_peers, only_peers,
                                              keep)
                del keep
                for c, t in zip(cands, _time_all(xp, backend, cands, repeat, say)):
                    if t is None:
                        continue
                    try:
                        mem = c.mem()
                    except Exception:                   # a peer whose memory cannot be read: unknown
                        mem = float("nan")
                    rows.append(_row(backend, c.label, loss, N, V, t, nbytes, bw, limit_ms, mem, c.err, dtype))
                    if backend == "cupy":
                        xp.get_default_memory_pool().free_all_blocks()
                base_name = "numpy-naive" if backend == "numpy" else "lkref reference"
                base = next((r for r in rows if r.backend == backend and r.loss == loss and r.N == N
                             and r.V == V and r.impl == base_name), None)
                for r in rows:
                    if r.backend == backend and r.loss == loss and r.N == N and r.V == V and base is not None:
                        r.vs_baseline = r.p50_ms / base.p50_ms
                block = [r for r in rows if r.backend == backend and r.loss == loss and r.N == N and r.V == V]
                _print_block(say, block)
                if csv_path and block:
                    write_csv(block, csv_path, [backend], stamp)
    return rows


def _row(backend, label, loss, N, V, t, nbytes, bw, limit_ms, mem, err, dtype="float32"):
    p20, p50, p80 = np.percentile(t, [20, 50, 80])
    gbps = nbytes / (p50 / 1e3) / 1e9
    return Row(backend, label, loss, N, V, p20, p50, p80, gbps, 100 * gbps * 1e9 / bw, limit_ms, mem, err,
               dtype=dtype)


@dataclass
class _Candidate:
    """One implementation in a block, checked already: call() runs it, once() times one call
    (ms), mem() measures its peak extra memory (MiB); lkref's own use CuPy's memory pool."""

    label: str
    call: object
    once: object
    mem: object
    err: float
    lkref: bool = False


def _stopwatch(xp, call, sync=None):
    """ms of one call: CUDA events on CuPy, perf_counter otherwise (synchronising a torch device)."""
    if xp is not np and sync is None:
        start, stop = xp.cuda.Event(), xp.cuda.Event()

        def once():
            start.record()
            call()
            stop.record()
            stop.synchronize()
            return xp.cuda.get_elapsed_time(start, stop)
        return once

    def once():
        if sync:
            sync()
        t = time.perf_counter()
        call()
        if sync:
            sync()
        return (time.perf_counter() - t) * 1e3
    return once


def _lkref_candidates(xp, backend, fn, loss, z, p, out, N, V, ref, say, tol=TOLERANCE, keep=None):
    """The block's lkref paths that match ref (the gradient where keep, off_ties' mask, is True),
    each checked with its gradient's memory filled with NaN first (nan_allocations)."""
    cands = []
    for label, call, new_grad in _entries(xp, backend, fn, loss, z, p, out, N, V):
        fill_nan(out)                                 # (else it holds the previous path's gradient)
        try:
            with nan_allocations(xp):
                got = call()
        except Exception as exc:
            say(f"   {label} failed: {type(exc).__name__}: {exc}")
            continue
        want = fn(z, p, impl="reference", lam=0.5) if "lam=" in label else ref
        err = max(rel_err(got.grad, want.grad, keep), rel_err(got.loss, want.loss), rel_err(got.alpha, want.alpha))
        if err > tol:
            say(f"   {label}: differs from the reference by {err:.3g} (relative); not timed")
            continue
        grad_bytes = z.nbytes if new_grad else 0
        cands.append(_Candidate(label, call, _stopwatch(xp, call),
                                lambda call=call, grad_bytes=grad_bytes: peak_extra(xp, call, grad_bytes), err,
                                lkref=True))
    return cands


def peer_errors(fn, args, ref, keep=None):
    """(the peer's own inputs, its largest relative error in the gradient (where keep, off_ties'
    mask, is True), in the loss) against the LossResult ref: one call of the peer fn on args,
    put in its form first (fn.prepare, made before timing)."""
    if hasattr(fn, "prepare"):
        args = fn.prepare(*args)
    got_loss, got_grad = fn(*args)
    if hasattr(got_grad, "float"):                    # a torch tensor: bfloat16 has no NumPy form
        got_grad = got_grad.float()
    if hasattr(got_grad, "detach"):                   # a torch tensor: compared where it lies, on a GPU
        got_grad = got_grad.detach()
        if namespace(ref.grad) is np or got_grad.device.type != "cuda":
            got_grad = np.asarray(got_grad.cpu())
    return (args, rel_err(got_grad, ref.grad, keep), rel_err(np.asarray(float(got_loss)), ref.loss))


def peer_error(fn, args, ref, keep=None):
    """(the peer's own inputs, its largest relative error in the gradient and the loss)."""
    args, grad_err, loss_err = peer_errors(fn, args, ref, keep)
    return args, max(grad_err, loss_err)


def _as_torch(x, device):
    """A torch tensor of x's values on device; bfloat16 (ml_dtypes', which torch does not read)
    through its bits."""
    import torch
    a = np.ascontiguousarray(to_numpy(x))
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.as_tensor(a, device=device)


def _peer_candidates(mod, xp, backend, loss, z, p, ref, say, skip=(), only=None, keep=None):
    cands = []
    for label, (fn, kind) in mod.peers(backend, loss).items():
        if label in skip or (only is not None and label not in only):
            continue
        try:
            if kind == "numpy":
                args = (z, p)
                sync = None
            else:
                import torch
                dev = "cuda" if kind == "torch-cuda" else "cpu"
                args = (_as_torch(z, dev), _as_torch(p, dev))
                sync = torch.cuda.synchronize if dev == "cuda" else None
            args, err = peer_error(fn, args, ref, keep)
        except Exception as exc:  # a peer that fails is reported, not fatal
            say(f"   peer {label} failed: {type(exc).__name__}: {exc}")
            continue
        call = (lambda fn=fn, args=args: fn(*args))
        if kind == "numpy":
            mem = (lambda call=call: peak_extra(np, call, z.nbytes))
        elif kind == "torch-cuda":
            mem = (lambda fn=fn, args=args: _torch_peak_extra(fn, args, z.nbytes))
        else:
            mem = (lambda: float("nan"))
        cands.append(_Candidate(label, call, _stopwatch(np if kind != "torch-cuda" else xp, call, sync), mem, err))
    return cands


def _time_all(xp, backend, cands, repeat, say, warmup=2):
    """Times (ms) of every candidate, None for one that fails.  On the CPU the calls are
    interleaved, each round in its own order (a seeded shuffle), so that the machine's slow
    and fast spells fall on every candidate alike and the ratios between them hold, and so
    that what one candidate leaves behind for the next call (PyTorch's OpenMP threads still
    spinning, a cache it flushed, memory it freed) falls on every other in turn: a rotated
    order would keep the same neighbour before each candidate in every round.  On a GPU,
    whose speed holds still, each candidate is timed in turn (its memory pool freed in
    between)."""
    times = [[] for _ in cands]
    alive = [True] * len(cands)

    def one(i, record):
        try:
            ms = cands[i].once()
        except Exception as exc:  # a peer that fails is reported, not fatal
            say(f"   {cands[i].label} failed: {type(exc).__name__}: {exc}")
            alive[i] = False
            return
        if record:
            times[i].append(ms)
    def calls(i, n, record):
        for _ in range(n):
            if alive[i]:
                one(i, record)
    if backend == "numpy":
        for i in range(len(cands)):
            calls(i, warmup, False)
        order = np.random.default_rng(0)
        for _ in range(repeat):
            for i in order.permutation(len(cands)):
                calls(int(i), 1, True)
    else:
        for i in range(len(cands)):
            calls(i, warmup, False)
            calls(i, repeat, True)
            if backend == "cupy" and cands[i].lkref:
                xp.get_default_memory_pool().free_all_blocks()
    return [t if alive[i] and t else None for i, t in enumerate(times)]


def _torch_peak_extra(fn, args, grad_bytes):
    """Peak CUDA memory PyTorch allocates during fn beyond the gradient, in MiB."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before - grad_bytes) / 2**20


def _print_block(say, rows):
    if not rows:
        return
    r0 = rows[0]
    kind = "" if r0.dtype == "float32" else f"  ({r0.dtype} logits, target and gradient)"
    say(f"  {r0.loss}  N = {r0.N}  V = {r0.V}{kind}   (bandwidth limit {r0.limit_ms:.2f} ms)")
    base = "x naive" if r0.backend == "numpy" else "x ref"
    say(f"    {'implementation':24s} {'p20':>8s} {'p50':>8s} {'p80':>8s} {'GB/s':>7s} {'%copy':>6s} "
        f"{base:>8s} {'extra MiB':>10s} {'max rel err':>12s}")
    for r in rows:
        ratio = "-" if math.isnan(r.vs_baseline) else f"{r.vs_baseline:.2f}"     # no baseline in this run
        say(f"    {r.impl:24s} {r.p20_ms:8.2f} {r.p50_ms:8.2f} {r.p80_ms:8.2f} {r.gbps:7.1f} {r.pct_copy_bw:6.1f} "
            f"{ratio:>8s} {r.peak_extra_mib:10.1f} {r.max_rel_err:12.2e}")


def write_csv(rows, path, backend_names, stamp=None):
    """Append rows to path; stamp (default: now) is the `time` column, one per run, so that
    rows of the same run can be told from a later run's."""
    import lkref

    versions = {"numpy": np.__version__, "lkref": lkref.__version__, "python": platform.python_version()}
    for mod in ("cupy", "torch"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    from importlib import metadata
    for mod, dist in (("triton", "triton"), ("speculators", "speculators"), ("liger_kernel", "liger-kernel")):
        if mod in sys.modules:                  # the peers' (speculators may be loaded without its package)
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = "?"
    stamp = stamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sha = git_sha()
    machines = {b: machine_name(b) for b in backend_names}
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "git_sha", "machine", "versions", "backend", "impl", "loss", "N", "V", "dtype",
                        "p20_ms", "p50_ms", "p80_ms", "GBps", "pct_copy_bw", "limit_ms", "peak_extra_MiB",
                        "vs_baseline", "max_rel_err", "threads"])
        for r in rows:
            w.writerow([stamp, sha, machines.get(r.backend, "?"), " ".join(f"{k}={v}" for k, v in versions.items()),
                        r.backend, r.impl, r.loss, r.N, r.V, r.dtype, f"{r.p20_ms:.3f}", f"{r.p50_ms:.3f}",
                        f"{r.p80_ms:.3f}", f"{r.gbps:.2f}", f"{r.pct_copy_bw:.1f}", f"{r.limit_ms:.3f}",
                        f"{r.peak_extra_mib:.2f}", f"{r.vs_baseline:.3f}", f"{r.max_rel_err:.2e}",
                        os.environ.get("LKREF_THREADS", "auto")])


def verify_scaling(B=64, V=32_000, ks=(1, 4, 16, 64), repeat=10, say=print, backend="numpy"):
    """verify() time against K, with and without its input checks (validate=): both read
    O(B K + B V) of draft_probs and target_probs, the drafts' entries and the rows sampled from.
    backend: "numpy" (perf_counter) or "cupy" (CUDA events; the arrays made on the device)."""
    from .sampler import verify

    xp = np
    if backend == "cupy":
        if not cupy_available():
            say("cupy: not available (CuPy with a CUDA device), skipped")
            return []
        import cupy as xp
    rng = np.random.default_rng(0)
    draw = xp.random.default_rng(1) if xp is not np else rng
    rows = []
    say(f"verify on {machine_name(backend)}: B = {B}, V = {V}, p50 ms")
    say(f"   {'K':>4s} {'validate=True':>14s} {'validate=False':>15s}")
    for K in ks:
        q = rng.random((B, K, V), dtype=np.float32)
        q /= q.sum(-1, keepdims=True)
        p = rng.random((B, K + 1, V), dtype=np.float32)
        p /= p.sum(-1, keepdims=True)
        tok = rng.integers(0, V, size=(B, K))
        q, p, tok = xp.asarray(q), xp.asarray(p), xp.asarray(tok)
        t = {}
        for validate in (True, False):
            times = timed(xp, lambda: verify(tok, q, p, rng=draw, validate=validate), repeat)
            t[validate] = float(np.median(times))
        rows.append((K, t[True], t[False]))
        say(f"   {K:4d} {t[True]:14.2f} {t[False]:15.2f}")
    return rows
