"""Data-parallel equivalence, shared by the in-process (threads) and the MPI (mpiexec) tests.

Every rank builds the same global batch from a fixed seed, takes its own rows (uneven
shards), computes each loss with the reduce hook, and compares with one process on the
whole batch: the loss and lambda must be equal, and its gradient must equal the whole
batch's gradient on its rows.
"""

from __future__ import annotations

import numpy as np

import lkref
from lkref.multistep import accept_length_loss

N, V, VT = 11, 7, 9


def problem():
    rng = np.random.default_rng(42)
    z = rng.standard_normal((N, V)) * 2
    p = rng.dirichlet(np.full(VT, 0.5), size=N)
    p_small = p[:, :V] / p[:, :V].sum(-1, keepdims=True)
    mask = rng.random(N) < 0.8
    d2t = rng.permutation(VT)[:V]
    return z, p, p_small, mask, d2t


def shard(rank, size):
    bounds = np.linspace(0, N, size + 1).round().astype(int)
    bounds[1] = 7 if size == 2 else bounds[1]           # uneven on purpose: 7 and 4 rows
    return slice(bounds[rank], bounds[rank + 1])


def check_shards(rank, size, reduce):
    z, p, p_small, mask, d2t = problem()
    s = shard(rank, size)
    failures = []
    cases = []
    for name in sorted(lkref.LOSSES):
        for impl in ("reference", "auto"):
            cases.append((name, impl, dict(target=p_small, mask=mask)))
            cases.append((name, impl, dict(target=p, mask=mask, draft_to_target=d2t)))
    for name, impl, opt in cases:
        target = opt.pop("target")
        full = lkref.LOSSES[name](z, target, impl=impl, **opt)
        part = lkref.LOSSES[name](z[s], target[s], impl=impl, reduce=reduce,
                                  **{k: (v[s] if k == "mask" else v) for k, v in opt.items()})
        label = f"{name}/{impl}/{'d2t' if 'draft_to_target' in opt else 'plain'}"
        if not np.allclose(part.loss, full.loss, rtol=1e-12, atol=1e-14):
            failures.append(f"{label}: loss {float(part.loss)} != {float(full.loss)}")
        if full.lam is not None and not np.allclose(part.lam, full.lam, rtol=1e-12):
            failures.append(f"{label}: lambda {float(part.lam)} != {float(full.lam)}")
        if not np.allclose(part.grad, full.grad[s], rtol=1e-10, atol=1e-15):
            failures.append(f"{label}: gradient differs by {np.max(np.abs(part.grad - full.grad[s])):.3g}")
    zs, ps = [z, z[::-1].copy()], [p_small, p_small[::-1].copy()]
    full = accept_length_loss(zs, ps, mask=mask)
    part = accept_length_loss([x[s] for x in zs], [x[s] for x in ps], mask=mask[s], reduce=reduce)
    if not np.allclose(part.loss, full.loss, rtol=1e-12):
        failures.append(f"accept_length: loss {float(part.loss)} != {float(full.loss)}")
    for k in range(2):
        if not np.allclose(part.grads[k], full.grads[k][s], rtol=1e-10, atol=1e-15):
            failures.append(f"accept_length: gradient {k} differs")
    return failures


if __name__ == "__main__":                             # mpiexec -n 2 python -m tests.dp_check
    from lkref.distributed import mpi_reduce
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bad = check_shards(comm.rank, comm.size, mpi_reduce(comm))
    print(f"rank {comm.rank}/{comm.size}: {'OK' if not bad else 'FAIL'} " + "; ".join(bad), flush=True)
    raise SystemExit(1 if bad else 0)
