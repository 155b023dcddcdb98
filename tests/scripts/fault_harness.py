"""Run one fault case of ``fault_train.py`` through ``distopt launch`` and measure its end.

``run_fault(backend, n, fault, rank, step)`` starts the launcher, timestamps every
output line, optionally SIGTERMs the launcher itself, and returns a :class:`FaultRun`:
exit code, seconds from the fault to the launcher's exit, the processes of the job
still alive afterwards (found by a unique tag in their command line), and the output.
Used by ``tests/test_faults.py`` and ``benchmarks/stress_faults.py``.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "fault_train.py"


@dataclass
class FaultRun:
    code: int
    fault_at: float  # seconds after launch when the fault happened (line seen / signal sent)
    ended_at: float  # seconds after launch when the launcher exited
    leftovers: list  # pids of the job still alive after the launcher exited
    lines: list = field(default_factory=list)  # (seconds, stream, text)

    @property
    def gone_after(self):
        """Seconds from the fault until every process of the job was gone."""
        return self.ended_at - self.fault_at

    @property
    def text(self):
        return "\n".join(f"{t:7.2f} {s} {line}" for t, s, line in self.lines)

    def find(self, needle):
        return [line for _, _, line in self.lines if needle in line]


def launcher_env(timeout):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DISTOPT_TIMEOUT"] = str(timeout)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_fault(backend, n, fault, rank=1, step=5, *, deadline=3.0, steps=30, sigterm_at=None,
              ckpt=None, limit=90, launch_args=(), env=None, trigger=None):
    """Run one case of ``fault_train.py`` (``fault`` is one of its FAULTs, or one done from here).

    ``fault="sigterm"`` SIGTERMs the launcher (as Ctrl-C would) at step ``sigterm_at``
    (default ``step``); ``fault="kill9"`` SIGKILLs rank ``rank`` when rank 0 prints step ``step``.

    ``trigger=(text, action)`` calls ``action()`` (e.g. cut a network link) when a
    line holding ``text`` appears, and counts that moment as the fault.
    """
    tag = uuid.uuid4().hex[:12]
    script_fault = "none" if fault in ("sigterm", "kill9") else fault
    argv = [sys.executable, "-m", "distopt.cli", "launch", "-n", str(n), "--backend", backend,
            *map(str, launch_args), str(SCRIPT), script_fault, str(rank), str(step),
            "--steps", str(steps), "--tag", tag]
    if ckpt:
        argv += ["--ckpt", str(ckpt)]
    run_env = launcher_env(deadline)
    run_env.update(env or {})
    start = time.monotonic()
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=run_env, start_new_session=True)
    lines, fault_at = [], [None]
    readers = [threading.Thread(target=_read, args=(launcher.stdout, "out", lines, start, fault_at)),
               threading.Thread(target=_read, args=(launcher.stderr, "err", lines, start, fault_at))]
    for reader in readers:
        reader.start()
    if fault == "sigterm":
        trigger = (f"] step {sigterm_at or step} ", lambda: launcher.send_signal(signal.SIGTERM))
    if fault == "kill9":  # kill -9 from outside, when rank 0 reports step ``step``
        trigger = (f"[rank 0] step {step} ", lambda: _kill(_pid_of(lines, rank)))
    if trigger is not None:
        _when_line(launcher, lines, start, trigger, fault_at)
    try:
        code = launcher.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        code = launcher.wait()
        lines.append((time.monotonic() - start, "harness", f"launcher still running after {limit} s: killed"))
    ended = time.monotonic() - start
    for reader in readers:
        reader.join(timeout=5)
    leftovers = _tagged_processes(tag)
    for pid in leftovers:
        _kill(pid)
    if fault == "nojoin":  # the fault starts when the last rank has started
        fault_at[0] = max((t for t, _, line in lines if "] pid " in line), default=float("nan"))
    return FaultRun(code, fault_at[0] if fault_at[0] is not None else float("nan"), ended, leftovers, lines)


def _read(stream, name, lines, start, fault_at):
    for line in iter(stream.readline, ""):
        now = time.monotonic() - start
        lines.append((now, name, line.rstrip("\n")))
        if "injecting" in line and fault_at[0] is None:
            fault_at[0] = now


def last_checkpoint_step(ckpt):
    """Load the latest checkpoint under ``ckpt`` into a fresh model and optimizer (one process); its step."""
    import distopt
    from fault_train import build

    model, opt = build()
    return distopt.load_checkpoint(ckpt, model, opt)["step"]


def printed_checkpoints(run):
    """Steps of the checkpoints rank 0 reported as saved."""
    return [int(line.split()[-1]) for line in run.find("[rank 0] checkpoint ")]


def checkpoint_problem(run, ckpt, every=5):
    """``""`` when the latest checkpoint loads and is at least the last one reported, else why not.

    It may be newer than the last one printed: ranks can save once more between the
    fault and their end (mpirun takes a few tenths of a second to forward SIGTERM).
    """
    saved = printed_checkpoints(run)
    if not saved:
        return "no checkpoint was reported saved"
    try:
        step = last_checkpoint_step(ckpt)
    except Exception as e:  # the message is the finding
        return f"the last checkpoint does not load: {type(e).__name__}: {e}"
    if step < saved[-1] or step % every:
        return f"the last checkpoint is step {step}, but step {saved[-1]} was reported saved"
    return ""


def _when_line(launcher, lines, start, trigger, fault_at):
    """Call ``trigger[1]()`` once a line holding ``trigger[0]`` appears (e.g. SIGTERM as Ctrl-C)."""
    needle, action = trigger
    while launcher.poll() is None:
        if any(needle in line for _, _, line in list(lines)):
            fault_at[0] = time.monotonic() - start
            action()
            return
        time.sleep(0.02)


def _pid_of(lines, rank):
    found = [line.split()[-1] for _, _, line in list(lines) if line.startswith(f"[rank {rank}] pid ")]
    return int(found[0])


def _tagged_processes(tag):
    """Pids of live processes whose command line holds ``tag`` (ranks, mpirun, ssh)."""
    listing = subprocess.run(["ps", "-ax", "-o", "pid=,stat=,command="], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        pid, state, command = (line.split(None, 2) + ["", ""])[:3]
        if tag in command and not state.startswith("Z") and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
