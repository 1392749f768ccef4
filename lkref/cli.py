"""The command line: python -m lkref {info, demo, bench, conformance, check-sampler, toy gaussian, train} ..."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import numpy as np


def cmd_info(args) -> int:
    import lkref

    print(f"lkref {lkref.__version__} on Python {platform.python_version()}, {platform.machine()}")
    print("backends:")
    for b in lkref.backends():
        state = "usable" if b["usable"] else "not usable"
        version = f" {b['version']}" if b["version"] else ""
        print(f"  {b['name']}{version}: {state} ({b['device']})")
        if b["name"] == "cupy" and b["usable"]:
            from . import fused_cupy
            print(f"    {fused_cupy.describe(sys.modules['cupy'])}")
    print()
    print("worked example (one position, V = 2, T = 1):")
    z = np.log(np.array([0.6, 0.4]))            # draft q = [0.6, 0.4]
    p = np.array([0.7, 0.3])                    # target p
    print(f"  q = softmax(z) = {np.round(np.exp(z), 6).tolist()}, p = {p.tolist()}")
    print("  alpha = sum_v min(p_v, q_v) = 0.6 + 0.3 = 0.9")
    for name, fn in lkref.LOSSES.items():
        r = fn(z, p)
        extra = f"  lambda = {float(r.lam):.6f}" if r.lam is not None else ""
        print(f"  {name:9s} loss = {float(r.loss):.6f}  alpha = {float(r.alpha):.6f}  "
              f"grad = {np.round(r.grad, 6).tolist()}{extra}")
    print("  (KL = 0.7 log(0.7/0.6) + 0.3 log(0.3/0.4) = 0.021601; TV = 0.1; LK^alpha = -log 0.9 = 0.105361)")
    return 0


def _write_json(obj, path):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
        print(f"written to {path}")


def _number(kind, low, inclusive=True):
    """An argparse type: an int or a finite float, >= low (or > low with inclusive=False)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text!r}")
        return value
    return parse


def _out_path(text):
    """An argparse type for a file lkref writes at the end of a run: its folder must exist now,
    not after minutes of work ('' passes: no file)."""
    folder = os.path.dirname(os.path.abspath(text)) if text else None
    if folder is not None and not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist")
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


def _fail(command, message) -> int:
    """A usage error found after parsing: said like argparse's own, exit status 2."""
    print(f"python -m lkref {command}: error: {message}", file=sys.stderr)
    return 2


def _pair(text):
    try:
        mu, sigma = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MU,SIGMA, got {text!r}") from None
    if not (math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
        raise argparse.ArgumentTypeError(f"expected finite MU and SIGMA > 0, got {text!r}")
    return mu, sigma


def _mixture(text):
    from .toy.gaussian import parse_mixture

    try:
        return parse_mixture(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_toy(args) -> int:
    from .toy.gaussian import PAPER_MIXTURE, fit_gaussian

    mixture = args.mixture or PAPER_MIXTURE
    fit = fit_gaussian(args.loss, mixture=mixture, init=args.init, steps=args.steps, eta=args.eta)
    print(f"{args.loss}: mu = {fit.mu:.4f}  sigma = {fit.sigma:.4f}  alpha = {100 * fit.alpha:.2f} %  "
          f"loss = {fit.loss:.6f}")
    _write_json(fit.as_dict(), args.json)
    return 0


def cmd_train(args) -> int:
    from .toy.train import TrainConfig, train

    cfg = TrainConfig(loss=args.loss, draft=args.draft, vocab=args.vocab, heads=args.heads, hidden=args.hidden,
                      steps=args.steps, seed=args.seed, temperature=args.temperature, eta=args.eta,
                      train_sequences=args.train_sequences, batch=args.batch, adam_eps=args.adam_eps)
    print(f"training a {cfg.draft} draft with {cfg.loss}: V = {cfg.vocab}, K = {cfg.heads}, hidden = {cfg.hidden}, "
          f"{cfg.steps} steps, seed {cfg.seed}")
    r = train(cfg, progress=print)
    print("alpha per position   " + " ".join(f"{a:.4f}" for a in r["alpha_per_position"]))
    print("  on training data   " + " ".join(f"{a:.4f}" for a in r["alpha_per_position_train"]))
    print(f"tau (theory)         {r['accept_length_theory']:.4f}")
    print(f"tau (measured)       {r['accept_length_measured']:.4f}  ({r['target_calls']} target calls)")
    print(f"loss                 {r['loss_first']:.4f} -> {r['loss_last']:.4f}   ({r['seconds']:.1f} s)")
    print(f"gradient RMS         {r['grad_rms_first']:.3g} at the first step (AdamW's epsilon: {cfg.adam_eps:g})")
    _write_json(r, args.json)
    return 0


def cmd_demo(args) -> int:
    from .toy.demo import run_demo

    run_demo(quick=args.quick, seeds=args.seeds, json_path=args.json, plot_path=args.plot or None)
    return 0


def _sizes(text):
    try:
        sizes = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        sizes = None
    if not sizes or any(len(nv) != 2 or min(nv) < 1 for nv in sizes):
        raise argparse.ArgumentTypeError(f"expected N:V,N:V,... with N, V >= 1, got {text!r}")
    return sizes


def cmd_bench(args) -> int:
    from . import benchmark

    backends = ("numpy", "cupy") if args.backend == "all" else (args.backend,)
    if args.sampler:
        for backend in backends:
            benchmark.verify_scaling(repeat=args.repeat, backend=backend)
        return 0
    try:
        benchmark.np_dtype(args.dtype)
    except ImportError:
        return _fail("bench", f"--dtype {args.dtype} needs ml_dtypes (python -m pip install ml_dtypes)")
    sizes = args.sizes or (benchmark.QUICK_SIZES if args.quick else benchmark.DEFAULT_SIZES)
    rows = benchmark.run(backends=backends, losses=args.loss or tuple(benchmark.LOSSES), sizes=sizes,
                         repeat=args.repeat, with_peers=not args.no_peers, skip_peers=tuple(args.skip_peer or ()),
                         only_peers=tuple(args.peer) if args.peer else None, csv_path=args.csv,
                         dtype=args.dtype)
    if args.csv and rows:
        print(f"rows appended to {args.csv} block by block")
    return 0


#: What loading a user's module:function or results file raises for a bad argument.
_LOAD_ERRORS = (ImportError, AttributeError, OSError, ValueError)


def _said(exc) -> str:
    """A load error as one line: our own ValueErrors as they are, the others with their type."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def cmd_conformance(args) -> int:
    from . import conformance as C

    if args.action == "export":
        given = [flag for flag, v in (("--impl", args.impl), ("--results", args.results), ("--loss", args.loss))
                 if v is not None]
        if given:                                   # export writes every case; these would be ignored
            return _fail("conformance", f"{', '.join(given)}: for check, not export")
        if os.path.exists(args.dir) and not os.path.isdir(args.dir):
            return _fail("conformance", f"{args.dir} exists and is not a folder")
        m = C.export(args.dir)
        print(f"{len(m['cases'])} cases written to {args.dir} (manifest.json, {m['arrays']})")
        return 0
    if (args.impl is None) == (args.results is None):
        return _fail("conformance", "check needs exactly one of --impl module:function or --results FILE.npz")
    if not os.path.isfile(os.path.join(args.dir, "manifest.json")):
        return _fail("conformance", f"{args.dir} holds no manifest.json (write the vectors with: "
                                    f"python -m lkref conformance export {args.dir})")
    try:
        fn = C.load_impl(args.impl) if args.impl else None
        results = np.load(args.results) if args.results else None
    except _LOAD_ERRORS as exc:
        return _fail("conformance", f"{'--impl' if args.impl else '--results'}: {_said(exc)}")
    rows = C.check(args.dir, fn=fn, results=results, losses=args.loss)
    print(C.format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


def cmd_check_sampler(args) -> int:
    from .conformance import load_impl
    from .testing import check_sampler

    try:
        fn = load_impl(args.impl)
    except _LOAD_ERRORS as exc:
        return _fail("check-sampler", f"impl: {_said(exc)}")
    try:
        report = check_sampler(fn, seed=args.seed, trials=args.trials, K=args.heads, V=args.vocab)
    except Exception as exc:                        # the sampler's own error, or what it returned
        print(f"{args.impl} failed before any property was checked: {type(exc).__name__}: {exc}")
        return 1
    print(report)
    failed = report.failed()
    print(f"{len(report.checks) - len(failed)} passed, {len(failed)} failed")
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import DTYPES
    from .positions import LOSSES
    from .toy.gaussian import TOY_LOSSES
    from .toy.train import TRAIN_LOSSES

    ap = argparse.ArgumentParser(prog="python -m lkref", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, devices, and a small worked example")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="train toy drafts with every loss and compare (the main job)")
    p.add_argument("--quick", action="store_true", help="a smaller run, under 30 s")
    p.add_argument("--seeds", type=_number(int, 1), default=None, help="seeds per setting (default 2, 1 with --quick)")
    p.add_argument("--json", type=_out_path, default=None, help="write all results to this JSON file")
    p.add_argument("--plot", type=_out_path, default="lkref_demo.png",
                   help="PNG path (needs matplotlib; '' for none)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="check the fast paths against the reference, then time them and the peers")
    p.add_argument("--backend", choices=("numpy", "cupy", "all"), default="all",
                   help="where to run (default all: NumPy, and CuPy where a GPU is found)")
    p.add_argument("--loss", action="append", choices=sorted(LOSSES), help="repeatable; default: all four")
    p.add_argument("--sizes", type=_sizes, default=None, help="N:V,N:V,... (default: the goals' sizes)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a first look")
    p.add_argument("--repeat", type=_number(int, 1), default=10,
                   help="timed calls per implementation, after 2 untimed ones (default 10)")
    p.add_argument("--no-peers", action="store_true", help="skip bench/peers.py")
    p.add_argument("--skip-peer", action="append", help="a peer to leave out (repeatable), e.g. torch-compile")
    p.add_argument("--peer", action="append", help="time only these peers (repeatable), e.g. torch-compile")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="of the logits, the target and the gradient (default float32; the peers run in float32 "
                        "only; bfloat16 needs ml_dtypes)")
    p.add_argument("--sampler", action="store_true", help="time verify() against K instead of the losses")
    p.add_argument("--csv", type=_out_path, default=None, help="append CSV rows here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("conformance", help="golden vectors for ports, and a checker that names what differs")
    p.add_argument("action", choices=("export", "check"))
    p.add_argument("dir", help="the folder of the vectors")
    p.add_argument("--impl", default=None, help="module:function (or path/to/file.py:function) to check")
    p.add_argument("--results", default=None, help="an NPZ of <case>/loss, /grad, /alpha to check")
    p.add_argument("--loss", action="append", choices=sorted(LOSSES),
                   help="check only this loss's cases (repeatable; default: all four)")
    p.set_defaults(func=cmd_conformance)

    p = sub.add_parser("check-sampler", help="the calibrated statistical tests on a verify() of yours")
    p.add_argument("impl", help="module:function (or path/to/file.py:function) with lkref.verify's signature")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="of the problem and the draws (default 0)")
    p.add_argument("--trials", type=_number(int, 1), default=100_000, help="rounds, one a batch row (default 100000)")
    p.add_argument("--heads", type=_number(int, 1), default=4, help="K, the drafted tokens a round (default 4)")
    p.add_argument("--vocab", type=_number(int, 2), default=6, help="V (default 6)")
    p.set_defaults(func=cmd_check_sampler)

    p = sub.add_parser("toy", help="the paper's motivating toy")
    toy = p.add_subparsers(dest="toy", required=True)
    g = toy.add_parser("gaussian", help="fit one Gaussian to a mixture (paper Fig. 2)")
    g.add_argument("--loss", choices=TOY_LOSSES, required=True)
    g.add_argument("--mixture", type=_mixture, default=None, help="W:MU:SIGMA,... (default: the paper's mixture)")
    g.add_argument("--init", type=_pair, default=(0.0, 4.0), help="MU,SIGMA to start from (default 0,4)")
    g.add_argument("--steps", type=_number(int, 0), default=3000, help="gradient steps (default 3000)")
    g.add_argument("--eta", type=_number(float, 0), default=3.0, help="eta of LK^lambda")
    g.add_argument("--json", type=_out_path, default=None,
                   help="write the fit (mu, sigma, alpha, loss) to this JSON file")
    g.set_defaults(func=cmd_toy)

    p = sub.add_parser("train", help="train a toy draft against the toy target LM")
    p.add_argument("--loss", choices=TRAIN_LOSSES, required=True,
                   help="a per-position loss, or accept_length: the multi-step objective K + 1 - E[tau]")
    p.add_argument("--draft", choices=("heads", "ar"), default="heads",
                   help="heads: K heads on one trunk (Medusa-style); ar: one next-token head, run "
                        "autoregressively (default heads)")
    p.add_argument("--vocab", type=_number(int, 2), default=256, help="vocabulary size V (default 256)")
    p.add_argument("--heads", type=_number(int, 1), default=4, help="K, the draft positions")
    p.add_argument("--hidden", type=_number(int, 1), default=32, help="the draft's capacity")
    p.add_argument("--steps", type=_number(int, 1), default=400, help="training steps (default 400)")
    p.add_argument("--train-sequences", type=_number(int, 1), default=512,
                   help="target-generated training sequences (a fixed set, drawn once)")
    p.add_argument("--batch", type=_number(int, 1), default=256, help="contexts per step (default 256)")
    p.add_argument("--adam-eps", type=_number(float, 0, inclusive=False), default=1e-8,
                   help="AdamW's epsilon (default 1e-8); above the gradient's RMS, Adam no longer rescales it")
    p.add_argument("--seed", type=_number(int, 0), default=0,
                   help="seed of the training data and the draft (the target LM is one fixed model; default 0)")
    p.add_argument("--temperature", type=_number(float, 0, inclusive=False), default=1.0,
                   help="temperature T of the target and the draft distributions (default 1)")
    p.add_argument("--eta", type=_number(float, 0), default=None,
                   help="eta of LK^lambda (default: the paper's, 10 for heads, 3 for ar)")
    p.add_argument("--json", type=_out_path, default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_train)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
