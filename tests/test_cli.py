"""python -m lkref: bad arguments end in one line naming the argument (exit status 2), not a traceback."""

from __future__ import annotations

import re

import pytest

from lkref import conformance
from lkref.cli import main


@pytest.mark.parametrize("argv, said", [
    (["train", "--loss", "kl", "--steps", "-1"], "argument --steps: must be >= 1, got '-1'"),
    (["train", "--loss", "kl", "--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
    (["train", "--loss", "kl", "--vocab", "1"], "argument --vocab: must be >= 2"),
    (["train", "--loss", "kl", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["train", "--loss", "kl", "--temperature", "0"], "argument --temperature: must be > 0"),
    (["train", "--loss", "lk_lambda", "--eta", "nan"], "argument --eta: must be finite"),
    (["train", "--loss", "tv", "--adam-eps", "0"], "argument --adam-eps: must be > 0"),
    (["train", "--loss", "tv", "--batch", "0"], "argument --batch: must be >= 1"),
    (["toy", "gaussian", "--loss", "lk_lambda", "--eta", "-1"], "argument --eta: must be >= 0"),
    (["toy", "gaussian", "--loss", "kl", "--mixture", "1:0:nan"], "argument --mixture: mixture component '1:0:nan' "
                                                                  "needs finite numbers"),     # a traceback before
    (["toy", "gaussian", "--loss", "kl", "--mixture", "1:2"], "argument --mixture: mixture component '1:2' is not"),
    (["toy", "gaussian", "--loss", "kl", "--init", "0,nan"], "argument --init: expected finite MU and SIGMA > 0"),
    (["demo", "--seeds", "0"], "argument --seeds: must be >= 1"),
    (["bench", "--repeat", "0"], "argument --repeat: must be >= 1"),
    (["bench", "--sizes", "0:10"], "argument --sizes: expected N:V,N:V,... with N, V >= 1, got '0:10'"),
    (["bench", "--sizes", "4"], "argument --sizes: expected N:V"),
    (["bench", "--sizes", "4:5:6"], "argument --sizes: expected N:V"),
    (["demo", "--json", "/no/such/folder/out.json"], "argument --json: the folder /no/such/folder does not exist"),
    (["demo", "--plot", "/no/such/folder/p.png"], "argument --plot: the folder /no/such/folder does not exist"),
    (["bench", "--csv", "/no/such/folder/b.csv"], "argument --csv: the folder"),
    (["train", "--loss", "kl", "--json", "/no/such/folder/t.json"], "argument --json: the folder"),
    (["toy", "gaussian", "--loss", "kl", "--json", "/"], "argument --json: / is a folder"),
])
def test_bad_arguments_are_refused_by_the_parser(capsys, argv, said):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert said in capsys.readouterr().err


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("kit"))
    conformance.export(d)
    return d


@pytest.mark.parametrize("args, said", [
    (["--impl", "no_such_module_here:f"], "--impl: ModuleNotFoundError: No module named 'no_such_module_here'"),
    (["--impl", "lkref"], "--impl: must be module:function, got 'lkref'"),
    (["--impl", "lkref:no_such_function"], "--impl: AttributeError"),
    (["--results", "/no/such/file.npz"], "--results: FileNotFoundError"),
    ([], "check needs exactly one of --impl"),
])
def test_conformance_check_says_what_is_wrong_with_its_arguments(capsys, kit, args, said):
    assert main(["conformance", "check", kit] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m lkref conformance: error: ") and said in err


def test_conformance_check_of_a_folder_without_vectors(capsys, tmp_path):
    assert main(["conformance", "check", str(tmp_path), "--impl", "lkref:kl"]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err


def test_good_arguments_pass_through_the_parser_types(capsys):
    """--steps 0 is allowed for the toy (the initial Gaussian) and reaches the command as an int."""
    assert main(["toy", "gaussian", "--loss", "kl", "--steps", "0", "--eta", "0", "--init", "1,2"]) == 0
    assert "kl: mu = 1.0000  sigma = 2.0000" in capsys.readouterr().out


def test_train_options_reach_the_config(monkeypatch, capsys):
    """--train-sequences (and the others) arrive in TrainConfig as given."""
    from lkref.toy import train as T
    seen = {}

    def fake_train(cfg, progress=None):
        seen["cfg"] = cfg
        return {"alpha_per_position": [0.5], "alpha_per_position_train": [0.6], "accept_length_theory": 1.5, "accept_length_measured": 1.5,
                "target_calls": 1, "loss_first": 1.0, "loss_last": 0.5, "seconds": 0.0, "grad_rms_first": 1e-3}
    monkeypatch.setattr(T, "train", fake_train)
    assert main(["train", "--loss", "tv", "--hidden", "16", "--steps", "7", "--train-sequences", "2048",
                 "--seed", "3", "--batch", "128", "--adam-eps", "1e-5"]) == 0
    cfg = seen["cfg"]
    assert (cfg.loss, cfg.hidden, cfg.steps, cfg.train_sequences, cfg.seed, cfg.batch, cfg.adam_eps) == \
        ("tv", 16, 7, 2048, 3, 128, 1e-5)


@pytest.mark.parametrize("args", [["--loss", "tv"], ["--impl", "lkref:kl"], ["--results", "r.npz", "--loss", "kl"]])
def test_conformance_export_refuses_the_options_of_check(capsys, tmp_path, args):
    """export writes every case: a --loss (or a port) given to it would be ignored, so it is refused."""
    assert main(["conformance", "export", str(tmp_path / "kit")] + args) == 2
    assert "for check, not export" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()


def test_conformance_check_of_some_losses(capsys, kit, tmp_path):
    """A port of LK^alpha alone, checked with --loss lk_alpha: its cases only, all passing; without
    --loss the other losses' cases fail, and say how to leave them out."""
    (tmp_path / "alpha_only.py").write_text(
        "import lkref\n"
        "def run(loss, z, p, **kw):\n"
        "    if loss != 'lk_alpha':\n"
        "        raise NotImplementedError(loss)\n"
        "    return lkref.lk_alpha(z, p, **kw)\n")
    port = f"{tmp_path / 'alpha_only.py'}:run"
    assert main(["conformance", "check", kit, "--impl", port, "--loss", "lk_alpha"]) == 0
    out = capsys.readouterr().out
    n = sum(c["loss"] == "lk_alpha" for c in conformance.load(kit)[1])
    assert f"{n} passed, 0 failed" in out and "/tv " not in out and "/lk_alpha " in out
    assert main(["conformance", "check", kit, "--impl", port]) == 1
    out = capsys.readouterr().out
    assert "raised NotImplementedError: tv (to check only the losses a port has: --loss NAME" in out


def test_check_sampler_passes_verify_and_fails_a_planted_bug(capsys, tmp_path):
    """The statistical suite from the command line: lkref.verify passes (exit 0); a sampler whose
    residual is p (tests/planted.py) fails the marginals (exit 1); one that raises is reported."""
    assert main(["check-sampler", "lkref:verify"]) == 0
    out = capsys.readouterr().out
    assert "marginal[4]" in out and "12 passed, 0 failed" in out
    (tmp_path / "bad.py").write_text(
        "from tests.planted import planted_verify\nverify = planted_verify('residual_is_p')\n"
        "def raises(*a, **k):\n    raise RuntimeError('boom')\n")
    assert main(["check-sampler", f"{tmp_path / 'bad.py'}:verify", "--trials", "20000"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"marginal\[0\]\s+FAIL", out) and "8 passed, 4 failed" in out
    assert main(["check-sampler", f"{tmp_path / 'bad.py'}:raises"]) == 1
    assert "failed before any property was checked: RuntimeError: boom" in capsys.readouterr().out


@pytest.mark.parametrize("args, said", [
    (["lkref:no_such_function"], "impl: AttributeError"),
    (["lkref"], "impl: must be module:function, got 'lkref'"),
])
def test_check_sampler_says_what_is_wrong_with_its_impl(capsys, args, said):
    assert main(["check-sampler"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m lkref check-sampler: error: ") and said in err


def test_conformance_export_into_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert main(["conformance", "export", str(tmp_path / "f")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_bench_dtype_bfloat16_without_ml_dtypes(capsys, monkeypatch):
    """--dtype bfloat16 where ml_dtypes is missing: one line saying what to install, exit status 2."""
    import sys
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)          # import ml_dtypes now raises ImportError
    assert main(["bench", "--backend", "numpy", "--dtype", "bfloat16", "--sizes", "2:10", "--repeat", "1"]) == 2
    assert "python -m lkref bench: error: --dtype bfloat16 needs ml_dtypes" in capsys.readouterr().err


def test_bench_skips_a_backend_without_the_dtype(monkeypatch):
    """A backend that cannot make arrays of the asked dtype (a CuPy without bfloat16) is skipped
    with a line saying so, not a traceback."""
    from lkref import benchmark

    def no_arrays(xp, N, V, seed=0, dtype="float32"):
        raise TypeError(f"no {dtype} here")
    monkeypatch.setattr(benchmark, "make_problem", no_arrays)
    lines = []
    assert benchmark.run(backends=("numpy",), sizes=[(2, 10)], repeat=1, with_peers=False, say=lines.append,
                         dtype="float16") == []
    assert any("numpy: no float16 arrays here (TypeError: no float16 here), skipped" in line for line in lines)
