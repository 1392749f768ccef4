"""The command line: python -m lkref {info} ..."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lkref", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, devices, and a small worked example")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
