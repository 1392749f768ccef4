"""The conformance kit (lkref.conformance) run on the peers of bench/peers.py: which cases each
passes, and which known mistake each failure matches.

    python bench/peers_conformance.py [--kit DIR] [--cases]

The peers run as the benchmark runs them: PyTorch eager with the SpecForge formulas, vLLM
speculators' fused Triton losses, SpecForge's LK losses, Liger-Kernel's fused TV and its plain
TV op, and the benchmark's direct NumPy translation.  The Triton ones run on the CPU under
Triton's interpreter, set up as bench/peers_interpret.py does.  Each peer takes (draft
logits, target probabilities) and nothing else (SpecForge a mask too), so it is tried on the
cases without a mask (but SpecForge), a temperature, a smaller draft vocabulary or a
non-default eta / kl_scale; the others are counted as "not applicable".

The peers work in float32: float64 cases reach them in float32 and are judged at float32's
tolerance.  In bfloat16 and float16 cases the draft logits reach the peer as torch tensors of
that dtype (the NumPy translation: float32 arrays of the same values), the target as float32
holding the same values (the Triton peers take target logits, made from it as log p, with
-1e4 where p = 0: bench/peers.py); a target in the 2-byte type would reach them as logits
rounded to it, which is not the case's target.  The peers return a loss and a gradient, not
alpha: the alpha column is the float64 alpha of the inputs, so it says nothing; the checker
names a mistake by the loss and the gradient alone.

Needs torch, and for the Triton peers triton and their wheels (bench/peer_wheels.sh, then
`pip install --no-deps .whl/*.whl` in a scratch environment).  Prints a table per peer and
a summary; exit status 0 whatever the peers do (it reports, it does not judge), 2 when torch
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import peers_interpret                        # noqa: E402  (sets TRITON_INTERPRET before Triton loads)

import numpy as np                            # noqa: E402

from lkref import conformance as C            # noqa: E402
from lkref import losses as L                 # noqa: E402
from lkref.benchmark import git_sha, load_peers, machine_name   # noqa: E402
from lkref.validation import takes_parameter   # noqa: E402

#: Options a peer does not take: the cases that set them are not applicable to it.
DEFAULTS = {"mask": None, "temperature": 1.0, "draft_to_target": None, "eta": 3.0, "kl_scale": 1.0}


class NotApplicable(Exception):
    """The case sets an option the peer has no argument for."""


def as_port(fn, kind):
    """A port (case) -> (loss, grad, alpha) around a peer fn(z, p), or NotApplicable."""
    takes_mask = hasattr(fn, "prepare") and takes_parameter(fn.prepare, "mask")

    def port(case):
        options = dict(case["options"], mask=case["inputs"]["mask"],
                       draft_to_target=case["inputs"]["draft_to_target"])
        set_ = [k for k, v in options.items()
                if not _default(v, DEFAULTS[k]) and not (k == "mask" and takes_mask)]
        if set_:
            raise NotApplicable(f"the peer takes no {', '.join(set_)}")
        z, p = np.asarray(case["inputs"]["draft_logits"]), np.asarray(case["inputs"]["target_probs"])
        zf, pf = (np.ascontiguousarray(x, np.float32) for x in (z, p))
        if kind == "numpy":
            args = (zf, pf)
        else:
            import torch
            dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(case["dtype"], torch.float32)
            args = (torch.from_numpy(zf).to(dt), torch.from_numpy(pf))
        if hasattr(fn, "prepare"):
            args = fn.prepare(*args, **({"mask": options["mask"]} if takes_mask else {}))
        got_loss, got_grad = fn(*args)
        if hasattr(got_grad, "detach"):
            got_grad = got_grad.detach().float().cpu().numpy()
        got_loss = float(got_loss)
        q = L.softmax(z.astype(np.float64))
        return got_loss, np.asarray(got_grad, np.float64), np.minimum(q, p.astype(np.float64)).sum(-1)
    return port


def _default(value, default):
    return value is None if default is None else value == default


def peer_ports():
    """{label: port} for every peer installed here (torch-compile left out: Inductor, not the
    interpreter, would run it)."""
    mod = load_peers()
    if mod is None:
        return {}
    ports = {}
    for loss in C.LOSSES:
        for backend in ("numpy", "cupy"):
            for label, (fn, kind) in mod.peers(backend, loss).items():
                if label == "torch-compile" or (backend == "cupy" and label == "torch-eager"):
                    continue
                ports.setdefault(label.split()[0], {})[loss] = as_port(fn, kind)
    return ports


def float32_tolerance_for_float64(kit):
    """A copy of the kit's manifest (beside its arrays, in a new folder) whose float64 cases
    are judged at float32's tolerance: the peers work in float32."""
    out = tempfile.mkdtemp(prefix="lkref-kit-f32-")
    with open(os.path.join(kit, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["tolerances"]["float64"] = manifest["tolerances"]["float32"]
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    for name in os.listdir(kit):
        if name != "manifest.json":
            os.symlink(os.path.join(os.path.abspath(kit), name), os.path.join(out, name))
    return out


def check_peer(kit, by_loss):
    """The kit's rows for one peer: (the rows of the cases it was tried on, how many were not
    applicable).  The peer runs here, where the case's dtype is known (a float32 case can hold
    only bfloat16 values), and the checker reads its results."""
    _, cases = C.load(kit)
    results, tried = {}, set()
    for case in cases:
        if case["loss"] not in by_loss:
            continue
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # inf and NaN are reported in the table
                got = by_loss[case["loss"]](case)
        except NotApplicable:
            continue
        except Exception as exc:                  # a peer that fails is reported, not fatal
            got = (np.nan, np.full(np.shape(case["expected"]["grad"]), np.nan), np.nan)
            print(f"{case['id']}: raised {type(exc).__name__}: {exc}")
        tried.add(case["id"])
        results.update({f"{case['id']}/{k}": np.asarray(v) for k, v in zip(("loss", "grad", "alpha"), got)})
    rows = [r for r in C.check(kit, results=results) if r.id in tried]
    return rows, len(cases) - len(rows)


def installed():
    """The peer packages' versions, from their metadata."""
    from importlib import metadata
    out = []
    for dist in ("speculators", "liger-kernel", "specforge"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} absent")
    return ", ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", help="a kit exported by `python -m lkref conformance export` (default: export one)")
    ap.add_argument("--cases", action="store_true", help="print every case, not only the failing ones")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"needs torch: {exc}", file=sys.stderr)
        return 2
    try:
        import triton
        peers_interpret.interpreter_as_a_launch()
        where = f"triton {triton.__version__}, interpreter"
    except ImportError:
        where = "no triton: its peers are absent"
    kit = args.kit or tempfile.mkdtemp(prefix="lkref-kit-")
    if not args.kit:
        C.export(kit)
    kit = float32_tolerance_for_float64(kit)
    print(f"lkref {git_sha()} on {machine_name('numpy')}; torch {torch.__version__}, {where}; {installed()}")
    print(f"kit: {kit if args.kit else 'exported now'}; float64 cases judged at float32's tolerance")
    summary = []
    for label, by_loss in peer_ports().items():
        tried, n_na = check_peer(kit, by_loss)
        failed = [r for r in tried if not r.passed]
        print(f"\n## {label} ({', '.join(by_loss)}): {len(tried) - len(failed)} passed, {len(failed)} failed, "
              f"{n_na} not applicable")
        shown = tried if args.cases else failed
        if shown:
            print(C.format_table(shown).rsplit("\n", 1)[0])
        named = sorted({r.message.split("known mistake '")[1].split("'")[0] for r in failed
                        if "known mistake '" in r.message})
        summary.append(f"{label:14s} {len(tried) - len(failed):3d} passed {len(failed):3d} failed "
                       f"{n_na:3d} n/a   named: {', '.join(named) or '-'}")
    print("\n## summary (alpha is not the peers': they return none)")
    print("\n".join(summary) or "no peer is installed here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
