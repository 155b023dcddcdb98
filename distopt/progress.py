"""Training progress on rank 0: a live bar on a terminal, plain log lines otherwise.

Only rank 0 prints, so N ranks do not print N copies. Each report shows the step, the
loss, the throughput, the mean step time and the bytes this rank moved per step::

    step  120/500 | loss 1.2345 | 41,200 tok/s | 12.4 ms/step | 1.5 MB/step

On a terminal the bar redraws in place and a line is kept every ``every`` steps; when
the output is a file or a pipe (a launcher, a log), only the kept lines are written,
one per line, so logs stay short and easy to parse. Under ``distopt launch``, which
tags each rank's output line by line, kept lines are always used. ``DISTOPT_PROGRESS=lines``
(or ``bar``) overrides the choice, e.g. under a bare ``mpirun``, which gives ranks a
pseudo-terminal even when its own output is a file.

:func:`show_rank_errors` makes an uncaught exception on any rank print its traceback
prefixed with ``[rank r]``, so the failing rank is obvious in mixed output.
"""

import os
import sys
import time

__all__ = ["Progress", "show_rank_errors", "format_bytes"]


def format_bytes(n):
    """``n`` bytes as a short human string, e.g. ``1.5 MB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


class Progress:
    """Report training progress from rank 0.

    Args:
        total (int): the last step number (the bar's length).
        rank (int, optional): this process's rank; only rank 0 prints. Default: ``0``
        start (int, optional): the step training starts from (e.g. after a resume).
          Default: ``0``
        every (int, optional): keep a log line every ``every`` steps (and at the
          last step). Default: ``10``
        stream (file, optional): where to write. Default: ``sys.stdout``
        tty (bool, optional): draw a live bar; default: whether ``stream`` is a terminal.
        traffic (optional): a :class:`~distopt.ShardedOptimizer` (its communicator's byte
          counter, which exists from its first step on) or a ``distopt.comm.Traffic``;
          the bytes this rank sent and received per step are shown.
        unit (str, optional): what ``tokens`` counts, shown as ``unit/s``. Default: ``"tok"``

    Example:
        >>> progress = Progress(total=500, rank=group.rank())
        >>> for step in range(1, 501):
        ...     loss = train_step()
        ...     progress.update(step, loss=loss.item(), tokens=batch_tokens)
        >>> progress.close()
    """

    def __init__(self, total, rank=0, start=0, every=10, stream=None, tty=None, traffic=None, unit="tok"):
        self.total = total
        self.unit = unit
        self.rank = rank
        self.every = max(1, int(every))
        self.stream = stream if stream is not None else sys.stdout
        self.tty = tty if tty is not None else _wants_bar(self.stream)
        self.traffic = traffic
        self.history = []
        self._dirty = False  # a bar is drawn and its line not ended
        self._last_step = start
        self._window = []  # (seconds, tokens, bytes) per step since the last kept line
        self._clock = time.perf_counter()
        self._bytes = self._traffic_bytes()

    def update(self, step, loss, tokens=0, **extra):
        """Record step ``step`` (ending now) and print if due.

        Args:
            step (int): the step just finished (1-based: the number of steps done).
            loss (float): its loss, already averaged over ranks if it should be global.
            tokens (int, optional): tokens (or samples) in the global batch of the step.
            **extra: more ``name=value`` figures to show in the kept lines.
        """
        now = time.perf_counter()
        moved = self._traffic_bytes()
        steps = max(1, step - self._last_step)
        self._window.append((now - self._clock, tokens * steps, moved - self._bytes, steps))
        self._clock, self._bytes, self._last_step = now, moved, step
        self.history.append((step, float(loss)))
        if self.rank != 0:
            return
        keep = step % self.every == 0 or step >= self.total
        if keep:
            self._write(self._line(step, loss, extra), newline=True)
            self._window = []
        elif self.tty:
            self._write(self._bar(step, loss), newline=False)

    def log(self, message):
        """Print ``message`` on its own line from rank 0 (clears the live bar first)."""
        if self.rank == 0:
            self._write(message, newline=True)

    def close(self):
        """End the live bar's line, if one is drawn."""
        if self.rank == 0 and self.tty:
            self.stream.write("\n" if self._dirty else "")
            self.stream.flush()
            self._dirty = False

    def _traffic_bytes(self):
        counter = self.traffic
        if hasattr(counter, "comm"):  # an optimizer
            counter = getattr(counter.comm, "traffic", None)
        if counter is None:
            return 0
        return counter.total_sent() + counter.total_received()

    def _rates(self):
        seconds = sum(w[0] for w in self._window)
        tokens = sum(w[1] for w in self._window)
        nbytes = sum(w[2] for w in self._window)
        steps = sum(w[3] for w in self._window) or 1
        return seconds / steps, (tokens / seconds if seconds > 0 else 0.0), nbytes / steps

    def _line(self, step, loss, extra):
        step_time, tok_s, per_step = self._rates()
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}", f"loss {loss:.5f}"]
        parts += [f"{k} {_fmt(v)}" for k, v in extra.items()]
        if tok_s:
            parts.append(f"{tok_s:,.0f} {self.unit}/s")
        parts.append(f"{step_time * 1e3:.1f} ms/step")
        if self.traffic is not None:
            parts.append(f"{format_bytes(per_step)}/step")
        return " | ".join(parts)

    def _bar(self, step, loss):
        step_time, tok_s, _ = self._rates()
        done = min(1.0, step / max(1, self.total))
        filled = int(24 * done)
        bar = "#" * filled + "." * (24 - filled)
        return f"[{bar}] {step}/{self.total} loss {loss:.4f} {step_time * 1e3:.1f} ms/step"

    def _write(self, text, newline):
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if newline else ""))
            self._dirty = not newline
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def show_rank_errors(rank):
    """Prefix the traceback of an uncaught exception with ``[rank r] `` on stderr.

    ``distopt launch`` already tags every line of every rank, so under it (``DISTOPT_BACKEND``
    set) this does nothing. Elsewhere (``mpirun`` without ``--tag-output``, ``mlx.launch``)
    it wraps the current ``sys.excepthook``, keeping what it does (e.g. distopt's
    ``MPI_Abort`` of the whole job); the exit status stays non-zero.

    Args:
        rank (int): this process's rank.
    """
    if "DISTOPT_BACKEND" in os.environ:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        real = sys.stderr
        sys.stderr = _Prefixed(real, f"[rank {rank}] ")
        try:
            previous(kind, value, tb)
        finally:
            sys.stderr.flush()
            sys.stderr = real

    sys.excepthook = hook


class _Prefixed:
    """A text stream that writes ``prefix`` at the start of every line to ``stream``."""

    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.stream.write(self.prefix + line + "\n")
        return len(text)

    def flush(self):
        if self.pending:
            self.stream.write(self.prefix + self.pending + "\n")
            self.pending = ""
        self.stream.flush()


def _fmt(value):
    if hasattr(value, "item"):  # an mx.array or NumPy scalar
        value = value.item()
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def _wants_bar(stream):
    """Draw a live bar? ``DISTOPT_PROGRESS=bar|lines`` decides; else whether ``stream`` is a terminal."""
    choice = os.environ.get("DISTOPT_PROGRESS", "").lower()
    if choice in ("bar", "lines"):
        return choice == "bar"
    if "DISTOPT_BACKEND" in os.environ or os.environ.get("TERM") == "dumb":  # distopt launch tags lines
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
