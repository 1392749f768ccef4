"""Data-parallel training: the all-reduce hook of the masked means, and an adapter for mpi4py.

Real drafts train on many ranks, each with a shard of the batch, and the paper's lambda uses
alpha averaged over the whole batch.  Every reduced loss (and multi_position,
accept_length_loss) takes ``reduce``: a function (total, count) -> (total, count) that sums
both over the ranks.  Each call of a loss calls it once for the mean (LK^lambda with no
given lambda calls it once before, for mean alpha), in the same order on every path, so
the ranks' collectives line up.  With it, each rank gets the loss and lambda of the whole
batch and the gradient of its own rows, exactly as one process on the concatenated batch
(SpecForge's reduce_fn does the same for its acceptance metric).

With PyTorch, for instance:

    def reduce(total, count):
        t = torch.tensor([float(total), float(count)], dtype=torch.float64, device="cuda")
        torch.distributed.all_reduce(t)
        return t[0].item(), t[1].item()
"""

from __future__ import annotations

import numpy as np

from .backend import _is_foreign, from_dlpack, namespace

__all__ = ["mpi_reduce", "call_reduce"]


def call_reduce(reduce, total, count):
    """reduce(total, count), checked: two real scalars (0-d arrays of NumPy, CuPy or any DLPack
    library, or Python numbers), returned as 0-d arrays of total's backend and dtype.  Every path's masked mean calls the
    hook through this."""
    if not callable(reduce):
        raise TypeError(f"reduce must be a function (total, count) -> (total, count), got {type(reduce).__name__}")
    got = reduce(total, count)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        what = f"a {type(got).__name__} of {len(got)}" if isinstance(got, (tuple, list)) else type(got).__name__
        raise TypeError(f"reduce must return a pair (total, count), got {what}")
    xp = namespace(total)
    sums = []
    for name, value in zip(("total", "count"), got):
        if _is_foreign(value):                        # a 0-d tensor of the caller's library
            value = from_dlpack(value, f"reduce's {name}")
        try:
            kind = np.dtype(getattr(value, "dtype", type(value))).kind
        except TypeError:                             # a type NumPy does not know
            kind = "O"
        if isinstance(value, bool) or kind not in "iuf":
            raise TypeError(f"reduce returned a {name} that is not a real number: {value!r}")
        value = xp.asarray(value, dtype=total.dtype)
        if value.shape != ():
            raise ValueError(f"reduce returned a {name} of shape {value.shape}; it must be a scalar")
        sums.append(value)
    return tuple(sums)


def mpi_reduce(comm=None):
    """A reduce hook that all-reduces (total, count) over an mpi4py communicator (default COMM_WORLD).

    Needs the optional extra: python -m pip install ".[mpi]" (mpi4py with MPICH from PyPI).
    The sums are taken in float64 on the host and handed back in the dtype and backend of
    the local values.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError('mpi_reduce needs mpi4py: python -m pip install ".[mpi]"') from exc
    comm = MPI.COMM_WORLD if comm is None else comm

    def reduce(total, count):
        xp = namespace(total, count)
        buf = np.array([float(total), float(count)], dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        dtype = getattr(total, "dtype", np.float64)
        return xp.asarray(buf[0], dtype=dtype), xp.asarray(buf[1], dtype=dtype)
    return reduce
