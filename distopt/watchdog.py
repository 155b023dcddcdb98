"""Deadlines and heartbeats: a rank stuck in a collective ends with a clear error.

MLX's ring backend has no timeouts: when a peer hangs or its network link goes down,
the other ranks wait forever. Every rank of a distributed job therefore runs a
:class:`Watchdog` thread. MLX is lazy, so a collective blocks wherever its graph is
evaluated: inside ``distopt.init``, in distopt's eager calls (the rank agreement check,
mpi4py collectives) or in the training loop's ``mx.eval`` / ``.item()``. The watchdog
needs no hook in each of them; it checks that the main thread keeps coming back to
Python:

* every ``poll`` seconds it sends the main thread ``SIGURG`` (ignored by default);
  the Python handler runs, and stamps the time, as soon as the main thread executes
  Python code again. A thread blocked inside one call (MLX and mpi4py release the
  GIL while they wait) leaves the stamp unchanged;
* once the stamp is older than the deadline, the rank prints the step, the call it is
  stuck in and where the training loop made it, and exits with code 124
  (``os._exit``); the launcher then stops the other ranks.

The deadline adapts to the job: with step marks from ``apply_gradients``,

.. math::

    \\text{deadline} = \\max(\\text{timeout},\\ 10 \\cdot \\operatorname{median}(\\Delta t_{\\text{step}}))

where ``timeout`` comes from ``distopt.init(timeout=...)``, else the environment
variable ``DISTOPT_TIMEOUT``, else 300 s; 0 disables the watchdog. Every
``DISTOPT_HEARTBEAT`` seconds (default 60, 0 for never) each rank logs one line
with its step and median step time.

MLX's ``distributed.init`` holds the GIL while it waits for the other ranks, so the
thread cannot run then: :func:`guard` keeps that deadline with a small helper
process instead. On MPI an uncaught exception calls ``MPI_Abort``, ending the job at
once. Steps are counted by ``apply_gradients`` calls, so a step compiled with
``mx.compile`` counts once (when it is traced). When ``init`` runs outside the main
thread no signal handler can be installed; the watchdog then counts from the last
step mark instead.
"""

import linecache
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TIMEOUT = 300.0
DEFAULT_HEARTBEAT = 60.0
ADAPT_FACTOR = 10
EXIT_CODE = 124
PING = getattr(signal, "SIGURG", None)
_PACKAGE = str(Path(__file__).resolve().parent)

_current = None


def timeout_from_env(timeout=None):
    """``timeout`` if given, else ``DISTOPT_TIMEOUT``, else :data:`DEFAULT_TIMEOUT` (seconds)."""
    if timeout is None:
        text = os.environ.get("DISTOPT_TIMEOUT", "").strip()
        timeout = DEFAULT_TIMEOUT if not text else _seconds(text, "DISTOPT_TIMEOUT")
    timeout = float(timeout)
    if not timeout >= 0:
        raise ValueError(f"The watchdog timeout must be a number of seconds >= 0 (0 disables it), got {timeout!r}.")
    return timeout


def _seconds(text, name):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}.") from None


class Watchdog:
    """Ends this rank when its main thread is stuck in one call for longer than the deadline.

    Args:
        timeout (float): the smallest deadline, in seconds.
        heartbeat (float): seconds between heartbeat lines; 0 for none.
        stream: where messages go. Default ``sys.stderr``.
        exit (callable): called with :data:`EXIT_CODE` when the deadline passes.
          Default ``os._exit``, which ends the process even while the main thread
          is blocked in C code.
    """

    def __init__(self, timeout=DEFAULT_TIMEOUT, heartbeat=DEFAULT_HEARTBEAT, stream=None, exit=os._exit):
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat)
        self.stream = stream
        self.exit = exit
        self.rank = self.size = None
        self.backend = None
        self.phase = "start"
        self.step = 0
        self.intervals = deque(maxlen=200)
        self.last_step = None
        self.alive = time.monotonic()
        self.fired = False
        self._signals = False
        self._stop = threading.Event()
        self._main = threading.main_thread()
        self._thread = None

    @property
    def deadline(self):
        """``max(timeout, 10 * median step interval)`` in seconds."""
        if not self.intervals:
            return self.timeout
        return max(self.timeout, ADAPT_FACTOR * statistics.median(self.intervals))

    @property
    def poll(self):
        """Seconds between checks (and pings): 1 s, shorter for short deadlines or heartbeats."""
        beat = self.heartbeat / 2 if self.heartbeat > 0 else 1.0
        return max(0.05, min(1.0, self.timeout / 20, beat))

    def start(self):
        """Install the ping handler (main thread only) and start the thread."""
        self._signals = PING is not None and threading.current_thread() is self._main and self._install()
        self.alive = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="distopt-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop the thread and give back the ping signal's previous handler."""
        self._stop.set()
        if self._signals and threading.current_thread() is self._main:
            signal.signal(PING, self._previous)
            self._signals = False

    def _install(self):
        previous = self._previous = signal.getsignal(PING)

        def pong(signum, frame):
            self.alive = time.monotonic()
            if callable(previous):
                previous(signum, frame)

        signal.signal(PING, pong)
        signal.siginterrupt(PING, False)  # restart interrupted system calls
        return True

    # --- marks from distopt -----------------------------------------------------

    def joining(self, backend):
        """``init`` is about to connect the ranks of ``backend``."""
        self.backend = backend
        self.phase = "init"
        self.alive = time.monotonic()

    def joined(self, rank, size):
        """``init`` returned: this process is ``rank`` of ``size``."""
        self.rank, self.size = rank, size
        self.phase = "joined"
        self.alive = time.monotonic()

    def step_started(self):
        """``apply_gradients`` built step ``self.step + 1``: the previous one has completed."""
        now = time.monotonic()
        if self.last_step is not None:
            self.intervals.append(now - self.last_step)
        self.last_step = self.alive = now
        self.step += 1
        self.phase = "step"

    # --- the thread ---------------------------------------------------------------

    def _run(self):
        next_beat = time.monotonic() + self.heartbeat
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            if now - self.alive > self.deadline and self._still_blocked():
                self._fire(time.monotonic() - self.alive)
                return
            if self._signals:
                signal.pthread_kill(self._main.ident, PING)
            if self.heartbeat > 0 and now >= next_beat:
                next_beat = now + self.heartbeat
                self._say(self.status())

    def _still_blocked(self):
        """Ping once more and give the main thread a moment to answer (it may just have returned)."""
        if not self._signals:
            return True
        before = self.alive
        signal.pthread_kill(self._main.ident, PING)
        self._stop.wait(min(0.5, self.poll * 2))
        return self.alive == before

    def status(self):
        """One heartbeat line: step, median step time, deadline."""
        median = f"{statistics.median(self.intervals):.3f} s" if self.intervals else "n/a"
        return f"{self._who()} alive: step {self.step}, median step {median}, deadline {self.deadline:.0f} s"

    def _fire(self, stuck):
        self.fired = True
        self._say(self.report(stuck))
        self.exit(EXIT_CODE)

    def report(self, stuck):
        """The error message: who, how long, in which step and call, and what to do."""
        op, where = locate(sys._current_frames().get(self._main.ident))
        if self.phase == "init":
            what = (
                f"init of the {self.backend} backend did not complete: the other ranks did not all "
                "connect (a rank never started, crashed before init, or cannot reach this host)"
            )
        elif self.phase == "step":
            what = f"step {self.step} did not complete (its reduce-scatter / all-gather never finished)"
        else:
            what = "a collective did not complete"
        inside = f" in {op}" if op else ""
        at = f" at {where}" if where else ""
        return (
            f"{self._who()} watchdog: no progress for {stuck:.1f} s (deadline {self.deadline:.1f} s): {what}; "
            f"blocked{inside}{at}. A peer rank probably died, hung or lost its network link. "
            f"Exiting with code {EXIT_CODE} so the launcher stops the other ranks "
            "(DISTOPT_TIMEOUT sets the deadline in seconds)."
        )

    def _who(self):
        if self.rank is None:
            return "distopt: rank ?"
        return f"distopt: rank {self.rank} of {self.size}"

    def _say(self, message):
        stream = self.stream or sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def locate(frame):
    """``(distopt call, user code line)`` of a stack: where a blocked thread is.

    The first is the innermost distopt function (e.g. ``MpiComm.reduce_scatter``),
    the second the innermost line outside distopt and MLX, with its source text.
    """
    op = where = None
    while frame is not None:
        path = frame.f_code.co_filename
        inside = path.startswith(_PACKAGE)
        if inside and op is None and not path.endswith("watchdog.py"):
            op = f"distopt {_qualname(frame)} ({Path(path).name}:{frame.f_lineno})"
        elif not inside and where is None and "mlx" not in Path(path).parts:
            source = linecache.getline(path, frame.f_lineno).strip()
            where = f"{path}:{frame.f_lineno}" + (f" `{source}`" if source else "")
        frame = frame.f_back
    return op, where


def _qualname(frame):
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


# --- calls that hold the GIL ---------------------------------------------------------

_GUARD = r"""
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready and os.getppid() == pid:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


@contextmanager
def guard(seconds, message):
    """SIGKILL this process, after printing ``message``, if the block lasts over ``seconds``.

    For calls that block while holding the GIL, where the watchdog thread cannot run:
    MLX's ``distributed.init`` waits for its peers that way. A small helper process
    waits on a pipe that this process closes when the block ends (or when it dies).
    """
    if not seconds:
        yield
        return
    read, write = os.pipe()
    argv = [sys.executable, "-c", _GUARD, str(os.getpid()), str(seconds), message]
    helper = subprocess.Popen(argv, stdin=read, stdout=subprocess.DEVNULL)
    os.close(read)
    try:
        yield
    finally:
        os.close(write)
        helper.wait()


# --- the process-wide watchdog -----------------------------------------------------


def start(timeout=None, heartbeat=None):
    """Start (once per process) and return the watchdog; ``None`` when disabled (timeout 0)."""
    global _current
    timeout = timeout_from_env(timeout)
    if heartbeat is None:
        text = os.environ.get("DISTOPT_HEARTBEAT", "").strip()
        heartbeat = DEFAULT_HEARTBEAT if not text else _seconds(text, "DISTOPT_HEARTBEAT")
    if _current is not None:
        _current.timeout, _current.heartbeat = timeout, heartbeat
        return _current
    if timeout == 0:
        return None
    _current = Watchdog(timeout, heartbeat).start()
    return _current


def joining(backend, timeout=None):
    """Start the watchdog for ``init`` of ``backend``; returns the guard of the connect call.

    MLX's ``distributed.init`` holds the GIL while it waits for the other ranks, so
    the connection is guarded by :func:`guard` with the deadline ``timeout``.
    """
    dog = start(timeout)
    if dog is None:
        return guard(0, "")
    dog.joining(backend)
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"distopt: rank {rank} watchdog: init of the {backend} backend did not complete within "
        f"{dog.timeout:g} s: the other ranks did not all connect (a rank never started, crashed "
        "before init, or cannot reach this host's address). Killing this rank (SIGKILL) so the "
        "launcher stops the others (DISTOPT_TIMEOUT sets the deadline in seconds)."
    )
    return guard(dog.timeout, message)


def joined(group, backend):
    """``init`` returned ``group``: name this rank, and on MPI abort the job on an uncaught exception."""
    if _current is not None:
        _current.joined(group.rank(), group.size())
    if backend == "mpi":
        _abort_on_exception()


def _abort_on_exception():
    """Make an uncaught exception end the whole MPI job at once (``MPI_Abort``).

    Otherwise the failing rank waits in ``MPI_Finalize`` for peers that wait for it
    in a collective, until the watchdog's deadline. mpi4py's ``python -m mpi4py``
    does the same.
    """
    previous = sys.excepthook

    def abort(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.flush()
        from .comm import _mpi_world

        _mpi_world().Abort(1)

    sys.excepthook = abort


def current():
    """The running watchdog, or ``None``."""
    return _current


def step_started():
    """Mark the start of an optimizer step (called by ``ShardedOptimizer.apply_gradients``)."""
    if _current is not None:
        _current.step_started()
