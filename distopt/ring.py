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
With three or more ranks on the TCP ring, the first half of every part goes round
rightwards and the second half leftwards at the same time (same bytes), so both
directions of every link carry data, as in MLX's own ``all_sum``.

Why it cannot deadlock, for any N and any message size: every step is one
``mx.eval`` of one send and one receive.

- With ``duplex=True`` (TCP ring backend) every send and every receive of a step
  runs on its own CPU stream, hence its own thread: every rank's receives are posted
  while its sends are in flight, so no send waits on a peer that is itself sending.
  Each socket has one sending and one receiving stream, so messages keep their order.
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
        self.duplex = duplex
        # With three or more ranks on the TCP ring, half of every part travels each way
        # round the ring, so both directions of every link carry data (as MLX's all_sum).
        self.directions = (1, -1) if duplex and self.size > 2 else (1,)
        if duplex:
            self.streams = {(op, d): mx.new_stream(mx.cpu) for op in ("send", "recv") for d in self.directions}
        self.sent = 0
        self.received = 0

    def _exchange(self, flows, dtype):
        """One ring step: for each ``(d, outgoing, n_in)`` send ``outgoing`` to rank ``r + d``
        and receive ``n_in`` elements from rank ``r - d``; returns the received arrays."""
        sends, recvs = [], []
        for d, outgoing, n_in in flows:
            stream = (lambda op: self.streams[(op, d)]) if self.duplex else (lambda op: None)
            if outgoing.size > 0:
                dst = (self.rank + d) % self.size
                sends.append(mx.distributed.send(outgoing, dst, group=self.group, stream=stream("send")))
                self.sent += outgoing.nbytes
            recv = mx.zeros((0,), dtype)
            if n_in > 0:
                src = (self.rank - d) % self.size
                recv = mx.distributed.recv((n_in,), dtype, src, group=self.group, stream=stream("recv"))
                self.received += n_in * dtype.size
            recvs.append(recv)
        if self.duplex:
            mx.eval(sends + recvs)
        else:
            for group in (sends, recvs) if self.rank % 2 == 0 else (recvs, sends):
                for a in group:
                    mx.eval(a)
        return recvs

    def reduce_scatter(self, flat, counts):
        """This rank's part of the elementwise sum of ``flat`` over the ring.

        ``counts[k]`` is the length of part k; ``sum(counts) == flat.size``. With two
        directions, the first half of every part goes rightwards and the rest leftwards.
        """
        starts = [sum(counts[:k]) for k in range(self.size)]
        halves = len(self.directions)

        def piece(k, i):
            k %= self.size
            cut = [starts[k], starts[k] + counts[k] // halves, starts[k] + counts[k]]
            lo, hi = (cut[0], cut[-1]) if halves == 1 else (cut[i], cut[i + 1])
            return flat[lo:hi]

        mx.eval(flat)
        acc = [piece(self.rank - d, i) for i, d in enumerate(self.directions)]
        for s in range(self.size - 1):
            ks = [(self.rank - d * (s + 2)) % self.size for d in self.directions]
            flows = [(d, acc[i], piece(ks[i], i).size) for i, d in enumerate(self.directions)]
            got = self._exchange(flows, flat.dtype)
            acc = [got[i] + piece(ks[i], i) for i in range(halves)]
        return acc[0] if halves == 1 else mx.concatenate(acc)

    def all_gather(self, part, counts):
        """The concatenation of every rank's ``part`` (rank k holds ``counts[k]`` elements)."""
        parts = [None] * self.size
        parts[self.rank] = part
        mx.eval(part)
        for s in range(self.size - 1):
            k = (self.rank - s - 1) % self.size
            parts[k] = self._exchange([(1, parts[(k + 1) % self.size], counts[k])], part.dtype)[0]
        return mx.concatenate(parts)
