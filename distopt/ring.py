"""Reduce-scatter and all-gather along a ring, from MLX's point-to-point send/recv.

Rank r only talks to its ring neighbours: it sends to ``r + 1`` and receives from
``r - 1`` (mod N), which is all MLX's TCP ring backend allows. A flat buffer of
``P`` elements is cut into N parts of ``counts[k]`` elements (equal or not). In
step ``s = 0 .. N-2`` of the reduce-scatter, rank r sends its running sum of part
``r - s - 1`` and receives the running sum of part ``r - s - 2``, to which it adds
its own values:

.. math::

    a^{(r)}_{s} = \\text{recv}_{r-1}\\big(a^{(r-1)}_{s-1}\\big) + x^{(r)}_{[r-s-2]},
    \\qquad a^{(r)}_{N-2} = \\sum_{q} x^{(q)}_{[r]}

so rank r ends with the sum of its own part, having sent ``P - counts[r]`` and
received ``P - counts[r-1]`` elements: (N-1)/N of the buffer for equal parts, the
minimum for any reduce-scatter. The all-gather passes the finished parts around
the same ring (N-1 steps, ``P - counts[r+1]`` sent, ``P - counts[r]`` received).

Why it cannot deadlock, for any N and any message size: every step is one
``mx.eval`` of one send and one receive.

- With ``duplex=True`` (TCP ring backend) the send and the receive run on two
  different CPU streams, hence two threads: every rank's receive is posted while
  its send is in flight, so no send waits on a peer that is itself sending.
- With ``duplex=False`` (MPI, whose library is initialised single-threaded) each
  step is two separate evaluations in rank-parity order: even ranks send then
  receive, odd ranks receive then send. Every send of an even rank meets a waiting
  odd receiver; with odd N the one even-to-even edge (N-1 -> 0) completes once rank
  0's own send has, so the wait graph never closes into a cycle and no message
  relies on eager buffering (Open MPI's 4 KiB shared-memory limit).

A zero-length part is neither sent nor received, on both sides of the edge.
"""

import mlx.core as mx


class Ring:
    """Ring reduce-scatter and all-gather over ``group`` with explicit send/recv.

    Args:
        group (mx.distributed.Group): the ranks of the ring, in rank order.
        duplex (bool): run each step's send and receive concurrently on two CPU
          streams (only where the backend is thread-safe: MLX's ring backend).
    """

    def __init__(self, group, duplex):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.right = (self.rank + 1) % self.size
        self.left = (self.rank - 1) % self.size
        self.duplex = duplex
        if duplex:
            self.send_stream = mx.new_stream(mx.cpu)
            self.recv_stream = mx.new_stream(mx.cpu)
        self.sent = 0
        self.received = 0

    def _exchange(self, outgoing, n_in, dtype):
        """Send ``outgoing`` right and return the ``n_in`` elements received from the left."""
        send = recv = None
        if outgoing.size > 0:
            stream = self.send_stream if self.duplex else None
            send = mx.distributed.send(outgoing, self.right, group=self.group, stream=stream)
            self.sent += outgoing.nbytes
        if n_in > 0:
            stream = self.recv_stream if self.duplex else None
            recv = mx.distributed.recv((n_in,), dtype, self.left, group=self.group, stream=stream)
            self.received += n_in * dtype.size
        if self.duplex:
            mx.eval([a for a in (send, recv) if a is not None])
        else:
            first, second = (send, recv) if self.rank % 2 == 0 else (recv, send)
            for a in (first, second):
                if a is not None:
                    mx.eval(a)
        return recv if recv is not None else mx.zeros((0,), dtype)

    def reduce_scatter(self, flat, counts):
        """This rank's part of the elementwise sum of ``flat`` over the ring.

        ``counts[k]`` is the length of part k; ``sum(counts) == flat.size``.
        """
        starts = [sum(counts[:k]) for k in range(self.size)]

        def chunk(k):
            k %= self.size
            return flat[starts[k] : starts[k] + counts[k]]

        mx.eval(flat)
        acc = chunk(self.rank - 1)
        for s in range(self.size - 1):
            k = (self.rank - s - 2) % self.size
            acc = self._exchange(acc, counts[k], flat.dtype) + chunk(k)
        return acc

    def all_gather(self, part, counts):
        """The concatenation of every rank's ``part`` (rank k holds ``counts[k]`` elements)."""
        parts = [None] * self.size
        parts[self.rank] = part
        mx.eval(part)
        for s in range(self.size - 1):
            k = (self.rank - s - 1) % self.size
            parts[k] = self._exchange(parts[(k + 1) % self.size], counts[k], part.dtype)
        return mx.concatenate(parts)
