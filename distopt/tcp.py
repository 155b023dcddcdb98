"""Reduce-scatter and all-gather around a ring of plain blocking TCP sockets.

Why by hand: on MLX's TCP ring backend, ``mx.distributed.send``/``recv`` move data
through socket threads that spin while a message is pending and cannot write into
a slice of an existing array. Measured on a 2-core VM, exchanging 20 MiB each way
took ~30 ms through them and 12.5 ms through two blocking Python sockets (128 MiB:
134-155 ms against 79 ms). No library the field uses offers a reduce-scatter over
the ring backend's hosts (gloo comes only with PyTorch; MPI is a different
backend), so this module opens its own sockets: rank r connects to rank r + 1 and
accepts rank r - 1, on the address the ring hostfile gives it, at a port the
kernel picks (exchanged with one ``all_gather``).

The ring algorithms are :class:`distopt.byte_ring.ByteRing`'s; this module is their
transport, in one of three schedules (``DISTOPT_TCP_WAYS``):

- ``0`` (default): step by step. In each step a thread sends to the right while the
  main thread receives from the left straight into an MLX buffer (``recv_into`` a
  NumPy view of it), then adds.
- ``1``: streamed. A sender thread and a receiver thread run the whole ring at once:
  the receiver takes each step's part a chunk (``DISTOPT_TCP_CHUNK_KIB``, default
  1 MiB) at a time, adds this rank's values and hands the chunk to the sender,
  which passes it on while the next chunk arrives (MLX's ring ``all_sum`` pipelines
  the same way). Meant for hosts with cores to spare; on a 2-core VM it was no faster
  (README, Communication).
- ``2``: streamed both ways: the first half of every part goes to rank r + 1, the rest
  to rank r - 1 over the same two sockets (TCP is full duplex), so from 3 ranks on both
  directions of every link carry data.

Every send has a receiver that is already reading (or data the kernel buffers for
it), and a receiver never waits on its own rank's sender, so no rank waits on one
that is itself sending: no deadlock for any N and size. The sockets block without a
timeout of their own, like MLX's collectives: a peer that hangs is caught by
:mod:`distopt.watchdog` (the main thread's wait stays inside one system call: a
``recv``, or the read of a pipe the streaming threads write to as they end), and a
peer that dies closes its sockets, which raises :class:`ConnectionError` naming it.
"""

import os
import queue
import socket
import threading
from dataclasses import dataclass

import numpy as np

from .buffers import as_dtype, receive_buffer
from .byte_ring import ByteRing, _add_into, _byte_views, _bytes, _Pieces
from .group import all_gather_object

CHUNK_KIB = 1024  # streamed: received, added and passed on this much at a time (DISTOPT_TCP_CHUNK_KIB)


class TcpRing(ByteRing):
    """Ring reduce-scatter and all-gather over ``group`` on sockets of its own.

    Args:
        group (mx.distributed.Group): the ranks (collective: every rank builds one).
        host (str): the address this rank listens on (its ring hostfile address).
    """

    def __init__(self, group, host):
        ways, chunk = _schedule()  # before any collective: a bad value fails here, on every rank
        self.rank, self.size = group.rank(), group.size()
        self.sent = self.received = 0
        listener = socket.create_server((host, 0))
        try:
            addresses = all_gather_object([host, listener.getsockname()[1]], group)
            right_host, right_port = addresses[(self.rank + 1) % self.size]
            self.right = socket.create_connection((right_host, right_port))
            self.right.sendall(self.rank.to_bytes(4, "little"))  # who is calling
            self.left, _ = listener.accept()
        finally:
            listener.close()
        caller = bytearray(4)
        _recv_into(self.left, memoryview(caller), f"{(self.rank - 1) % self.size} (handshake)")
        if int.from_bytes(caller, "little") != (self.rank - 1) % self.size:
            raise ConnectionError(
                f"distopt tcp: rank {self.rank} expected rank {(self.rank - 1) % self.size} to connect to "
                f"{host}:{addresses[self.rank][1]}, got a connection that says it is {int.from_bytes(caller, 'little')}"
            )
        for s in (self.right, self.left):
            s.settimeout(None)  # blocking: the watchdog sees a wait inside one system call
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        both = [_Way(1, self.right, self.left, right, left, chunk), _Way(-1, self.left, self.right, left, right, chunk)]
        self.ways = both[:ways]  # none: step by step
        self.peers = {"right": right, "left": left}
        self._done = os.pipe()  # each flow of a step writes a byte here as it ends
        self.broken = None

    def _step(self, outgoing, incoming):
        """Send the byte views ``outgoing`` (in order) right while receiving into the byte
        views ``incoming`` (in order) from the left."""
        error = []

        def send():
            try:
                _send_all(self.right, outgoing, self.peers["right"])
            except ConnectionError as e:
                error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for view in incoming:
                _recv_into(self.left, view, self.peers["left"])
        finally:
            sender.join()
        if error:
            raise error[0]
        self.sent += sum(len(view) for view in outgoing)
        self.received += sum(len(view) for view in incoming)

    def _ring_sum(self, own, counts, dtype):
        """The reduce-scatter's ring steps, streamed (step by step with no ways): part k's
        elements ``lo[k]:hi[k]`` of each way (:func:`_halves`) are received, added and
        passed on a chunk at a time, so the next step's send starts while this step's
        receive goes on."""
        if not self.ways:
            return super()._ring_sum(own, counts, dtype)
        out = receive_buffer(counts[self.rank], dtype)
        result = np.asarray(out)
        parts = [_Pieces(views) for views in own]
        flows = []
        for w, (way, (lo, hi)) in enumerate(zip(self.ways, _halves(counts, len(self.ways)))):
            forward = queue.SimpleQueue()
            steps = [(self.rank - way.sign * (s + 2)) % self.size for s in range(self.size - 1)]
            first = (self.rank - way.sign) % self.size
            # where each step's running sum lands: kept scratch, the last step's in the result
            into = [self._scratch(("way", w, s), hi[k] - lo[k], result.dtype) for s, k in enumerate(steps[:-1])]
            into.append(result[lo[steps[-1]] : hi[steps[-1]]])
            flows.append(_sender(way, parts[first].range(lo[first], hi[first]), forward))
            flows.append(_summing_receiver(way, steps, parts, lo, into, dtype, forward))
            self.sent += sum((hi[k] - lo[k]) for k in [first, *steps[:-1]]) * result.itemsize
            self.received += sum(hi[k] - lo[k] for k in steps) * result.itemsize
        self._run(flows)
        return as_dtype(out, dtype)

    def _pass_round(self, slot, starts):
        """The all-gather's ring steps, streamed as in :meth:`_ring_sum` (the same split of
        every part between the ways), each received chunk passed on at once."""
        if not self.ways:
            return super()._pass_round(slot, starts)
        flows = []
        for way, (lo, hi) in zip(self.ways, _halves(np.diff(starts), len(self.ways))):
            forward = queue.SimpleQueue()
            half = [_Pieces(slot(k)).range(lo[k], hi[k]) for k in range(self.size)]  # this way's views of part k
            steps = [half[(self.rank - way.sign * (s + 1)) % self.size] for s in range(self.size - 1)]
            flows.append(_sender(way, half[self.rank], forward))
            flows.append(_passing_receiver(way, steps, forward))
            self.sent += sum(v.nbytes for views in [half[self.rank], *steps[:-1]] for v in views)
            self.received += sum(v.nbytes for views in steps for v in views)
        self._run(flows)

    def _run(self, flows):
        """Run each of ``flows`` in a thread of its own; wait for them inside one system
        call at a time (a read of :attr:`_done`, which each writes to as it ends), so the
        watchdog sees a wait for a peer as one. The first error raises at once."""
        if self.broken:
            raise ConnectionError(f"distopt tcp: rank {self.rank}'s ring is broken by an earlier error: {self.broken}")
        errors = []

        def run(flow):
            try:
                flow()
            except Exception as e:  # noqa: BLE001  re-raised in the calling thread
                errors.append(e)
            finally:
                os.write(self._done[1], b"x")

        for flow in flows:
            threading.Thread(target=run, args=(flow,), daemon=True).start()
        for _ in flows:
            os.read(self._done[0], 1)
            if errors:
                self.broken = errors[0]
                raise errors[0]


@dataclass
class _Way:
    """One direction round the ring: ``sign`` +1 sends to rank r + 1 (on ``send``) and
    receives from rank r - 1 (on ``receive``); -1 the other way, on the same sockets."""

    sign: int
    send: socket.socket
    receive: socket.socket
    to: int
    source: int
    chunk: int  # bytes received, added and passed on at a time


def _schedule():
    """``(ways, chunk bytes)`` from ``DISTOPT_TCP_WAYS`` (0 step by step, the default; 1 or
    2 streamed ways) and ``DISTOPT_TCP_CHUNK_KIB``."""
    ways, chunk = os.environ.get("DISTOPT_TCP_WAYS", "0"), os.environ.get("DISTOPT_TCP_CHUNK_KIB", str(CHUNK_KIB))
    if ways not in ("0", "1", "2"):
        raise ValueError(f"DISTOPT_TCP_WAYS={ways!r}: expected 0 (step by step), 1 (streamed one way) or 2 (both ways round the ring).")
    if not chunk.isdigit() or int(chunk) < 1:
        raise ValueError(f"DISTOPT_TCP_CHUNK_KIB={chunk!r}: expected a whole number of KiB, at least 1.")
    return int(ways), int(chunk) << 10


def _halves(counts, ways):
    """``(lo, hi)`` per direction: part k's elements ``lo[k]:hi[k]`` go that way round."""
    cuts = [[c * i // ways for c in counts] for i in range(ways + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(ways)]


def _sender(way, first, forward):
    """Send ``first`` (views), then each view ``forward`` hands over until ``None``."""

    def send():
        _send_all(way.send, [v for a in first for v in _byte_views(a)], way.to)
        while (view := forward.get()) is not None:
            _send_all(way.send, [view], way.to)

    return send


def _summing_receiver(way, steps, parts, lo, into, dtype, forward):
    """Receive part ``steps[s]``'s half into ``into[s]`` chunk by chunk in step s, add this
    rank's values and hand each chunk to the sender (the last step's sum, this rank's own
    part, stays where it is)."""

    def receive():
        try:
            for s, (k, got) in enumerate(zip(steps, into)):
                step = way.chunk // got.itemsize
                for c in range(0, got.size, step):
                    chunk = got[c : c + step]
                    _recv_into(way.receive, _bytes(chunk), way.source)
                    _add_into(chunk, parts[k].range(lo[k] + c, lo[k] + c + chunk.size), dtype)
                    if s < len(steps) - 1:
                        forward.put(_bytes(chunk))
        finally:
            forward.put(None)

    return receive


def _passing_receiver(way, steps, forward):
    """Receive into the views ``steps[s]`` in step s chunk by chunk, handing each chunk
    but the last step's to the sender."""

    def receive():
        try:
            for s, views in enumerate(steps):
                for view in views:
                    data = _bytes(view)
                    for c in range(0, len(data), way.chunk):
                        _recv_into(way.receive, data[c : c + way.chunk], way.source)
                        if s < len(steps) - 1:
                            forward.put(data[c : c + way.chunk])
        finally:
            forward.put(None)

    return receive


def _send_all(sock, views, peer):
    """Send the byte ``views`` in order, gathering up to 1024 (IOV_MAX) per ``sendmsg``;
    a failing socket raises ConnectionError naming rank ``peer``."""
    views, i = list(views), 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + 1024])
        except OSError as e:
            raise ConnectionError(f"distopt tcp: sending to rank {peer} failed: {e}") from e
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if sent:
            views[i] = views[i][sent:]


def _recv_into(sock, buffer, peer):
    """Fill ``buffer`` from ``sock``; a closed or failing socket raises ConnectionError."""
    got = 0
    while got < len(buffer):
        try:
            n = sock.recv_into(buffer[got:])
        except OSError as e:
            raise ConnectionError(f"distopt tcp: receiving from rank {peer} failed: {e}") from e
        if n == 0:
            raise ConnectionError(f"distopt tcp: rank {peer} closed the connection mid-step")
        got += n


def ring_host():
    """This rank's address in the ring hostfile (``MLX_HOSTFILE``, ``MLX_RANK``)."""
    from .hostfile import load_hostfile

    return load_hostfile(os.environ["MLX_HOSTFILE"]).hosts[int(os.environ["MLX_RANK"])].ips[0]
