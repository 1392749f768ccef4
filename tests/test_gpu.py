"""GPU checks (CuPy with a device; skipped otherwise): the fused kernels against the reference."""

from __future__ import annotations

import numpy as np
import pytest

import lkref
from lkref import fused_cupy
from lkref.backend import to_numpy
from lkref.benchmark import TUNING_SHAPES

from .strategies import make_logits

pytestmark = pytest.mark.gpu
REDUCED = sorted(lkref.LOSSES)


@pytest.fixture(scope="module")
def cp():
    if not lkref.cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    import cupy
    return cupy


def peaked_probs(rng, shape):
    logits = rng.standard_normal(shape) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def compare(cp, name, z, p, rtol=2e-4, **kw):
    ref = lkref.LOSSES[name](cp.asarray(z), cp.asarray(p), impl="reference", **kw)
    fast = lkref.LOSSES[name](cp.asarray(z), cp.asarray(p), impl="fused", **kw)
    g_ref, g = to_numpy(ref.grad).astype(np.float64), to_numpy(fast.grad).astype(np.float64)
    scale = max(np.abs(g_ref).max(initial=0), 1e-30)
    assert fast.grad.dtype == ref.grad.dtype and fast.grad.shape == ref.grad.shape
    np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(to_numpy(fast.loss), to_numpy(ref.loss), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(to_numpy(fast.alpha), to_numpy(ref.alpha), rtol=rtol, atol=1e-6)
    if ref.lam is not None:
        np.testing.assert_allclose(float(fast.lam), float(ref.lam), rtol=rtol)
    return fast


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("N, V", [(1, 7), (3, 1000), (3, 12_000), (17, 32_000), (5, 50_257), (2, 128_256),
                                  (2, 151_936), (2, 300_000), (4096, 1031)])
def test_fused_matches_reference_on_odd_shapes(cp, name, N, V):
    """One block per row up to 16 384, clusters of 2, 4 and 8, and the streaming kernel beyond
    131 072 (151 936: Qwen's vocabulary).  V = 12 000: a target cache of exactly 48 KiB, which with
    the static shared memory needs the opt-in (tests/test_fused_cupy_host.py's stand-in checks
    the rule; this, the GPU)."""
    rng = np.random.default_rng(N + V)
    z = make_logits(rng, (N, V), scale=2.0, dtype=np.float32)
    compare(cp, name, z, peaked_probs(rng, (N, V)).astype(np.float32))


@pytest.mark.parametrize("name", REDUCED)
def test_fused_with_mask_temperature_and_draft_to_target(cp, name):
    rng = np.random.default_rng(1)
    N, V, Vt = 64, 3000, 3500
    z = make_logits(rng, (N, V), scale=2.0, dtype=np.float32)
    p = peaked_probs(rng, (N, Vt)).astype(np.float32)
    d2t = rng.permutation(Vt)[:V]
    p[5] = 0
    p[5, np.setdiff1d(np.arange(Vt), d2t)[:3]] = 1 / 3          # a row with no mass on the draft vocabulary
    mask = rng.random(N) < 0.7
    compare(cp, name, z, p[:, :V] / p[:, :V].sum(-1, keepdims=True), mask=cp.asarray(mask), temperature=0.7)
    compare(cp, name, z, p, draft_to_target=cp.asarray(d2t), mask=cp.asarray(mask))


@pytest.mark.parametrize("name", REDUCED)
def test_fused_weight_masks_and_no_rows(cp, name):
    """Real weights (the kernel divides by their sum on the device) and N = 0 (no row launch)."""
    rng = np.random.default_rng(11)
    z = make_logits(rng, (40, 5000), scale=2.0, dtype=np.float32)
    p = peaked_probs(rng, (40, 5000)).astype(np.float32)
    weights = (rng.random(40) * 3 * (rng.random(40) < 0.8)).astype(np.float32)
    compare(cp, name, z, p, mask=cp.asarray(weights))
    compare(cp, name, z[:0], p[:0])


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V, dtype, kw", [(32_000, np.float32, {}), (128_256, np.float32, {}), (1031, np.float32, {}),
                                          (32_000, np.float16, {}), (3000, np.float32, {"mask": True, "d2t": True})])
def test_first_use_check_passes_the_kernels_here(cp, monkeypatch, name, V, dtype, kw):
    """impl="auto" checks each kernel variant at its first use (lkref/self_check.py): the kernels
    pass on this GPU with no warning (a failure would send the variant's calls to the readable
    path), and the result is the fused path's."""
    import warnings
    from lkref import self_check
    monkeypatch.setattr(self_check, "_verdicts", {})
    for flag in ("LKREF_CUPY_SELF_CHECK", "LKREF_CUPY_FUSED"):
        monkeypatch.delenv(flag, raising=False)
    rng = np.random.default_rng(V)
    N = 8
    z = cp.asarray(make_logits(rng, (N, V), scale=2.0, dtype=np.float32).astype(dtype))
    p = peaked_probs(rng, (N, V + 100 if kw.get("d2t") else V))
    options = {}
    if kw.get("d2t"):
        options["draft_to_target"] = cp.asarray(rng.permutation(V + 100)[:V])
    if kw.get("mask"):
        options["mask"] = cp.asarray(rng.random(N) < 0.7)
    p = cp.asarray(p.astype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        auto = lkref.LOSSES[name](z, p, **options)
    assert list(self_check.verdicts().values()) == [True]
    fast = lkref.LOSSES[name](z, p, impl="fused", **options)
    g, g_fast = to_numpy(auto.grad).astype(np.float64), to_numpy(fast.grad).astype(np.float64)
    np.testing.assert_allclose(g, g_fast, rtol=1e-6, atol=1e-6 * np.abs(g_fast).max())
    np.testing.assert_allclose(float(auto.loss), float(fast.loss), rtol=1e-6)


@pytest.mark.parametrize("name", REDUCED)
def test_fused_float16_logits(cp, name):
    rng = np.random.default_rng(2)
    z = make_logits(rng, (32, 4099), scale=2.0, dtype=np.float16)
    p = peaked_probs(rng, (32, 4099)).astype(np.float32)
    r = compare(cp, name, z, p, rtol=5e-3)
    assert r.grad.dtype == np.float16 and r.loss.dtype == np.float32


TWO_BYTE_HOW = {"vec": {}, "first read": {"vec": False}, "pairs": {"vec": False, "pair_prefetch": True}}


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V", [32_000, 128_256])
@pytest.mark.parametrize("how", sorted(TWO_BYTE_HOW))
def test_fused_two_byte_targets_read_as_they_are(cp, name, V, how):
    """float16 logits and target, as a half-precision training step has them: the target goes to
    the kernel as it is (vec: 4 adjacent entries an 8-byte access, the target copied to shared
    memory 4 entries a cp.async as the launch starts; one column at a time, kept there at its
    first read, or copied there in 4-byte pairs as the launch starts), with draft_to_target too
    (one column at a time, read at first use); the reference runs on float32 copies of the
    same values."""
    rng = np.random.default_rng(V)
    N, Vt = 6, V + 1000
    z = make_logits(rng, (N, V), scale=2.0, dtype=np.float16)
    p = peaked_probs(rng, (N, Vt)).astype(np.float16)
    for kw in ({"draft_to_target": rng.permutation(Vt)[:V]}, {"mask": np.array([1, 1, 0, 1, 1, 1], bool)}):
        pk = p if "draft_to_target" in kw else (p[:, :V] / p[:, :V].astype(np.float32).sum(1, keepdims=True)).astype(np.float16)
        dev = {k: cp.asarray(v) for k, v in kw.items()}
        with fused_cupy.configured(**TWO_BYTE_HOW[how]):
            zc, pc = cp.asarray(z), cp.asarray(pk)
            assert fused_cupy.vec_fits(zc, pc, zc, dev.get("draft_to_target")) == (how == "vec" and "mask" in kw)
            fast = lkref.LOSSES[name](zc, pc, impl="fused", **dev)
        ref = lkref.LOSSES[name](cp.asarray(z.astype(np.float32)), cp.asarray(pk.astype(np.float32)),
                                 impl="reference", **dev)
        assert fast.grad.dtype == np.float16
        g, g_ref = to_numpy(fast.grad).astype(np.float64), to_numpy(ref.grad).astype(np.float64)
        np.testing.assert_allclose(g, g_ref, rtol=5e-3, atol=5e-3 * np.abs(g_ref).max())
        np.testing.assert_allclose(to_numpy(fast.loss), to_numpy(ref.loss), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(to_numpy(fast.alpha), to_numpy(ref.alpha), rtol=1e-4, atol=1e-6)


def test_fused_lk_alpha_disjoint_rows_fall_back_to_log_space(cp):
    z = np.zeros((3, 300), np.float32)
    z[0, 0] = 200.0
    p = np.full((3, 300), 1 / 300, np.float32)
    p[0] = 1 / 299
    p[0, 0] = 0.0                                   # row 0: alpha = e^-200, below float32's range
    fast = compare(cp, "lk_alpha", z, p)
    assert np.isfinite(to_numpy(fast.grad)).all() and float(fast.loss) > 60


def test_fused_lambda_given_and_errors(cp):
    rng = np.random.default_rng(3)
    z = make_logits(rng, (8, 500), dtype=np.float32)
    p = peaked_probs(rng, (8, 500)).astype(np.float32)
    compare(cp, "lk_lambda", z, p, lam=0.25)
    bad = z.copy()
    bad[2, 7] = np.nan
    with pytest.raises(ValueError, match="draft_logits contains non-finite"):
        lkref.lk_alpha(cp.asarray(bad), cp.asarray(p), impl="fused")
    with pytest.raises(ValueError, match="rows must sum to 1"):
        lkref.lk_alpha(cp.asarray(z), cp.asarray(p * 1.01), impl="fused")


@pytest.mark.parametrize("V", [500, 501])               # 4 adjacent columns a thread; one at a time
def test_fused_input_flags(cp, V):
    """The kernels flag bad input from each thread's min, max and sum of its entries (of the
    exps for the logits), not per entry: each kind of bad entry gives the reference's error,
    and finite target entries whose sum overflows a wrong row sum, not a non-finite entry."""
    rng = np.random.default_rng(12)
    z = cp.asarray(make_logits(rng, (6, V), dtype=np.float32))
    p = peaked_probs(rng, (6, V)).astype(np.float32)
    for value in (np.nan, np.inf, -np.inf):
        bad = to_numpy(z).copy()
        bad[2, V - 2] = value
        with pytest.raises(ValueError, match="draft_logits contains non-finite"):
            lkref.lk_alpha(cp.asarray(bad), cp.asarray(p), impl="fused")
    for value, match in [(np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite"),
                         (-0.25, "negative")]:
        bad = p.copy()
        bad[4, V - 3] = value
        with pytest.raises(ValueError, match=f"target_probs contains {match}"):
            lkref.lk_alpha(z, cp.asarray(bad), impl="fused")
    bad = p.copy()
    bad[1] = np.finfo(np.float32).max / 2
    with pytest.raises(ValueError, match="rows must sum to 1"):
        lkref.lk_alpha(z, cp.asarray(bad), impl="fused")


def test_verify_on_the_gpu_accepts_as_on_the_cpu(cp):
    p, q = lkref.testing.sampler_problem(0, 4, 6)
    B = 4096
    rng = np.random.default_rng(0)
    cdf = np.cumsum(q, -1)
    tok = np.minimum((rng.random((B, 4))[..., None] >= cdf).sum(-1), 5)
    qq, pp = np.broadcast_to(q, (B, 4, 6)).copy(), np.broadcast_to(p, (B, 5, 6)).copy()
    u = rng.random((B, 4))
    cpu = lkref.verify(tok, qq, pp, rng=np.random.default_rng(1), uniforms=u)
    gpu = lkref.verify(cp.asarray(tok), cp.asarray(qq), cp.asarray(pp), rng=cp.random.default_rng(1),
                       uniforms=cp.asarray(u))
    np.testing.assert_array_equal(to_numpy(gpu.num_accepted), cpu.num_accepted)
    n = cpu.num_accepted
    emitted = to_numpy(gpu.tokens)
    assert np.all(pp[np.arange(B), n, emitted[np.arange(B), n]] > 0)


def test_torch_cuda_tensors_round_trip(cp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    z = torch.from_numpy(make_logits(rng, (4, 100), dtype=np.float32)).cuda()
    p = torch.from_numpy(peaked_probs(rng, (4, 100)).astype(np.float32)).cuda()
    r = lkref.lk_alpha(z, p)
    assert isinstance(r.grad, torch.Tensor) and r.grad.is_cuda
    want = lkref.lk_alpha(z.cpu().numpy(), p.cpu().numpy())
    np.testing.assert_allclose(r.grad.cpu().numpy(), want.grad, rtol=1e-4, atol=1e-9)


def test_generate_with_torch_cuda_models(cp):
    """A CUDA prompt and models that answer in CUDA tensors: the loop runs on CuPy (views, no
    copies), the models get CUDA tokens, and the result comes back as CUDA tensors."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    target_t = torch.from_numpy(rng.dirichlet(np.ones(7), 7)).cuda()
    draft_t = torch.from_numpy(rng.dirichlet(np.ones(7), 7)).cuda()

    class Chain:
        def __init__(self, t):
            self.t = t

        def next_token_probs(self, tokens):
            assert isinstance(tokens, torch.Tensor) and tokens.is_cuda
            return self.t[tokens]

    prompt = torch.tensor([[0], [3], [6]], device="cuda")
    r = lkref.generate(Chain(target_t), Chain(draft_t), prompt, max_new_tokens=9, k=3,
                       rng=cp.random.default_rng(0))
    assert isinstance(r.tokens, torch.Tensor) and r.tokens.is_cuda and tuple(r.tokens.shape) == (3, 9)
    assert r.target_calls >= 3 and 1 <= r.tau <= 4
    g = lkref.generate(Chain(target_t), Chain(draft_t), prompt, max_new_tokens=9, k=3, rng=None,
                       temperature=0.0)                 # greedy: the target's argmax chain, exactly
    want, ids = [], prompt[:, 0].cpu().numpy()
    for _ in range(9):
        ids = target_t.cpu().numpy()[ids].argmax(-1)
        want.append(ids)
    np.testing.assert_array_equal(g.tokens.cpu().numpy(), np.stack(want, axis=1))


@pytest.mark.parametrize("V", [32_000, 128_256])
@pytest.mark.parametrize("threads, share, cache", TUNING_SHAPES)
def test_fused_tuning_shapes(cp, threads, share, cache, V):
    """The launch shapes the benchmark tries (lkref.benchmark.TUNING_SHAPES) on the device."""
    rng = np.random.default_rng(threads + share)
    z = make_logits(rng, (3, V), dtype=np.float32)
    p = peaked_probs(rng, (3, V)).astype(np.float32)
    with fused_cupy.configured(threads=threads, block_share=share, cache_target=cache):
        compare(cp, "lk_alpha", z, p)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V", [1000, 32_000, 128_256])
def test_fused_four_adjacent_columns_and_one_at_a_time(cp, name, V):
    """fused_cupy.VEC: aligned float32 rows with V % 4 == 0 take 16-byte loads, stores and copies
    (4 adjacent columns a thread); logits 4 bytes off a 16-byte boundary, or configured(vec=False),
    one column every THREADS: each the reference's result on the device."""
    rng = np.random.default_rng(V + 5)
    z = make_logits(rng, (3, V), dtype=np.float32)
    p = peaked_probs(rng, (3, V)).astype(np.float32)
    zc = cp.asarray(z)
    assert fused_cupy.vec_fits(zc, cp.asarray(p), zc, None)
    compare(cp, name, z, p)
    with fused_cupy.configured(vec=False):
        compare(cp, name, z, p)
    buf = cp.empty(z.size + 1, cp.float32)
    off = buf[1:].reshape(z.shape)                   # contiguous, 4 bytes past CuPy's aligned start
    off[...] = zc
    assert not fused_cupy.vec_fits(off, cp.asarray(p), off, None)
    ref = lkref.LOSSES[name](zc, cp.asarray(p), impl="reference")
    fast = lkref.LOSSES[name](off, cp.asarray(p), impl="fused")
    np.testing.assert_allclose(to_numpy(fast.grad), to_numpy(ref.grad), rtol=2e-4,
                               atol=2e-4 * float(abs(ref.grad).max()))
    np.testing.assert_allclose(float(fast.loss), float(ref.loss), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["kl", "lk_alpha"])
def test_fused_expf_as_before_exp2f(cp, name):
    """configured(exp2=False) (the benchmark's 'fused expf'): expf of (z - m) / T per element
    instead of exp2f, for the sums of x (KL) and without."""
    rng = np.random.default_rng(9)
    z = make_logits(rng, (3, 32_000), dtype=np.float32)
    p = peaked_probs(rng, (3, 32_000)).astype(np.float32)
    with fused_cupy.configured(exp2=False):
        compare(cp, name, z, p)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("N, V, cluster", [(3, 32_000, 2), (5, 50_257, 4), (300, 128_256, 8)])
def test_fused_without_clusters_blocks_meet_in_global_memory(cp, name, N, V, cluster):
    """As on a GPU before Hopper (no thread-block clusters): a row's 2, 4 or 8 blocks meet in
    global memory.  N = 300 rows of 8 blocks are more blocks than the GPU holds at once, so
    blocks wait for others of their row that start only when earlier rows end."""
    assert fused_cupy.plan(V)[1] == cluster
    rng = np.random.default_rng(N + V)
    z = make_logits(rng, (N, V), scale=2.0, dtype=np.float32)
    with fused_cupy.configured(clusters=False):
        assert not fused_cupy._uses_clusters(cp)
        compare(cp, name, z, peaked_probs(rng, (N, V)).astype(np.float32))


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V", [32_000, 128_256])
def test_fused_partial_target_cache_as_on_gpus_with_less_shared_memory(cp, monkeypatch, name, V):
    """As on a GPU whose blocks may opt in to 99 KiB of shared memory (sm_86/89/120: L4, L40S,
    RTX cards; no clusters either): at 32 768 floats a block (the default's 16 384 fit whole)
    each thread keeps 48 of its 63 target entries in shared memory and reads the other 15
    twice (the stand-in counts those reads)."""
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: 99 * 1024)
    monkeypatch.setattr(fused_cupy, "_cache", {})        # variants sized for this GPU's limit
    rng = np.random.default_rng(V + 99)
    z = make_logits(rng, (3, V), scale=2.0, dtype=np.float32)
    with fused_cupy.configured(clusters=False, block_share=32_768):
        compare(cp, name, z, peaked_probs(rng, (3, V)).astype(np.float32))
        f32 = np.dtype(np.float32)                           # the key compare's call built (no second compile)
        kern = fused_cupy._kernel(f32, f32, *fused_cupy.plan(V), fused_cupy._uses_clusters(cp),
                                  mode=fused_cupy.MODES[name], phase=1 if name == "lk_lambda" else 0)
    assert kern.smem == 4 * 48 * 512 and "#define PCACHE 48" in kern.rows.code


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("dtypes", [("bfloat16", "bfloat16"), ("float16", "float32")])
def test_fused_two_byte_logits_four_adjacent_entries(cp, name, dtypes):
    """fused_cupy.VEC with 2-byte arrays: bfloat16 logits, target and gradient, and float16 logits
    and gradient with a float32 target, at V = 32 000 (a cluster of two), 4 adjacent entries
    an access (8 bytes of a 2-byte type); configured(vec=False) one column at a time; and the
    target one entry past CuPy's aligned start, one column at a time: each the reference's
    result on float32 copies of the same values."""
    z_dt, p_dt = (np.float32 if d == "float32" else np.float16 if d == "float16"
                  else pytest.importorskip("ml_dtypes").bfloat16 for d in dtypes)
    rng = np.random.default_rng(33)
    z = make_logits(rng, (5, 32_000), scale=2.0, dtype=np.float32).astype(z_dt)
    p = peaked_probs(rng, (5, 32_000)).astype(p_dt)
    try:
        zc, pc = cp.asarray(z), cp.asarray(p)
    except Exception as exc:                         # CuPy without bfloat16
        pytest.skip(f"this CuPy has no bfloat16 arrays: {exc}")
    ref = lkref.LOSSES[name](cp.asarray(z.astype(np.float32)), cp.asarray(p.astype(np.float32)), impl="reference")
    g_ref = to_numpy(ref.grad).astype(np.float64)
    tol = 1e-2 if "bfloat16" in dtypes else 5e-3      # the gradient rounded to 8 or 11 bits
    raw = cp.empty(pc.nbytes + pc.itemsize, cp.uint8)           # one entry past CuPy's aligned start,
    off = raw[pc.itemsize:].view(pc.dtype).reshape(p.shape)     # filled by a copy of the bytes (no
    off.data.copy_from_device(pc.data, pc.nbytes)               # elementwise kernel asked of bfloat16)
    assert fused_cupy.vec_fits(zc, pc, zc, None) and not fused_cupy.vec_fits(zc, off, zc, None)
    for vec, target in ((True, pc), (False, pc), (True, off)):
        with fused_cupy.configured(vec=vec):
            fast = lkref.LOSSES[name](zc, target, impl="fused")
        assert fast.grad.dtype == zc.dtype
        np.testing.assert_allclose(to_numpy(fast.grad).astype(np.float64), g_ref, rtol=tol,
                                   atol=tol * np.abs(g_ref).max())
        np.testing.assert_allclose(to_numpy(fast.loss), to_numpy(ref.loss), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(to_numpy(fast.alpha), to_numpy(ref.alpha), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V", [4096, 32_000])
def test_fused_pipelined_rows(cp, name, V):
    """fused_cupy.PIPELINE at 512 threads x 8 192 floats a block (the benchmark's 'fused
    pipelined'): a persistent grid, each block (V = 4 096: some 264 of them on an H100) or cluster
    of 4 (V = 32 000: 33) going through 1-2 or some 9 of the 300 rows, with the next rows' logits
    and target copied into shared memory while it works on one; the reference's result
    (LK^lambda with lam=, one launch)."""
    rng = np.random.default_rng(V + 9)
    N = 300
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = peaked_probs(rng, (N, V)).astype(np.float32)
    kw = {"lam": 0.3} if name == "lk_lambda" else {}
    with fused_cupy.configured(pipeline=True, threads=512, block_share=8192):
        items, cluster = fused_cupy.plan(V)
        assert items % 4 == 0 and fused_cupy.pipe_stages(items, fused_cupy._smem_optin(cp)) >= 2
        assert fused_cupy._resident_clusters(cp, fused_cupy.stage_bytes(items) * fused_cupy.PIPE_STAGES, cluster, N) < N
        compare(cp, name, z, p, **kw)


@pytest.mark.parametrize("name", REDUCED)
@pytest.mark.parametrize("V", [4096, 128_256])
def test_fused_rows_fetched_into_l2_ahead(cp, name, V):
    """fused_cupy.L2_AHEAD at the default shape: a persistent grid, each block (V = 4 096) or
    cluster of 8 (V = 128 256) going through several of the rows, with L2 asked for its next
    row's share at the start of each (cp.async.bulk.prefetch.L2); the reference's result
    (LK^lambda with lam=, one launch)."""
    rng = np.random.default_rng(V + 11)
    N = 2000 if V < 100_000 else 80                  # more rows than the GPU holds blocks (clusters) at once
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = peaked_probs(rng, (N, V)).astype(np.float32)
    kw = {"lam": 0.3} if name == "lk_lambda" else {}
    with fused_cupy.configured(l2_ahead=True):
        items, cluster = fused_cupy.plan(V)
        target_cache = 4 * fused_cupy.THREADS * items
        assert items % 4 == 0 and fused_cupy._resident_clusters(cp, target_cache, cluster, N) < N
        compare(cp, name, z, p, **kw)


@pytest.mark.parametrize("name, lam", [("kl", None), ("tv", None), ("lk_alpha", None), ("lk_lambda", 0.3),
                                       ("lk_lambda", None)])
@pytest.mark.parametrize("V", [4096, 32_000])
def test_fused_rows_fetched_into_l2_by_lead(cp, name, lam, V):
    """fused_cupy.L2_LEAD: a block (V = 4 096) or cluster of 2 (V = 32 000) a row, as by default,
    each asking L2 for its share of the row half the resident rows on as it starts
    (cp.async.bulk.prefetch.L2), in each launch (LK^lambda's batch lambda: two); the reference's
    result."""
    rng = np.random.default_rng(V + 13)
    N = 1000
    z = make_logits(rng, (N, V), dtype=np.float32)
    p = peaked_probs(rng, (N, V)).astype(np.float32)
    kw = {} if lam is None else {"lam": lam}
    with fused_cupy.configured(l2_lead=0.5):
        items, cluster = fused_cupy.plan(V)
        target_cache = 4 * fused_cupy.THREADS * items
        assert items % 4 == 0 and 1 < fused_cupy._resident_clusters(cp, target_cache, cluster, N) < N
        compare(cp, name, z, p, **kw)


def test_fused_bfloat16_logits_where_cupy_has_them(cp):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    z = make_logits(rng, (16, 4099), dtype=np.float32).astype(ml_dtypes.bfloat16)
    try:
        zc = cp.asarray(z)
    except Exception as exc:                         # CuPy without bfloat16
        pytest.skip(f"this CuPy has no bfloat16 arrays: {exc}")
    p = cp.asarray(peaked_probs(rng, (16, 4099)).astype(np.float32))
    fast = lkref.lk_alpha(zc, p, impl="fused")
    ref = lkref.lk_alpha(cp.asarray(z.astype(np.float32)), p, impl="reference")
    assert str(fast.grad.dtype) == "bfloat16"
    np.testing.assert_allclose(float(fast.loss), float(ref.loss), rtol=1e-5)
    g, g_ref = to_numpy(fast.grad).astype(np.float64), to_numpy(ref.grad).astype(np.float64)
    np.testing.assert_allclose(g, g_ref, rtol=1e-2, atol=1e-2 * np.abs(g_ref).max())
    # a bfloat16 target too, read as it is; through draft_to_target its entries outside the draft
    # vocabulary are checked by integer reductions of its bits, its row sums in float32
    pb = peaked_probs(rng, (16, 4199)).astype(ml_dtypes.bfloat16)
    d2t = cp.asarray(rng.permutation(4199)[:4099])
    fast = lkref.lk_alpha(zc, cp.asarray(pb), impl="fused", draft_to_target=d2t)
    ref = lkref.lk_alpha(cp.asarray(z.astype(np.float32)), cp.asarray(pb.astype(np.float32)), impl="reference",
                         draft_to_target=d2t)
    np.testing.assert_allclose(float(fast.loss), float(ref.loss), rtol=1e-5)
    g, g_ref = to_numpy(fast.grad).astype(np.float64), to_numpy(ref.grad).astype(np.float64)
    np.testing.assert_allclose(g, g_ref, rtol=1e-2, atol=1e-2 * np.abs(g_ref).max())
    bad = pb.copy()
    outside = sorted(set(range(4199)) - set(to_numpy(d2t).tolist()))
    bad[3, outside[0]] = -0.25
    with pytest.raises(ValueError, match="target_probs contains negative"):
        lkref.lk_alpha(zc, cp.asarray(bad), impl="fused", draft_to_target=d2t)


def test_auto_takes_the_kernels_when_switched_on(cp, monkeypatch):
    rng = np.random.default_rng(8)
    z = cp.asarray(make_logits(rng, (8, 2000), dtype=np.float32))
    p = cp.asarray(peaked_probs(rng, (8, 2000)).astype(np.float32))
    fused = lkref.lk_alpha(z, p, impl="fused")
    monkeypatch.setenv("LKREF_CUPY_FUSED", "1")
    auto = lkref.lk_alpha(z, p)
    np.testing.assert_array_equal(to_numpy(auto.grad), to_numpy(fused.grad))
    monkeypatch.setenv("LKREF_CUPY_FUSED", "0")
    ref = lkref.lk_alpha(z, p, impl="reference")
    np.testing.assert_array_equal(to_numpy(lkref.lk_alpha(z, p).grad), to_numpy(ref.grad))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_out_on_the_device(cp, impl):
    """out= with CuPy arrays (CuPy's flags have no `writeable`), including the logits themselves."""
    rng = np.random.default_rng(9)
    z = make_logits(rng, (6, 700), dtype=np.float32)
    p = cp.asarray(peaked_probs(rng, (6, 700)).astype(np.float32))
    want = lkref.lk_alpha(cp.asarray(z), p, impl="reference")
    out = cp.empty((6, 700), cp.float32)
    r = lkref.lk_alpha(cp.asarray(z), p, impl=impl, out=out)
    assert r.grad is out
    buf = cp.asarray(z)
    r2 = lkref.lk_alpha(buf, p, impl=impl, out=buf)
    assert r2.grad is buf
    for got in (out, buf):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want.grad), rtol=2e-4, atol=1e-8)
    with pytest.raises(ValueError, match="out "):
        lkref.lk_alpha(cp.asarray(z), p, impl=impl, out=cp.empty((6, 701), cp.float32))


def test_fused_refuses_host_arrays_beside_device_ones(cp):
    rng = np.random.default_rng(10)
    z = cp.asarray(make_logits(rng, (4, 50), dtype=np.float32))
    p = peaked_probs(rng, (4, 50)).astype(np.float32)
    with pytest.raises(TypeError, match="backends"):
        lkref.tv(z, p, impl="fused")
    with pytest.raises(TypeError, match="backends"):
        lkref.tv(z, cp.asarray(p), impl="fused", mask=np.ones(4, bool))


@pytest.mark.parametrize("name", REDUCED)
def test_fused_edges_give_no_nan(cp, name):
    """Finite logits whose spread overflows (q = 0 where p = 0: 0 log q = 0), a masked row with an
    infinite KL, and a temperature below fused.MIN_TEMPERATURE (the reference's path)."""
    big = np.finfo(np.float32).max * 0.9
    z = np.array([[big, -big, 0.0], [big, -big, 0.0], [0.1, 0.2, 0.3]], np.float32)
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], np.float32)
    fast = compare(cp, name, z, p, mask=cp.asarray([1.0, 0.0, 1.0], cp.float32))
    assert np.isfinite(to_numpy(fast.loss)) and not np.isnan(to_numpy(fast.grad)).any()
    rng = np.random.default_rng(7)
    z2, p2 = make_logits(rng, (4, 300), dtype=np.float32), peaked_probs(rng, (4, 300)).astype(np.float32)
    tiny = lkref.LOSSES[name](cp.asarray(z2), cp.asarray(p2), impl="fused", temperature=1e-38)
    assert not np.isnan(to_numpy(tiny.grad)).any()


@pytest.mark.parametrize("fast_log", [True, False])
@pytest.mark.parametrize("name", ["kl", "lk_lambda"])
def test_fused_sum_p_log_p_as_the_stand_in_holds_it(cp, name, fast_log):
    """Sum p log p takes __logf below p = 0.5 and logf from 0.5 up (lkref/fused_cupy.py): on the
    stand-in's rows and tolerance (tests/test_fused_cupy_host.py, test_overflowing_logits_give_no_nan),
    where row 0's KL is 0 in float32 and __logf's documented 2^-21.41 at p = 1 would be 1.2e-5 of
    the mean, and on peaked rows of 32 000 at the stand-in's 2e-5 (where its worst-case math is
    4.9e-6 off, 1.6e-6 with logf for every entry: fast_log=False, the benchmark's 'fused logf')."""
    with fused_cupy.configured(fast_log=fast_log):
        _sum_p_log_p(cp, name)


def _sum_p_log_p(cp, name):
    big = np.finfo(np.float32).max * 0.9
    z = np.array([[big, -big, 0.0], [0.1, 0.2, 0.3]], np.float32)
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        fast = lkref.LOSSES[name](cp.asarray(z), cp.asarray(p), impl="fused")
        ref = lkref.LOSSES[name](z, p, impl="reference")
    np.testing.assert_allclose(float(to_numpy(fast.loss)), float(ref.loss), rtol=1e-5)
    rng = np.random.default_rng(5)
    p = peaked_probs(rng, (8, 32_000)).astype(np.float32)
    z = (np.log(p) + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)     # a KL of 0.018
    fast = lkref.LOSSES[name](cp.asarray(z), cp.asarray(p), impl="fused")
    ref = lkref.LOSSES[name](z.astype(np.float64), p.astype(np.float64), impl="reference")
    np.testing.assert_allclose(float(to_numpy(fast.loss)), float(ref.loss), rtol=2e-5)


def test_verify_scaling_on_the_device(cp):
    """bench --sampler on CuPy: verify on device arrays, timed by CUDA events, for each K."""
    from lkref import benchmark
    lines = []
    rows = benchmark.verify_scaling(B=8, V=1000, ks=(1, 4), repeat=2, say=lines.append, backend="cupy")
    assert [r[0] for r in rows] == [1, 4] and all(r[1] > 0 and r[2] > 0 for r in rows)
    assert lines[0] == f"verify on {benchmark.machine_name('cupy')}: B = 8, V = 1000, p50 ms"
