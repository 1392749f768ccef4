"""python -m lkref bench, on tiny sizes: rows, CSV, and refusing to time a path that is wrong."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys

import numpy as np
import pytest

import lkref
from lkref import benchmark, fused


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rows_and_csv(tmp_path):
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("lk_alpha",), sizes=[(8, 300)], repeat=2,
                         with_peers=True, say=lines.append, skip_peers=("torch-compile",))
    impls = {r.impl for r in rows}
    assert {"lkref", "lkref out=", "lkref reference", "numpy-naive"} <= impls
    assert all(r.p20_ms <= r.p50_ms <= r.p80_ms for r in rows)
    assert all(r.max_rel_err < 1e-4 for r in rows)
    naive = next(r for r in rows if r.impl == "numpy-naive")
    assert naive.vs_baseline == 1.0
    path = tmp_path / "b.csv"
    benchmark.write_csv(rows, str(path), ["numpy"])
    got = _csv_rows(path)
    assert len(got) == len(rows) and got[0]["machine"] and got[0]["git_sha"] and "numpy=" in got[0]["versions"]


def test_a_run_without_its_baseline_prints_a_dash():
    """Without the direct translation (--no-peers) the ratio column shows '-', not 'nan'; with
    it, the figures."""
    for with_peers in (False, True):
        lines = []
        benchmark.run(backends=("numpy",), losses=("tv",), sizes=[(4, 50)], repeat=1, with_peers=with_peers,
                      say=lines.append, only_peers=("numpy-naive",))
        row = next(line for line in lines if line.strip().startswith("lkref out="))
        assert "nan" not in row and (row.split()[7] == "-") is (not with_peers)


def test_peers_chosen_by_name(monkeypatch):
    """--peer times only the named peers, --skip-peer leaves the named ones out."""
    mod = benchmark.load_peers()
    naive = mod.numpy_naive("tv")
    monkeypatch.setattr(mod, "peers", lambda backend, name: {"a": (naive, "numpy"), "b": (naive, "numpy")})
    monkeypatch.setattr(benchmark, "load_peers", lambda: mod)

    def peer_rows(**kw):
        rows = benchmark.run(backends=("numpy",), losses=("tv",), sizes=[(4, 50)], repeat=1, say=lambda *_: None, **kw)
        return {r.impl for r in rows} - {"lkref", "lkref out=", "lkref reference"}
    assert peer_rows() == {"a", "b"}
    assert peer_rows(only_peers=("b",)) == {"b"}
    assert peer_rows(skip_peers=("b",)) == {"a"}
    assert peer_rows(only_peers=("a", "b"), skip_peers=("a",)) == {"b"}


def test_csv_rows_are_written_block_by_block(tmp_path):
    """A run stopped by a time limit (the GPU check's timeout) keeps the blocks it finished."""
    path = tmp_path / "b.csv"
    seen = []

    def say(line):
        if "N = 4  V = 120" in line:                 # the second block's header: the first is on disk
            seen.append(len(_csv_rows(path)) if path.exists() else 0)
    rows = benchmark.run(backends=("numpy",), losses=("tv",), sizes=[(4, 100), (4, 120)], repeat=2,
                         with_peers=False, say=say, csv_path=str(path))
    first = [r for r in rows if r.V == 100]
    assert seen == [len(first)] and len(first) > 0
    got = _csv_rows(path)
    assert len(got) == len(rows) and {int(r["V"]) for r in got} == {100, 120}
    assert len({r["time"] for r in got}) == 1                # one run, one stamp


def test_a_fast_path_that_differs_is_not_timed(monkeypatch):
    real = fused.numpy_loss

    def wrong(*a, **k):
        r = real(*a, **k)
        r.grad[...] *= 1.01
        return r
    monkeypatch.setattr(fused, "numpy_loss", wrong)
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("tv",), sizes=[(4, 100)], repeat=2, with_peers=False,
                         say=lines.append)
    assert not any(r.impl.startswith("lkref") and r.impl != "lkref reference" for r in rows)
    assert any("differs from the reference" in line for line in lines)


def test_a_gradient_that_differs_only_at_a_near_tie_is_timed():
    """A q within rounding of p may land on either side of the tie rule, where the gradient of a
    loss with a TV part jumps: off_ties leaves those entries out of the gradient's comparison,
    and only those.  The same jump one entry away from a tie still fails."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 50)).astype(np.float32)
    q = lkref.losses.softmax(z)
    p = rng.dirichlet(np.ones(50), 3).astype(np.float32)
    p[1, 7] = q[1, 7] * (1 + 3e-7)                          # a near-tie: q and p a few ulp apart
    p[1, 9] = q[1, 9] * 1.5
    rest = np.ones(50, bool)
    rest[[7, 9]] = False
    p[1, rest] *= (1 - p[1, 7] - p[1, 9]) / p[1, rest].sum()   # the row sums to 1, entries 7 and 9 kept
    keep = benchmark.off_ties("lk_alpha", z, p)
    assert keep.shape == z.shape and not keep[1, 7] and keep.sum() == z.size - 1
    assert benchmark.off_ties("kl", z, p) is None
    ref = lkref.lk_alpha(z, p, impl="reference")
    jump = float(np.abs(ref.grad).max()) * 4e-4             # the first GPU run's flip
    flipped = ref.grad.copy()
    flipped[1, 7] += jump
    assert benchmark.rel_err(flipped, ref.grad) > benchmark.TOLERANCE
    assert benchmark.rel_err(flipped, ref.grad, keep) == 0.0
    elsewhere = ref.grad.copy()
    elsewhere[1, 9] += jump
    assert benchmark.rel_err(elsewhere, ref.grad, keep) > benchmark.TOLERANCE


def test_check_sees_nan_and_entries_left_unwritten(monkeypatch):
    """A path is timed only if its gradient matches: a NaN entry matches nothing (rel_err is inf),
    and a path that writes nothing fails even where its memory holds the right answer (the
    shared `out` after the previous path, a pool's block after the readable path's): the check
    fills `out` and new arrays with NaN first."""
    assert benchmark.rel_err(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == math.inf
    assert benchmark.rel_err(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    fn = lkref.LOSSES["lk_alpha"]
    z, p = benchmark.make_problem(np, 8, 300)
    ref = fn(z, p, impl="reference")
    monkeypatch.setattr(np, "empty_like", lambda *a, **k: ref.grad.copy())     # memory holding the answer
    out = ref.grad.copy()                                                       # as the previous path left it
    entries = [("right", lambda: fn(z, p, out=out), False),
               ("writes nothing into out", lambda: lkref.LossResult(ref.loss, out, ref.alpha), False),
               ("a new gradient never written", lambda: lkref.LossResult(ref.loss, np.empty_like(z), ref.alpha), True),
               ("NaN", lambda: lkref.LossResult(ref.loss, np.full_like(z, np.nan), ref.alpha), True)]
    monkeypatch.setattr(benchmark, "_entries", lambda *args: entries)
    said = []
    cands = benchmark._lkref_candidates(np, "numpy", fn, "lk_alpha", z, p, out, 8, 300, ref, said.append)
    assert [c.label for c in cands] == ["right"]
    assert len(said) == 3 and all("differs from the reference by inf" in line for line in said), said


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_two_byte_runs(tmp_path, monkeypatch, dtype):
    """--dtype float16 / bfloat16: logits, target and gradient in it, bytes counted at 2 an entry,
    checked against the reference at the gradient's rounding (one unit in the last place of the
    largest entry), the peers run on the same 2-byte values (PyTorch eager as torch tensors of
    that dtype, its error against lkref's small: it works in float32), the dtype in the CSV; a
    fast path off by 2 units is not timed."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("lk_alpha",), sizes=[(4, 300)], repeat=2, with_peers=True,
                         say=lines.append, dtype=dtype, skip_peers=("torch-compile",))
    lkref_rows = [r for r in rows if r.impl.startswith("lkref")]
    assert {r.impl for r in lkref_rows} == {"lkref", "lkref out=", "lkref reference"}
    assert "numpy-naive" in {r.impl for r in rows} and all(r.dtype == dtype for r in rows)
    assert any(f"({dtype} logits, target and gradient)" in line for line in lines)
    r = rows[0]
    assert r.dtype == dtype and r.gbps == pytest.approx(3 * 4 * 300 * 2 / (r.p50_ms / 1e3) / 1e9)
    assert all(r.max_rel_err <= benchmark.tolerance(dtype) for r in lkref_rows)
    if importlib.util.find_spec("torch") is not None:
        eager = next(r for r in rows if r.impl == "torch-eager")
        assert eager.max_rel_err <= benchmark.tolerance(dtype) and eager.vs_baseline > 0
    benchmark.write_csv(rows, str(tmp_path / "h.csv"), ["numpy"])
    assert {row["dtype"] for row in _csv_rows(tmp_path / "h.csv")} == {dtype}
    real, eps = fused.numpy_loss, benchmark.tolerance(dtype)

    def wrong(*a, **k):
        r = real(*a, **k)
        r.grad[...] = (r.grad.astype(np.float32) * (1 + 2 * eps)).astype(r.grad.dtype)
        return r
    monkeypatch.setattr(fused, "numpy_loss", wrong)
    lines = []
    rows = benchmark.run(backends=("numpy",), losses=("lk_alpha",), sizes=[(4, 300)], repeat=1, with_peers=False,
                         say=lines.append, dtype=dtype)
    assert {r.impl for r in rows} == {"lkref reference"}
    assert any("differs from the reference" in line for line in lines)


def test_peers_agree_with_lkref():
    mod = benchmark.load_peers()
    assert mod is not None
    z, p = benchmark.make_problem(np, 6, 50)
    for name in sorted(lkref.LOSSES):
        loss, grad = mod.numpy_naive(name)(z, p)
        ref = lkref.LOSSES[name](z, p, impl="reference")
        np.testing.assert_allclose(grad, ref.grad, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(loss, ref.loss, rtol=1e-5)


def test_verify_scaling_runs():
    lines = []
    rows = benchmark.verify_scaling(B=4, V=50, ks=(1, 3), repeat=2, say=lines.append)
    assert [r[0] for r in rows] == [1, 3] and all(r[1] > 0 and r[2] > 0 for r in rows)


def test_verify_scaling_on_cupy_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(benchmark, "cupy_available", lambda: False)
    lines = []
    assert benchmark.verify_scaling(B=4, V=50, ks=(1,), repeat=1, say=lines.append, backend="cupy") == []
    assert lines == ["cupy: not available (CuPy with a CUDA device), skipped"]


def test_bench_sampler_takes_the_backend(monkeypatch, capsys):
    """python -m lkref bench --sampler times verify on each backend asked for (it timed NumPy alone)."""
    from lkref.cli import main
    asked = []
    monkeypatch.setattr(benchmark, "verify_scaling", lambda repeat, backend: asked.append(backend))
    assert main(["bench", "--sampler", "--repeat", "1"]) == 0
    assert main(["bench", "--sampler", "--backend", "cupy"]) == 0
    assert asked == ["numpy", "cupy", "cupy"]


def _fake_peer_modules(monkeypatch, torch):
    """Stand-ins with the call forms of speculators.losses.fused and liger_kernel.ops.tvd (the real
    ones need Triton and a GPU): per-position losses from [B, T, V] draft and target logits, and
    a batch-mean TV on probabilities."""
    import sys
    import types

    def parts(z, t):
        q, p = z.float().softmax(-1), t.float().softmax(-1)
        return q, p, torch.minimum(q, p).sum(-1)

    fused_mod = types.ModuleType("speculators.losses.fused")
    fused_mod.fused_nla_loss = lambda z, t: -torch.log(parts(z, t)[2].clamp_min(1e-5))
    fused_mod.fused_tv_loss = lambda z, t: 1 - parts(z, t)[2]
    fused_mod.fused_kl_div_loss = lambda z, t: (torch.xlogy(parts(z, t)[1], parts(z, t)[1])
                                                - parts(z, t)[1] * z.float().log_softmax(-1)).sum(-1)
    tvd_mod = types.ModuleType("liger_kernel.ops.tvd")

    class LigerTVDLossFunction:
        @staticmethod
        def apply(q, p):
            return 0.5 * (q - p).abs().sum() / q.shape[0]
    tvd_mod.LigerTVDLossFunction = LigerTVDLossFunction
    ce_tvd_mod = types.ModuleType("liger_kernel.ops.fused_ce_tvd")

    class LigerFusedCETVDFunction:
        @staticmethod
        def apply(z, t, labels):
            q, p, _ = parts(z, t)
            ce = torch.logsumexp(z.float(), -1) - z.float().gather(-1, labels[:, None])[:, 0]
            return ce, 0.5 * (q - p).abs().sum(-1)
    ce_tvd_mod.LigerFusedCETVDFunction = LigerFusedCETVDFunction
    for name, mod in [("speculators", types.ModuleType("speculators")),
                      ("speculators.losses", types.ModuleType("speculators.losses")),
                      ("speculators.losses.fused", fused_mod), ("liger_kernel", types.ModuleType("liger_kernel")),
                      ("liger_kernel.ops", types.ModuleType("liger_kernel.ops")), ("liger_kernel.ops.tvd", tvd_mod),
                      ("liger_kernel.ops.fused_ce_tvd", ce_tvd_mod)]:
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["speculators.losses"].fused = fused_mod
    sys.modules["liger_kernel.ops"].tvd = tvd_mod
    sys.modules["liger_kernel.ops"].fused_ce_tvd = ce_tvd_mod


def test_speculators_and_liger_adapters(monkeypatch):
    """The glue for the GPU peers (shapes, log p as target logits, the mean over positions)
    gives lkref's loss and gradient when the peer computes the same loss."""
    torch = pytest.importorskip("torch")
    _fake_peer_modules(monkeypatch, torch)
    mod = benchmark.load_peers()
    z, p = benchmark.make_problem(np, 6, 50)
    cases = [(mod.speculators_loss(name), name) for name in ("lk_alpha", "tv", "kl")] + [(mod.liger_tv(), "tv")] \
        + [(mod.liger_fused(name), name) for name in ("lk_alpha", "tv")]
    assert mod.speculators_loss("lk_lambda") is None          # the stand-in has no lk_hybrid
    assert mod.liger_fused("kl") is None and mod.liger_fused("lk_lambda") is None
    assert {"speculators", "liger-fused", "liger-tvd"} <= set(mod.peers("cupy", "tv"))
    for fn, name in cases:
        args = (torch.as_tensor(z), torch.as_tensor(p))
        if hasattr(fn, "prepare"):
            args = fn.prepare(*args)
        loss, grad = fn(*args)
        ref = lkref.LOSSES[name](z, p, impl="reference")
        assert tuple(grad.shape) == z.shape
        np.testing.assert_allclose(grad.numpy(), ref.grad, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(float(loss), float(ref.loss), rtol=1e-5)


def test_gpu_peers_are_absent_without_their_libraries(monkeypatch):
    import sys
    for name in ("speculators", "speculators.losses", "speculators.losses.fused", "liger_kernel",
                 "liger_kernel.ops", "liger_kernel.ops.tvd", "liger_kernel.ops.fused_ce_tvd"):
        monkeypatch.setitem(sys.modules, name, None)           # import fails
    mod = benchmark.load_peers()
    assert mod.speculators_loss("lk_alpha") is None and mod.liger_tv() is None and mod.liger_fused("tv") is None


def _fake_speculators_tree(root, with_fused=True):
    """A speculators package whose __init__ files fail as the real ones do without transformers,
    pydantic, datasets...; only losses/fused.py (when present) can run."""
    pkg = root / "speculators"
    for sub in ("", "utils", "losses"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("import a_dependency_this_machine_lacks\n")
    (pkg / "utils" / "util.py").write_text("import a_dependency_this_machine_lacks\n")
    if with_fused:
        (pkg / "losses" / "fused.py").write_text(
            "from speculators.utils.util import is_npu_available\n"
            "ON_NPU = is_npu_available()\n"
            "def fused_nla_loss(logits, targets):\n    return None\n")


def _speculators_modules():
    import sys
    return [k for k in sys.modules if k == "speculators" or k.startswith("speculators.")]


@pytest.fixture
def fake_speculators(tmp_path, monkeypatch):
    """A fake speculators tree first on sys.path, none of speculators in sys.modules before the
    test, and none left after it (the loader registers stand-in packages)."""
    import sys
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in _speculators_modules():
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in _speculators_modules():
        del sys.modules[name]


def test_speculators_fused_file_loads_alone(fake_speculators):
    """The device image lacks speculators' package dependencies: its fused losses file is then
    loaded by itself, with the package __init__s (which fail) not run."""
    _fake_speculators_tree(fake_speculators)
    mod = benchmark.load_peers()
    fused_mod = mod._speculators_fused()
    assert fused_mod is not None and fused_mod.LOADED_ALONE
    assert fused_mod.__file__ == str(fake_speculators / "speculators" / "losses" / "fused.py")
    assert fused_mod.ON_NPU is False
    assert mod.speculators_loss("lk_alpha") is not None
    assert mod.speculators_loss("tv") is None                    # the file has no fused_tv_loss


def test_speculators_fused_file_that_fails_leaves_nothing_behind(fake_speculators, capsys):
    """A fused.py that raises (say, a Triton too old for it) is reported once per try, and no
    half-made module stays in sys.modules for the next try to pick up."""
    _fake_speculators_tree(fake_speculators)
    (fake_speculators / "speculators" / "losses" / "fused.py").write_text(
        "def fused_nla_loss(logits, targets):\n    return None\nraise RuntimeError('too old')\n")
    mod = benchmark.load_peers()
    assert mod.speculators_loss("lk_alpha") is None and mod.speculators_loss("lk_alpha") is None
    assert not _speculators_modules()
    assert capsys.readouterr().err.count("did not load alone: RuntimeError: too old") == 2


def test_speculators_without_its_fused_file_is_absent(fake_speculators):
    _fake_speculators_tree(fake_speculators, with_fused=False)
    assert benchmark.load_peers().speculators_loss("lk_alpha") is None


def _peers_interpret(code):
    """bench/peers_interpret.py's main run by `code` in a fresh process (the interpreter must be
    switched on before Triton loads); skipped where torch or Triton is absent (as in CI)."""
    import importlib.util
    import os
    import subprocess
    import sys
    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "peers_interpret.py")
    prelude = ("import importlib.util, sys\n"
               f"spec = importlib.util.spec_from_file_location('peers_interpret', {script!r})\n"
               "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=600)


def test_real_peers_in_the_triton_interpreter():
    """The adapters against the real peer code (bench/peer_wheels.sh's wheels, where installed),
    run by Triton's CPU interpreter at a V that makes speculators autotune; each that computes
    lkref's loss must agree with the readable path."""
    import importlib.util
    done = _peers_interpret("sys.exit(mod.main(['--rows', '8', '--vocab', '3000']))")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    out = done.stdout
    assert out.count(" ok") >= 4                                   # torch-eager, every loss
    for package, label, lines in (("speculators", "speculators ", 3), ("liger_kernel", "liger-", 3),
                                  ("specforge", "specforge", 3)):
        if importlib.util.find_spec(package) is not None:
            assert sum(label in line and line.split("  ")[-1].startswith("ok") for line in out.splitlines()) \
                == lines, out
    if importlib.util.find_spec("specforge") is not None:       # its KL is the soft cross-entropy
        assert out.count("ok (the gradient; soft cross-entropy") == 2, out


def test_peers_interpret_fails_on_a_wrong_peer():
    """Negative control: torch-eager's LK^alpha gradient off by 0.1 % must fail the check."""
    done = _peers_interpret(
        "real = mod.load_peers\n"
        "def load_peers():\n"
        "    m = real(); make = m.torch_loss\n"
        "    def torch_loss(name, compiled=False):\n"
        "        run = make(name, compiled)\n"
        "        if name != 'lk_alpha' or run is None:\n"
        "            return run\n"
        "        return lambda z, p: (lambda r: (r[0], r[1] * 1.001))(run(z, p))\n"
        "    m.torch_loss = torch_loss\n"
        "    return m\n"
        "mod.load_peers = load_peers\n"
        "sys.exit(mod.main(['--rows', '4', '--vocab', '300']))\n")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "lk_alpha  torch-eager" in done.stdout and "DIFFERS" in done.stdout


def test_peers_against_the_conformance_kit():
    """bench/peers_conformance.py where torch is installed: the benchmark's direct NumPy translation
    fails only where alpha underflows (it takes -log of a sum), and PyTorch eager (autograd
    through torch.minimum) only there and at the ties, named as half weight at ties."""
    import os
    import subprocess
    import sys
    pytest.importorskip("torch")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "peers_conformance.py")], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    failed, label = {}, None
    for line in done.stdout.splitlines():
        if line.startswith("## ") and "passed" in line:
            label = line.split()[1]
            failed[label] = {}
        elif label and "  FAIL  " in line:
            failed[label][line.split()[0]] = line
    assert set(failed["numpy-naive"]) == {"alpha_zero/lk_alpha", "alpha_zero_f32/lk_alpha"}, done.stdout
    assert all("log space" in line for line in failed["numpy-naive"].values())
    ties = {"ties/tv", "ties/lk_alpha", "ties/lk_lambda"}
    assert set(failed["torch-eager"]) == ties | set(failed["numpy-naive"]), done.stdout
    assert all("'half_ties'" in failed["torch-eager"][case] for case in ties)


def test_peer_sampler_probe_where_transformers_is_installed():
    """bench/peers_sampler.py (skipped without torch and transformers, as in CI): both samplers pass
    check_sampler's statistics at 20 000 rounds, and lkref.verify rejects a p = 0 draft at the
    uniform 0.0.  transformers fails that probe up to 5.24 (r <= p/q) and passes it from 5.25
    (r < p/q), as the README says; a release that changes this again fails here."""
    import os
    import subprocess
    import sys
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "peers_sampler.py"), "--trials", "20000"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("structure ") and " pass " in line for line in lines) == 2, done.stdout
    assert [line for line in lines if " FAIL " in line and not line.startswith("p = 0 draft")] == [], done.stdout
    theirs, ours = done.stdout.split("## lkref.verify", 1)
    assert "p = 0 draft at u = 0  pass" in ours and "FAIL" not in ours, done.stdout
    import transformers
    fixed = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 25)
    assert ("p = 0 draft at u = 0  pass" if fixed else "p = 0 draft at u = 0  FAIL") in theirs, done.stdout


def _fake_cupy():
    """NumPy dressed as CuPy for the benchmark's own code (events, memory pool, device name);
    the losses still see NumPy arrays, so this checks the GPU branch of the bench, not the kernels."""
    import types

    fake = types.ModuleType("cupy")
    for name in dir(np):
        if not name.startswith("__"):
            setattr(fake, name, getattr(np, name))

    class Event:
        def record(self):
            import time
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    class Pool:
        def used_bytes(self):
            return 0

        def total_bytes(self):
            return 1 << 20

        def free_all_blocks(self):
            pass

    class Device:
        id = 0

        def synchronize(self):
            pass

    fake.cuda = types.SimpleNamespace(
        Event=Event, Device=Device, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU"}, getDeviceCount=lambda: 1))
    fake.get_default_memory_pool = Pool
    return fake


def test_the_gpu_branch_of_the_bench_runs(monkeypatch, tmp_path):
    import sys
    from lkref import fused_cupy
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(benchmark, "cupy_available", lambda: True)
    lines = []
    rows = benchmark.run(backends=("cupy",), losses=("lk_alpha", "lk_lambda"), sizes={"cupy": [(4, 300)]},
                         repeat=2, with_peers=False, say=lines.append)
    impls = {(r.loss, r.impl) for r in rows}
    shapes = {benchmark.shape_label(*shape) for shape in benchmark.TUNING_SHAPES}
    assert {("lk_alpha", s) for s in shapes} <= impls
    assert {("lk_alpha", benchmark.GENERIC_LABEL), ("lk_alpha", benchmark.EXPF_LABEL), ("lk_alpha", benchmark.SCALAR_LABEL)} | {("lk_alpha", f"fused stream {t}t") for t in benchmark.STREAM_THREADS} <= impls
    assert {("lk_lambda", "lkref fused lam="), ("lk_alpha", "lkref reference")} <= impls
    assert ("lk_lambda", benchmark.LOGF_LABEL + " lam=") in impls       # one launch, as 'lkref fused lam='
    pipe = benchmark.pipe_label(*benchmark.PIPE_SHAPES[0])
    assert pipe == "fused pipelined 512t/8k" and len(benchmark.PIPE_SHAPES) == 2
    assert {("lk_alpha", pipe), ("lk_lambda", pipe + " lam="),
            ("lk_alpha", benchmark.pipe_label(*benchmark.PIPE_SHAPES[1])),
            ("lk_alpha", benchmark.AHEAD_LABEL), ("lk_lambda", benchmark.AHEAD_LABEL + " lam=")} <= impls
    leads = [benchmark.lead_label(f) for f in benchmark.LEAD_FRACTIONS]
    assert leads == ["fused L2 lead 0.25", "fused L2 lead 0.5", "fused L2 lead 1"]
    assert {("lk_alpha", lead) for lead in leads} | {("lk_lambda", lead + " lam=") for lead in leads} <= impls
    assert not any(impl.startswith(benchmark.LOGF_LABEL) for loss, impl in impls if loss == "lk_alpha")   # no log p
    assert ("lk_alpha", benchmark.MEETING_LABEL) not in impls        # V = 300: one block per row
    assert not {("lk_alpha", benchmark.PAIRS_LABEL)} & impls           # float32: no pairs to copy
    rows16 = benchmark.run(backends=("cupy",), losses=("lk_alpha",), sizes={"cupy": [(4, 300)]}, repeat=1,
                           with_peers=False, say=lines.append, dtype="float16")
    impls16 = {r.impl for r in rows16}
    assert {benchmark.SCALAR_LABEL, benchmark.PAIRS_LABEL, "lkref fused"} <= impls16   # 2-byte: 4 a copy or not
    assert not {benchmark.EXPF_LABEL, benchmark.GENERIC_LABEL} & impls16              # timed in float32 only
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: True)
    rows = benchmark.run(backends=("cupy",), losses=("lk_alpha",), sizes={"cupy": [(2, 40_000)]},
                         repeat=1, with_peers=False, say=lines.append)
    assert ("lk_alpha", benchmark.MEETING_LABEL) in {(r.loss, r.impl) for r in rows}   # two blocks per row
    assert fused_cupy.CLUSTERS is True                                # restored
    assert lines[0].startswith("== lkref ") and "Fake GPU" in lines[1] and fused_cupy.THREADS == 512
    benchmark.write_csv(rows, str(tmp_path / "g.csv"), ["cupy"])
    assert "Fake GPU" in (tmp_path / "g.csv").read_text()


def test_the_profiled_program_runs(monkeypatch, capsys):
    """bench/gpu_profile.py (what gpu_check.sh runs under ncu) on the fake CuPy, at a small N."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    mod = _load_bench("gpu_profile")
    make = benchmark.make_problem
    monkeypatch.setattr(mod, "make_problem", lambda xp, N, V: make(xp, 4, V))
    mod.main(["1000", "256", "16384"])
    assert "lk_alpha N=4096 V=1000 threads=256 block_share=16384 (items, cluster) = (4, 1)" in capsys.readouterr().out


def test_the_sanitized_program_runs_and_fails_on_a_wrong_result(monkeypatch, capsys):
    """bench/gpu_sanitize.py (what gpu_check.sh runs under compute-sanitizer) on the fake CuPy:
    every case runs and matches the reference, the cases marked clusters=False as on a GPU
    without clusters; a fused path 0.1 % off fails every case."""
    import lkref
    from lkref import fused_cupy
    fake = _fake_cupy()
    allocators = []
    fake.cuda.set_allocator = allocators.append
    monkeypatch.setitem(sys.modules, "cupy", fake)
    mod = _load_bench("gpu_sanitize")
    monkeypatch.setattr(mod.lkref, "cupy_available", lambda: True)
    right = dict(lkref.LOSSES)
    seen = []                                        # whether each fused call saw clusters

    def watched(name):
        def loss(*args, impl="auto", **kw):
            if impl == "fused":
                seen.append(fused_cupy._uses_clusters(fake))
            return right[name](*args, impl=impl, **kw)
        return loss
    monkeypatch.setattr(fused_cupy, "_has_clusters", lambda cp: True)
    monkeypatch.setattr(mod.lkref, "LOSSES", {name: watched(name) for name in right})
    assert mod.main([]) == 0 and allocators == [None]
    assert seen == [case[4].get("clusters", True) for case in mod.CASES] and False in seen
    assert fused_cupy.CLUSTERS is True               # restored after each case
    out = capsys.readouterr().out
    assert out.count("  ok ") == len(mod.CASES) and f"{len(mod.CASES)} cases, 0 failed" in out

    def off(name):
        def loss(*args, impl="auto", **kw):
            r = right[name](*args, impl=impl, **kw)
            return r._replace(grad=r.grad * 1.001) if impl == "fused" else r
        return loss
    monkeypatch.setattr(mod.lkref, "LOSSES", {name: off(name) for name in right})
    assert mod.main([]) == 1
    assert f"{len(mod.CASES)} cases, {len(mod.CASES)} failed" in capsys.readouterr().out


def test_gpu_check_runs_through_without_a_gpu(tmp_path):
    """bench/gpu_check.sh as on a machine without a GPU (a stand-in compute-sanitizer that just runs
    the program): every step runs and says so, none breaks (no traceback, no missing file or
    command), and its files land in $OUT.  On the device a broken step would cost minutes."""
    import os
    import shutil
    import subprocess
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift 2; done\nexec "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), LKREF_GPU_CHECK_BUDGET_S="600", LKREF_GIT_SHA="abc1234",
               CUDA_VISIBLE_DEVICES="",            # where a GPU is, the check must not run on it from here
               CUPY_CACHE_DIR=str(tmp_path / "cache"), LKREF_CUPY_CACHE_IN=str(tmp_path / "carried"),  # not
               # this machine's: a checkout's own .cupy-cache/ (git ignores it) would be unpacked and packed
               PATH=f"{fake.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    for bad in ("Traceback", "No such file", "command not found", "Error"):
        assert bad not in text, text[-3000:]
    steps = ["git abc1234", "== the kernel variants", "== GPU tests", "== quick benchmark: lkref\n",
             "== quick benchmark: lkref and the peers", "== compute-sanitizer", "nothing to sanitize",
             "== quick benchmark: LK^alpha in float16", "== quick benchmark: LK^lambda", "== the goals", "== quick benchmark: LK^alpha beside torch.compile",
             "== the kernel cache, packed for the next run", "kernel cache: nothing to pack", "== done in"]
    for step in steps:
        assert step in text, (step, text[-3000:])
    assert {"env.txt", "warm.txt", "tests.txt", "bench.txt", "goals.md"} <= \
        {name.split("-")[-1] for name in os.listdir(out)}


def test_nvrtc_check_compiles_the_sources_the_device_builds(monkeypatch):
    """bench/nvrtc_check.py compiles gpu_warm.source(spec), its target cache sized for an H100
    (227 KiB a block), off the device; the warm-up there builds each variant through
    fused_cupy._kernel.  A kernel cache built here (--cache) is found there only if the two
    sources are the same to the byte: for every sm_90 variant, they are (bfloat16 ones
    where ml_dtypes is installed)."""
    import importlib.util
    import types
    from lkref import fused_cupy
    warm = _load_bench("gpu_warm")
    h100 = _load_bench("kernel_resources").SMEM_KIB[90][1] * 1024     # what nvrtc_check.py sizes sm_90's for
    assert h100 == 232_448                                   # an H100's cudaDevAttrMaxSharedMemoryPerBlockOptin
    compiled = []

    class RawKernel:
        def __init__(self, src, name, options=()):
            self.options = options
            if name == "lk_rows":
                compiled.append(src)

        def compile(self):
            pass

    fake = types.ModuleType("cupy")
    fake.RawKernel = RawKernel
    fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0, compute_capability="90"))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(fused_cupy, "_cache", {})
    monkeypatch.setattr(fused_cupy, "_smem_optin", lambda cp: h100)
    specs = warm.variants(clusters=True)
    if importlib.util.find_spec("ml_dtypes") is None:
        specs = [s for s in specs if "bfloat16" not in (s.dt, s.pdt)]
    assert len(specs) > 300
    for spec in specs:
        before = len(compiled)
        fused_cupy._cache.clear()                           # (one key for variants that differ in optin alone)
        warm._compile(spec)
        assert len(compiled) == before + 1, warm.describe(spec)
        assert compiled[-1] == warm.source(spec._replace(optin=spec.optin or h100)), warm.describe(spec)


def test_gpu_check_writes_what_the_device_tool_brings_back():
    """The device tool brings back at most 8 files from $OUT, each named in letters, digits,
    '.', '_' and '-' (/work/.library/device/README.md): gpu_check.sh writes no more (a ninth
    would be left on the machine, which is given back), and each name is of those characters
    once the card's name (tr -cd there) is put in."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench", "gpu_check.sh")) as f:
        script = f.read()
    names = set(re.findall(r'\$out/([^"\s)]+)', script))
    assert names and len(names) <= 8, sorted(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name.replace("$card", "NVIDIA-H100-80GB-HBM3")), name


def test_kernel_cache_carries_what_a_run_used(tmp_path, monkeypatch, capsys):
    """bench/kernel_cache.py: a first run packs its whole cache; the next unpacks it (access
    times 0, a marker) and packs only what it built or read again (a read emulated by setting
    the access time, as Linux does on reading a file whose access time is older than its
    modification time), so kernels of changed sources are left behind; where no unpacked file
    was read (access times not tracked) it keeps every file; an archive over the limit is not
    written; names that are not flat file names are not extracted."""
    import os
    import tarfile
    import time
    cache = _load_bench("kernel_cache")
    first, second = tmp_path / "run1", tmp_path / "run2"
    first.mkdir()
    for name in ("a", "b", "c"):
        (first / name).write_bytes(name.encode() * 1000)
    archive = str(tmp_path / "one.tar.xz")
    assert cache.pack(str(tmp_path / "absent"), archive) == "kernel cache: nothing to pack"
    assert "3 files (3 built this run, 0 of the 0 unpacked" in cache.pack(str(first), archive)
    assert cache.unpack(archive, str(second)) == 3
    assert {os.stat(second / n).st_atime for n in "abc"} == {0}
    assert (second / "b").read_bytes() == b"b" * 1000
    os.utime(second / "b", (0, os.stat(second / "b").st_mtime))     # (the check above read it)
    later = time.time() + 1
    os.utime(second / "a", (later, os.stat(second / "a").st_mtime))   # read again by this run
    (second / "d").write_bytes(b"new")                                # built by this run
    keep, built, read, unpacked = cache.used(str(second))
    assert (keep, built, read, unpacked) == (["a", "d"], 1, 1, 3)
    two = str(tmp_path / "two.tar.xz")
    assert "2 files (1 built this run, 1 of the 3 unpacked read again)" in cache.pack(str(second), two)
    with tarfile.open(two) as tar:
        assert sorted(tar.getnames()) == ["a", "d"]
    os.utime(second / "a", (0, os.stat(second / "a").st_mtime))       # nothing read: untracked
    assert cache.used(str(second))[0] == ["a", "b", "c", "d"]
    monkeypatch.setattr(cache, "LIMIT_MIB", 1e-6)
    assert "not packed" in cache.pack(str(second), str(tmp_path / "big.tar.xz"))
    assert not os.path.exists(tmp_path / "big.tar.xz") and not os.path.exists(tmp_path / "big.tar.xz.part")
    odd = str(tmp_path / "odd.tar")
    with tarfile.open(odd, "w") as tar:
        for name in ("../escape", "sub/x", "./ok"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, __import__("io").BytesIO(b"hi"))
    third = tmp_path / "run3"
    assert cache.unpack(odd, str(third)) == 1 and sorted(os.listdir(third)) == [cache.MARKER, "ok"]
    assert not os.path.exists(tmp_path / "escape")


def test_kernel_cache_unpacks_several_archives(tmp_path):
    """The last run's archive and one built before the run (bench/nvrtc_check.py --cache) are
    unpacked into one cache: a file the first gave is not extracted again, the marker keeps the
    first unpacking's time and counts each file once, and packing keeps what the run read of
    either."""
    import os
    import time
    cache = _load_bench("kernel_cache")
    src, folder = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    for name in "abc":
        (src / name).write_bytes(name.encode() * 100)
    archives = {}
    for key, names in (("run", "ab"), ("prebuilt", "bc")):
        part = tmp_path / key
        part.mkdir()
        for name in names:
            (part / name).write_bytes((src / name).read_bytes())
        archives[key] = str(tmp_path / f"{key}.tar.xz")
        assert f"{len(names)} files" in cache.pack(str(part), archives[key])
    assert cache.unpack(archives["run"], str(folder)) == 2
    first = cache._marker(str(folder))
    time.sleep(0.01)
    assert cache.unpack(archives["prebuilt"], str(folder)) == 1       # b: the run's already
    assert cache._marker(str(folder)) == (first[0], 3)
    assert sorted(os.listdir(folder)) == [cache.MARKER, "a", "b", "c"]
    later = time.time() + 1
    for name in "ac":                                                  # read again by this run
        os.utime(folder / name, (later, os.stat(folder / name).st_mtime))
    assert cache.used(str(folder)) == (["a", "c"], 0, 2, 3)


def test_git_sha_from_the_environment(monkeypatch):
    monkeypatch.setenv("LKREF_GIT_SHA", "abc1234")
    assert benchmark.git_sha() == "abc1234"
    monkeypatch.delenv("LKREF_GIT_SHA")
    assert benchmark.git_sha() != "abc1234"


def _load_bench(name):
    """A script of bench/ as a module (bench/ is not a package)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"lkref_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_goals():
    return _load_bench("goals")


def test_gpu_warm_compiles_each_source_once_and_covers_the_tests():
    """bench/gpu_warm.py: one variant per kernel source, covering the GPU tests' row lengths and
    the benchmark's launch shapes at the goal sizes."""
    from lkref import fused_cupy

    from . import test_gpu
    warm = _load_bench("gpu_warm")
    specs = warm.variants()
    sources = set()
    for s in specs:
        with fused_cupy.configured(threads=s.threads, block_share=s.share, cache_target=s.cache, stream=s.stream):
            items, cluster = fused_cupy.plan(s.V)
            c = fused_cupy._ctype(s.dt)
            cached = items if s.pipe else fused_cupy.cached_items(items, s.optin, phase=s.phase)
            sources.add((s.dt, fused_cupy.kernel_source(items, cluster, c, c, dsmem=s.dsmem, p_t=fused_cupy._ctype(s.pdt),
                                                        cached=cached, pairs=s.pairs, mode=s.mode, phase=s.phase,
                                                        exp2=s.exp2, vec=s.vec, fast_log=s.fast_log, pipe=s.pipe,
                                                        ahead=s.ahead, lead=s.lead)))
    assert len(sources) == len(specs)                       # nothing compiled twice
    modes = {(m, phase) for m in fused_cupy.MODES.values() for phase in (0, 1, 2)}
    alpha = (fused_cupy.MODES["lk_alpha"], 0)
    built = {}                                              # what the tests run: the kernels built for each
    for s in specs:
        with fused_cupy.configured(threads=s.threads, block_share=s.share, cache_target=s.cache, stream=s.stream):
            head = (s.threads, s.cache, s.dt if s.dt == s.pdt else (s.dt, s.pdt), fused_cupy.plan(s.V), s.dsmem, s.optin)
        tail = (() if s.exp2 == fused_cupy.EXP2 else ("expf",)) + (("vec",) if s.vec else ()) \
            + (() if s.fast_log == fused_cupy.FAST_LOG else ("logf",)) + (("pipe",) if s.pipe else ()) \
            + (("ahead",) if s.ahead else ()) + (("lead",) if s.lead else ())
        # the gradient launch keeps no target in shared memory: with pairs or without, one source
        for pairs in ({False, s.pdt != "float32"} if s.phase == 2 else {s.pairs}):
            built.setdefault(head + (("pairs",) if pairs else ()) + tail, set()).add((s.mode, s.phase))
    covered = {key for key, m in built.items() if m >= modes}        # every loss's kernels, one and two passes

    def f32_both(V, dsmem, optin=None, share=None):
        """A float32 row of V: the scalar kernels (draft_to_target), and the VEC ones too where V
        allows them (aligned float32 arrays without draft_to_target)."""
        with fused_cupy.configured(block_share=share):
            key = (fused_cupy.THREADS, True, "float32", fused_cupy.plan(V), dsmem, optin)
            shape = (fused_cupy.THREADS, fused_cupy.BLOCK_SHARE, True)
            src = warm.source(warm.Spec(*shape, "float32", "float32", V, dsmem, optin, False, 2, 0, False,
                                        fused_cupy.EXP2, True, fused_cupy.FAST_LOG))
        assert key in covered, V
        if "#define VEC 1" in src:
            assert key + ("vec",) in covered, V
        return "#define VEC 1" in src
    marks = [m for m in test_gpu.test_fused_matches_reference_on_odd_shapes.pytestmark if m.args[0] == "N, V"]
    assert sum(f32_both(V, True) for _, V in marks[0].args[1]) >= 3     # 300, 32 000, 128 256 at least
    marks = [m for m in test_gpu.test_fused_without_clusters_blocks_meet_in_global_memory.pytestmark
             if m.args[0] == "N, V, cluster"]
    for _, V, _ in marks[0].args[1]:
        f32_both(V, False)
    marks = [m for m in test_gpu.test_fused_partial_target_cache_as_on_gpus_with_less_shared_memory.pytestmark
             if m.args[0] == "V"]
    for V in marks[0].args[1]:
        f32_both(V, False, 99 * 1024, 32_768)
    marks = [m for m in test_gpu.test_fused_two_byte_targets_read_as_they_are.pytestmark if m.args[0] == "V"]
    for V in marks[0].args[1]:
        assert (fused_cupy.THREADS, True, "float16", fused_cupy.plan(V), True, None) in covered, V
        assert (fused_cupy.THREADS, True, "float16", fused_cupy.plan(V), True, None, "vec") in covered, V
        assert (fused_cupy.THREADS, True, "float16", fused_cupy.plan(V), True, None, "pairs") in covered, V
    assert (fused_cupy.THREADS, True, ("float16", "float32"), fused_cupy.plan(4099), True, None) in covered
    assert (fused_cupy.THREADS, True, "bfloat16", fused_cupy.plan(4099), True, None) in covered
    for dt in ("bfloat16", ("float16", "float32")):         # test_fused_two_byte_logits_four_adjacent_entries
        for vec in ((), ("vec",)):
            assert (fused_cupy.THREADS, True, dt, fused_cupy.plan(32_000), True, None) + vec in covered, (dt, vec)
    for threads, share, cache in benchmark.TUNING_SHAPES:
        for V in (32_000, 128_256):
            with fused_cupy.configured(threads=threads, block_share=share):
                items = fused_cupy.plan(V)[0]
                vec = ("vec",) if items and items % 4 == 0 else ()   # 63 entries a thread, or streamed: one column
                assert alpha in built[(threads, cache, "float32", fused_cupy.plan(V), True, None) + vec], \
                    (threads, share, V)
    for V in (32_000, 128_256):
        default = (fused_cupy.THREADS, True, "float32", fused_cupy.plan(V), True, None)
        assert (None, None) in built[default + ("vec",)]                            # generic
        assert alpha in built[default + ("expf", "vec")]
        assert alpha in built[default]                                             # scalar
        kl, lam = fused_cupy.MODES["kl"], fused_cupy.MODES["lk_lambda"]
        assert {(kl, 0), (lam, 0)} <= built[default + ("vec", "logf")]               # 'fused logf', lam= for LK^lambda
    for V in (3, 32_000):                                   # tests/test_gpu.py: logf, LK^lambda with its batch lambda
        vec = ("vec",) if V % 4 == 0 else ()
        assert {(kl, 0), (lam, 1), (lam, 2)} <= \
            built[(fused_cupy.THREADS, True, "float32", fused_cupy.plan(V), True, None) + vec + ("logf",)], V
        for threads in benchmark.STREAM_THREADS:
            assert alpha in built[(threads, True, "float32", (0, 1), True, None)], (threads, V)
    marks = [m for m in test_gpu.test_fused_pipelined_rows.pytestmark if m.args[0] == "V"]
    for (threads, share), vocabs in zip(benchmark.PIPE_SHAPES, (marks[0].args[1] + [32_000], [32_000])):
        with fused_cupy.configured(threads=threads, block_share=share):   # the GPU test's, the benchmark's
            for V in vocabs:
                key = (threads, True, "float32", fused_cupy.plan(V), True, None, "vec", "pipe")
                want = {(m, 0) for m in fused_cupy.MODES.values()} if threads == 512 else \
                    {(fused_cupy.MODES[m], 0) for m in ("lk_alpha", "lk_lambda")}
                assert want <= built[key], (threads, V)
    marks = [m for m in test_gpu.test_fused_rows_fetched_into_l2_ahead.pytestmark if m.args[0] == "V"]
    for V in marks[0].args[1] + [32_000, 128_256]:          # the GPU test's, the benchmark's ('fused L2 ahead')
        key = (fused_cupy.THREADS, True, "float32", fused_cupy.plan(V), True, None, "vec", "ahead")
        assert {(m, 0) for m in fused_cupy.MODES.values()} <= built[key], V
    marks = [m for m in test_gpu.test_fused_rows_fetched_into_l2_by_lead.pytestmark if m.args[0] == "V"]
    for V in marks[0].args[1] + [32_000, 128_256]:          # the GPU test's, the benchmark's ('fused L2 lead')
        key = (fused_cupy.THREADS, True, "float32", fused_cupy.plan(V), True, None, "vec", "lead")
        assert {(m, 0) for m in fused_cupy.MODES.values()} | {(lam, 1), (lam, 2)} <= built[key], V
    assert not any(s.pipe or s.ahead or s.lead for s in warm.variants(clusters=False))    # clusters only
    assert all(s.dsmem is False for s in warm.variants(clusters=False))     # a GPU before Hopper
    assert all(s.pdt == s.dt != "float32" for s in specs if s.pairs)         # pairs: 2-byte targets only


def test_gpu_warm_builds_through_lkrefs_own_kernel_cache(monkeypatch):
    """_compile (run in worker processes on the GPU) calls fused_cupy._kernel as the losses do,
    the smaller GPU's shared memory only for the variant that asks for it (a worker process
    goes on to other variants)."""
    import types
    from lkref import fused_cupy
    warm = _load_bench("gpu_warm")
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability="90"))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    built = []
    monkeypatch.setattr(fused_cupy, "_smem_optin", fused_cupy._smem_optin)    # _compile's change is undone
    monkeypatch.setattr(fused_cupy, "_kernel", lambda i, o, items, cluster, dsmem, p, pairs, mode, phase, vec, pipe, ahead,
                        lead: built.append((str(i), str(o), items, cluster, dsmem, str(p), pairs, fused_cupy.THREADS,
                                            fused_cupy.BLOCK_SHARE, fused_cupy._smem_optin(fake), mode, phase,
                                            fused_cupy.EXP2, vec, fused_cupy.FAST_LOG) + ((pipe,) if pipe else ())
                                           + (("ahead",) if ahead else ()) + (("lead",) if lead else ())))
    Spec = warm.Spec
    warm._compile(Spec(512, 16_384, True, "float32", "float32", 128_256, True, None, False, 2, 0, False, True, True, True))
    warm._compile(Spec(512, 32_768, True, "float16", "float32", 4099, True, None, False, 0, 1, False, True, False, True))
    warm._compile(Spec(512, 32_768, True, "float16", "float16", 32_000, True, None, True, 1, 0, False, True, False, True))
    warm._compile(Spec(512, 32_768, True, "float32", "float32", 50_257, False, None, False, 3, 2, False, False, False,
                       False))
    warm._compile(Spec(1024, 32_768, True, "float32", "float32", 32_000, True, None, False, 2, 0, True, True, False, True))
    warm._compile(Spec(512, 32_768, True, "float32", "float32", 32_000, False, 99 * 1024, False, None, None, False, True,
                       False, True))
    warm._compile(Spec(512, 8_192, True, "float32", "float32", 32_000, True, None, False, 2, 0, False, True, True, True, 3))
    warm._compile(Spec(512, 16_384, True, "float32", "float32", 32_000, True, None, False, 2, 0, False, True, True, True, 0,
                       True))
    warm._compile(Spec(512, 16_384, True, "float32", "float32", 32_000, True, None, False, 3, 1, False, True, True, True, 0,
                       False, True))
    assert built == [("float32", "float32", 32, 8, True, "float32", False, 512, 16_384, None, 2, 0, True, True, True),
                     ("float16", "float16", 9, 1, True, "float32", False, 512, 32_768, None, 0, 1, True, False, True),
                     ("float16", "float16", 63, 1, True, "float16", True, 512, 32_768, None, 1, 0, True, False, True),
                     ("float32", "float32", 50, 2, False, "float32", False, 512, 32_768, None, 3, 2, False, False, False),
                     ("float32", "float32", 0, 1, True, "float32", False, 1024, 32_768, None, 2, 0, True, False, True),
                     ("float32", "float32", 63, 1, False, "float32", False, 512, 32_768, 99 * 1024, None, None, True,
                      False, True),
                     ("float32", "float32", 16, 4, True, "float32", False, 512, 8_192, None, 2, 0, True, True, True, 3),
                     ("float32", "float32", 32, 2, True, "float32", False, 512, 16_384, None, 2, 0, True, True, True,
                      "ahead"),
                     ("float32", "float32", 32, 2, True, "float32", False, 512, 16_384, None, 3, 1, True, True, True,
                      "lead")]
    assert fused_cupy.FAST_LOG is True and fused_cupy.EXP2 is True            # restored after each


def _gpu_rows(alpha_ms, lam_ms, extra_mib):
    def row(impl, loss, V, p50, extra=extra_mib):
        return benchmark.Row("cupy", impl, loss, 4096, V, p50, p50, p50, 1.0, 1.0, 1.0, extra, 1e-7)
    rows = []
    for V in (32_000, 128_256):
        rows += [row("lkref fused", "lk_alpha", V, alpha_ms[V]), row("lkref fused", "lk_lambda", V, lam_ms[V]),
                 row("lkref fused lam=", "lk_lambda", V, alpha_ms[V]), row("speculators", "lk_alpha", V, 5.0),
                 row("fused 512t/16k", "lk_alpha", V, alpha_ms[V] * 0.9), row("fused 1024t/32k", "lk_alpha", V, 9.0)]
    return rows


def _report(goals, path):
    """(all goals met, the lines, the text) of bench/goals.py's report on one CSV file."""
    lines = []
    ok = goals.report([str(path)], say=lines.append)
    return ok, lines, "\n".join(lines)


def test_goals_report_on_gpu_rows(tmp_path):
    goals = _load_goals()
    path = tmp_path / "gpu.csv"
    benchmark.write_csv(_gpu_rows({32_000: 0.7, 128_256: 2.9}, {32_000: 1.0, 128_256: 4.0}, 0.5), str(path),
                        ["numpy"], stamp="run-1")
    ok, lines, text = _report(goals, path)
    assert ok is True
    assert "| GPU LK^α N=4096 V=32000: ≤ 0.75 ms | 0.700 ms | yes |" in text
    assert "| GPU LK^λ V=128256 (batch λ, two launches): ≤ 1.5× LK^α | 4.000 ms = 1.38× | yes |" in text
    assert "| lk_alpha | 4096 | 128256 | speculators | 5.000 | 2.900 | 1.72× |" in text
    shapes = [line for line in lines if line.startswith("| 32000 | ")]   # the launch shapes, fastest first
    assert shapes == ["| 32000 | float32 | fused 512t/16k | 0.630 | 0.90× |",
                      "| 32000 | float32 | default | 0.700 | 1.00× |",
                      "| 32000 | float32 | fused 1024t/32k | 9.000 | 12.86× |"]
    assert not any("fused 512t/16k" in line and "**no**" in line for line in lines)   # shapes are no goals
    assert not any("logf for every p" in line for line in lines)            # no 'fused logf' rows: no table
    logf = [benchmark.Row("cupy", impl, loss, 4096, 32_000, t, t, t, 1.0, 1.0, 1.0, 0.5, 1e-7)
            for impl, loss, t in (("lkref fused", "kl", 0.8), (benchmark.LOGF_LABEL, "kl", 1.0),
                                  (benchmark.LOGF_LABEL + " lam=", "lk_lambda", 1.1))]
    benchmark.write_csv(logf, str(path), ["numpy"], stamp="run-1")
    ok, lines, text = _report(goals, path)
    assert "| kl | 32000 | 0.800 | 1.000 | 1.25× |" in text
    assert "| lk_lambda | 32000 | 0.700 | 1.100 | 1.57× |" in text          # beside 'lkref fused lam='
    assert not any("fused logf" in line for line in lines if line.startswith("| GPU") or "speculators" in line)
    # float16 rows of the same run, slower than the float32 goals: judged for memory only (the goals
    # are for float32), and beside a peer of their own dtype
    half = [benchmark.Row("cupy", impl, "lk_alpha", 4096, 32_000, t, t, t, 1.0, 1.0, 1.0, 0.5, 1e-4, dtype="float16")
            for impl, t in (("lkref fused", 5.0), ("speculators", 4.0), (benchmark.PAIRS_LABEL, 4.5))]
    benchmark.write_csv(half, str(path), ["numpy"], stamp="run-1")
    ok, lines, text = _report(goals, path)
    assert ok is True
    assert "| GPU LK^α N=4096 V=32000: ≤ 0.75 ms | 0.700 ms | yes |" in text
    assert "| GPU lk_alpha V=32000 (lkref fused, float16): extra memory O(N) (≤ 1 KiB per row) |" in text
    assert "| lk_alpha | 4096 | 32000 | speculators | 4.000 | 5.000 | 0.80× |" in text
    assert "| 32000 | float16 | fused 2-byte pairs | 4.500 | 0.90× |" in text      # beside its own default
    # a second run, each goal missed: reported apart from the first, and the report says so
    benchmark.write_csv(_gpu_rows({32_000: 0.8, 128_256: 3.1}, {32_000: 1.3, 128_256: 4.0}, 8.0), str(path),
                        ["numpy"], stamp="run-2")
    ok, lines, _ = _report(goals, path)
    assert ok is False
    second = "\n".join(lines[lines.index(next(x for x in lines if "run-2" in x)):])
    # LK^α at both V; LK^λ (batch λ) at V = 32 000 only (1.3 / 0.8 > 1.5, 4.0 / 3.1 < 1.5); memory on
    # the six lkref fused rows (LK^α, LK^λ, LK^λ lam=, at both V)
    assert second.count("**no**") == 2 + 1 + 6
    assert "| GPU LK^λ V=32000 (lam= given): ≤ 1.5× LK^α | 0.800 ms = 1.00× | yes |" in second
    assert "| GPU LK^α N=4096 V=32000: ≤ 0.75 ms | 1 of 2 runs |" in second            # the summary


def test_goals_report_on_the_committed_cpu_run():
    import glob
    import os
    goals = _load_goals()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "bench", "results", "cpu-*.csv")))
    assert paths
    lines = []
    goals.report(paths, say=lines.append)
    assert any("CPU LK^α N=512 V=32000" in line for line in lines)
    # a run of float16 rows only (no goal is for them) says so rather than leave its heading bare
    assert any(line.startswith("no goal applies to these rows (lk_alpha N=512 V=32000 float16") for line in lines)


def test_goals_report_on_the_committed_gpu_runs():
    """The H100 runs in bench/results/: the README's figures are these rows, and the goals they
    miss are reported as missed."""
    import glob
    import os
    goals = _load_goals()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "bench", "results", "gpu-NVIDIA-H100-*.csv")))
    assert paths
    ok, lines, text = _report(goals, paths[0])
    assert ok is False
    assert "| GPU LK^α N=4096 V=32000: ≤ 0.75 ms | 1.718 ms | **no** |" in text       # run 2, its default
    assert "| 32000 | float32 | fused 512t/16k | 1.226 | 0.71× |" in text             # the default since
    assert "| lk_alpha | 4096 | 32000 | liger-fused | 1.200 | 1.715 | 0.70× |" in text
    assert "| NVIDIA H100 80GB HBM3 | 35dc2c3 | GPU lk_alpha V=128256 (lkref fused): extra memory O(N) " \
           "(≤ 1 KiB per row) | 2 of 2 runs |" in text


def test_cpu_timing_interleaves_so_ratios_survive_slow_spells():
    """A machine that turns three times slower half-way: timed one after the other, the second
    implementation would look 3x slower than it is; interleaved, the ratio of the medians stays
    the true 2."""
    calls = [0]

    def speed():
        calls[0] += 1
        return 1.0 if calls[0] <= 22 else 3.0

    def cand(label, cost):
        return benchmark._Candidate(label, None, lambda: cost * speed(), lambda: 0.0, 0.0, lkref=True)
    import types
    freed = []
    pool = types.SimpleNamespace(free_all_blocks=lambda: freed.append(1))
    fake_cupy = types.SimpleNamespace(get_default_memory_pool=lambda: pool)
    for backend, xp, want in (("numpy", np, 2.0), ("cupy", fake_cupy, 6.0)):
        calls[0] = 0
        a, b = benchmark._time_all(xp, backend, [cand("a", 1.0), cand("b", 2.0)], repeat=20, say=print)
        assert np.median(b) / np.median(a) == want
    assert len(freed) == 2                            # on the GPU, lkref's pool after each candidate


def test_cpu_timing_spreads_a_noisy_neighbour_over_every_candidate():
    """One candidate slows whatever call comes next three times (as PyTorch's OpenMP threads,
    still spinning after its calls, slow the next candidate on a 2-core machine). The rounds'
    orders vary, so its neighbour changes: each of the four others, all of cost 1, keeps a
    median of 1. A rotated order (the benchmark until 2026-12-06) put the same candidate
    after it in every round, whose median was then 3."""
    after_noisy = [False]

    def cand(label, noisy=False):
        def once():
            ms = 3.0 if after_noisy[0] else 1.0
            after_noisy[0] = noisy
            return ms
        return benchmark._Candidate(label, None, once, lambda: 0.0, 0.0, lkref=True)
    cands = [cand(x) for x in "abcd"] + [cand("noisy", noisy=True)]
    times = benchmark._time_all(np, "numpy", cands, repeat=15, say=print)
    for label, t in zip("abcd", times):
        hit = sum(x == 3.0 for x in t)
        assert np.median(t) == 1.0, (label, hit)
        assert hit < len(t) / 2


def test_cpu_baseline_script_runs_both_parts(capsys):
    """bench/cpu_baseline.py (the README's figures on the direct translation's time), at its
    smoke-test sizes: a row per N in each part, the child process with glibc's variables
    set, and its refusals."""
    script = _load_bench("cpu_baseline")
    assert script.main(["--quick", "--repeat", "1", "--rows", "8,16"]) == 0
    out = capsys.readouterr().out
    assert "right after each neighbour" in out and "MALLOC_MMAP_THRESHOLD_=4294967296" in out
    lines = out.splitlines()
    assert sum(line.split()[:1] == ["8"] for line in lines) == 3           # part 1, part 2 here and kept
    assert any(line.split()[:2] == ["16", "kept"] for line in lines)
    for bad in (["--rows", "0"], ["--rows", "a"], ["--repeat", "0"]):
        with pytest.raises(SystemExit):
            script.main(bad)


def test_csv_names_the_peer_libraries_in_use(tmp_path, monkeypatch):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    rows = [benchmark.Row("numpy", "liger-tvd", "tv", 1, 2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0)]
    benchmark.write_csv(rows, str(tmp_path / "v.csv"), ["numpy"])
    versions = _csv_rows(tmp_path / "v.csv")[0]["versions"]
    assert "liger-kernel=" in versions and "speculators=" not in versions


def test_cpu_threads_script_runs_and_reports_both_parts(capsys):
    """bench/cpu_threads.py (the README's figures on two threads), at its smoke-test sizes: the
    one- and two-thread times, the two processes' times, and the call-length table."""
    script = _load_bench("cpu_threads")
    assert script.main(["--quick", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "1. LK^alpha N = 16, V = 4096" in out and "two threads" in out
    assert "one thread in each of 2 processes" in out and "no shared GIL" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("8000", "48000")]
    assert len(rows) == 2 and all(float(r[2]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        script.main(["--repeat", "0"])
    for bad in ("0", "x", "64,", ""):
        with pytest.raises(SystemExit):
            script.main(["--rows", bad])
