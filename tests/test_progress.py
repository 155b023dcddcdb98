"""distopt.progress: kept lines with loss, throughput, step time and bytes; a live bar on a
terminal; only rank 0 prints; tracebacks tagged with the rank."""

import io
import os
import subprocess
import sys

from helpers import launcher_env

from distopt.comm import Traffic
from distopt.progress import Progress, format_bytes


class Clock:
    """A fake ``time.perf_counter`` advanced by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_report_loss_rate_time_and_bytes(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("distopt.progress.time.perf_counter", clock)
    out, traffic = io.StringIO(), Traffic()
    progress = Progress(4, every=2, stream=out, tty=False, traffic=traffic)
    for step in range(1, 5):
        clock.now += 0.5  # 0.5 s per step
        traffic.add("reduce_scatter", 1000, 1000)  # 2,000 bytes moved per step
        progress.update(step, loss=3.0 - step / 2, tokens=1000)
    progress.log("done")
    assert out.getvalue() == (
        "step 2/4 | loss 2.00000 | 2,000 tok/s | 500.0 ms/step | 2.0 kB/step\n"
        "step 4/4 | loss 1.00000 | 2,000 tok/s | 500.0 ms/step | 2.0 kB/step\n"
        "done\n"
    )
    assert progress.history == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]


def test_bar_on_terminal_and_silent_ranks():
    out = io.StringIO()
    progress = Progress(20, every=10, stream=out, tty=True)
    for step in range(1, 12):
        progress.update(step, loss=1.0)
    progress.close()
    text = out.getvalue()
    assert text.count("\r\033[K[") == 10  # the bar is redrawn in place for steps 1-9 and 11
    assert "\r\033[Kstep 10/20 | loss 1.00000" in text and text.endswith("\n")
    quiet = io.StringIO()
    other = Progress(20, rank=1, every=1, stream=quiet, tty=False)
    other.update(1, loss=1.0, tokens=5)
    other.log("hello")
    assert quiet.getvalue() == ""


def test_environment_chooses_lines_or_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("DISTOPT_BACKEND", raising=False)
    monkeypatch.delenv("DISTOPT_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Progress(1, stream=Tty()).tty and not Progress(1, stream=io.StringIO()).tty
    monkeypatch.setenv("DISTOPT_PROGRESS", "lines")
    assert not Progress(1, stream=Tty()).tty
    monkeypatch.setenv("DISTOPT_PROGRESS", "bar")
    assert Progress(1, stream=io.StringIO()).tty
    monkeypatch.delenv("DISTOPT_PROGRESS")
    monkeypatch.setenv("DISTOPT_BACKEND", "mpi")  # under distopt launch: lines, even on mpirun's pty
    assert not Progress(1, stream=Tty()).tty


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1500, 2.5e6, 3e9, 4e15)] == ["0 B", "999 B", "1.5 kB", "2.5 MB", "3.0 GB", "4000.0 TB"]


def test_uncaught_error_tagged_with_rank():
    code = "from distopt.progress import show_rank_errors\nshow_rank_errors(3)\nraise ValueError('boom')\n"
    env = launcher_env()
    env.pop("DISTOPT_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 1
    assert lines[0] == "[rank 3] Traceback (most recent call last):"
    assert lines[-1] == "[rank 3] ValueError: boom"
    assert all(line.startswith("[rank 3] ") for line in lines)
