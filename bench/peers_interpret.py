"""The GPU peers' adapters (bench/peers.py) checked on the CPU, before a GPU run spends on them.

Runs the peers `python -m lkref bench --backend cupy` would time (speculators' fused Triton
losses, Liger-Kernel's TV, PyTorch eager) on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set here before Triton loads), and compares each loss and gradient with
lkref's readable path on the same problem, as the benchmark does before it times.
torch.compile is left out (Inductor, not Triton's interpreter, would run it).

    python bench/peers_interpret.py [--rows N] [--vocab V]

Needs torch and triton, and the peers' packages (bench/peer_wheels.sh; `pip install --no-deps
.whl/*.whl` in a scratch environment).  Exit status 1 when a peer that computes lkref's loss
differs by more than the benchmark's tolerance or fails to run; speculators' lk_hybrid has a
per-token lambda, not lkref's batch mean, so its difference is printed and not judged, and
SpecForge's KL term is the soft cross-entropy, so only its gradient is judged (BY_DESIGN).

Two things a GPU launch does and the interpreter does not are done here: a Python float
argument becomes an fp32 scalar (the interpreter passes it bare, and Liger's kernel calls
`.to` on it), and the autotuner, which has no device to time tiles on, takes its first tile.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"        # read when a kernel is decorated: before any import

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lkref                                  # noqa: E402
from lkref.benchmark import LOSSES, TOLERANCE, load_peers, make_problem, peer_errors   # noqa: E402

#: Peers whose loss is another by design (bench/peers.py): what is judged of them, and why.
BY_DESIGN = {"speculators λ/tok": (None, "per-token lambda"),
             "specforge CE": ("gradient", "soft cross-entropy: its loss is KL + H(p), its gradient KL's")}


def interpreter_as_a_launch():
    """Make the interpreter pass floats and pick tiles as a GPU launch would (docstring)."""
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    bare = interpreter._implicit_cvt

    def cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return bare(arg)
    interpreter._implicit_cvt = cvt
    autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [1.0, 1.0, 1.0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.rows < 1 or args.vocab < 2:
        ap.error("--rows must be >= 1 and --vocab >= 2")
    try:
        import torch
        import triton
    except ImportError as exc:
        print(f"needs torch and triton: {exc}", file=sys.stderr)
        return 2
    interpreter_as_a_launch()
    peers = load_peers()
    z, p = make_problem(np, args.rows, args.vocab)
    print(f"torch {torch.__version__}, triton {triton.__version__}, interpreter; N = {args.rows}, V = {args.vocab}")
    bad, seen, unjudged = [], 0, 0
    for loss in LOSSES:
        ref = getattr(lkref, loss)(z, p, impl="reference")
        for label, (fn, _kind) in peers.peers("cupy", loss).items():
            if label == "torch-compile":
                continue
            seen += 1
            try:
                _, grad_err, loss_err = peer_errors(fn, (torch.from_numpy(z), torch.from_numpy(p)), ref)
            except Exception as exc:
                print(f"{loss:9s} {label:18s} failed: {type(exc).__name__}: {exc}")
                bad.append((loss, label))
                continue
            what, why = BY_DESIGN.get(label, ("both", ""))
            err = {"both": max(grad_err, loss_err), "gradient": grad_err, None: None}[what]
            unjudged += err is None
            if err is None:
                verdict = f"not judged ({why})"
            else:
                verdict = "ok" if err <= TOLERANCE else "DIFFERS"
                verdict += f" (the gradient; {why})" if what == "gradient" else ""
            print(f"{loss:9s} {label:18s} rel err: gradient {grad_err:.2e}, loss {loss_err:.2e}  {verdict}")
            if err is not None and err > TOLERANCE:
                bad.append((loss, label))
    if not seen:
        print("no GPU peer is installed here (bench/peer_wheels.sh)", file=sys.stderr)
        return 2
    judged = seen - unjudged
    print(f"{judged - len(bad)} of {judged} judged peer runs agree with lkref's readable path"
          + (f"; failed or differ: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
