"""The transport of :class:`distopt.byte_ring.ByteRing` on Open MPI, through mpi4py.

Why not Open MPI's own ``Reduce_scatter``: measured on this project's hosts it took
1.3-2x one MLX ``all_sum`` of the same buffer (``Reduce_scatter_block`` and the tuned
algorithms no better), while a ring of point-to-point messages moves the minimum and
receives straight into MLX memory. Each step posts one non-blocking receive from rank
r - 1 and one non-blocking send to rank r + 1 and waits for both, so every send meets
a posted receive: no deadlock for any N and size, and no reliance on eager buffering.
MLX's own ``send``/``recv`` (:mod:`distopt.ring`) cannot do that on MPI: its backend
runs them one evaluation at a time, so the two directions of a step take turns.

A step's byte views (a bucket's leaf slices, or the columns of a transposed gradient)
travel as one message described by an MPI derived datatype at their absolute
addresses (``MPI.BOTTOM``), so nothing is copied into a contiguous buffer first.
"""

import mpi4py

mpi4py.rc.initialize = False  # MLX initializes MPI (mx.distributed.init); mpi4py shares it
mpi4py.rc.finalize = False
from mpi4py import MPI  # noqa: E402

from .byte_ring import ByteRing

_TAG = 0x6474  # distopt's point-to-point messages
_MAX_BLOCK = 1 << 30  # MPI counts are C ints: blocks of at most 1 GiB


class MpiRing(ByteRing):
    """Ring steps over ``comm`` (mpi4py's world communicator, shared with MLX's MPI)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.sent = self.received = 0

    def _step(self, outgoing, incoming):
        """Send the byte views ``outgoing`` (in order) to rank r + 1 while receiving into
        the byte views ``incoming`` (in order) from rank r - 1."""
        requests, types = [], []
        for views, post, peer in ((incoming, self.comm.Irecv, self.rank - 1), (outgoing, self.comm.Isend, self.rank + 1)):
            message, datatype = _message(views)
            if message is not None:
                requests.append(post(message, peer % self.size, _TAG))
            if datatype is not None:
                types.append(datatype)
        try:
            MPI.Request.Waitall(requests)
        finally:
            for datatype in types:
                datatype.Free()
        self.sent += sum(len(view) for view in outgoing)
        self.received += sum(len(view) for view in incoming)


def _message(views):
    """``(buffer, datatype)``: the byte ``views`` as one MPI message (``None`` when empty);
    ``datatype`` is the derived type to free after the transfer, if one was made."""
    blocks = [view[i : i + _MAX_BLOCK] for view in views for i in range(0, len(view), _MAX_BLOCK)]
    if not blocks:
        return None, None
    if len(blocks) == 1:
        return [blocks[0], MPI.BYTE], None
    datatype = MPI.BYTE.Create_hindexed([len(b) for b in blocks], [MPI.Get_address(b) for b in blocks]).Commit()
    return [MPI.BOTTOM, 1, datatype], datatype
