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
transport: in each step a thread sends to the right while the main thread receives
from the left straight into an MLX buffer (``recv_into`` a NumPy view of it). Every
send has a receiver that is already reading, so no rank waits on one that is itself
sending: no deadlock for any N and size. The sockets block without a timeout of
their own, like MLX's collectives: a peer that hangs is caught by
:mod:`distopt.watchdog` (the wait stays inside one system call), and a peer that
dies closes its sockets, which raises :class:`ConnectionError` naming it.
"""

import os
import socket
import threading

from .byte_ring import ByteRing
from .group import all_gather_object


class TcpRing(ByteRing):
    """Ring reduce-scatter and all-gather over ``group`` on sockets of its own.

    Args:
        group (mx.distributed.Group): the ranks (collective: every rank builds one).
        host (str): the address this rank listens on (its ring hostfile address).
    """

    def __init__(self, group, host):
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
        self.peers = {"right": (self.rank + 1) % self.size, "left": (self.rank - 1) % self.size}

    def _step(self, outgoing, incoming):
        """Send the byte views ``outgoing`` (in order) right while receiving into the byte
        views ``incoming`` (in order) from the left."""
        error = []

        def send():
            try:
                _send_all(self.right, outgoing)
            except OSError as e:
                error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for view in incoming:
                _recv_into(self.left, view, self.peers["left"])
        finally:
            sender.join()
        if error:
            raise ConnectionError(f"distopt tcp: sending to rank {self.peers['right']} failed: {error[0]}")
        self.sent += sum(len(view) for view in outgoing)
        self.received += sum(len(view) for view in incoming)


def _send_all(sock, views):
    """Send the byte ``views`` in order, gathering up to 1024 (IOV_MAX) per ``sendmsg``."""
    views, i = list(views), 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + 1024])
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
