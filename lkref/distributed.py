"""Data-parallel training: the all-reduce hook of the masked means, and an adapter for mpi4py.

Real drafts train on many ranks, each with a shard of the batch, and the paper's lambda uses
alpha averaged over the whole batch.  Every reduced loss (and multi_position,
accept_length_loss) takes ``reduce``: a function (total, count) -> (total, count) that sums
both over the ranks (a sum, not a mean over the ranks: that leaves the loss right and makes
the gradients as many times too large as there are ranks; a count below the rank's own is
refused for that reason, as is a NaN or inf from finite sums).  Each call of a loss calls
it once for the mean (LK^lambda with no given lambda calls it once before, for mean
alpha), in the same order on every path, so the ranks' collectives line up.  With it, each
rank gets the loss and lambda of the whole batch and the gradient of its own rows, exactly
as one process on the concatenated batch (SpecForge's reduce_fn does the same for its
acceptance metric).

With PyTorch, for instance:

    def reduce(total, count):
        t = torch.tensor([float(total), float(count)], dtype=torch.float64, device="cuda")
        torch.distributed.all_reduce(t)
        return t[0].item(), t[1].item()
"""

from __future__ import annotations

import numpy as np

from .backend import namespace

__all__ = ["mpi_reduce"]


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
