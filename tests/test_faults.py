"""Faults in real multi-rank jobs end promptly, with a non-zero code and a message naming the cause.

Each case launches ``tests/scripts/fault_train.py`` through ``distopt launch`` with a
watchdog deadline of 5 s, injects one fault, and checks that the launcher exits
non-zero within deadline + 10 s of the fault, that no process of the job is left,
what the output says, and that the last checkpoint saved (every 5 steps) loads.
``benchmarks/stress_faults.py`` runs every case many times.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from fault_harness import checkpoint_problem, printed_checkpoints, run_fault  # noqa: E402

DEADLINE = 5.0

# (backend, n, fault, rank, step, expected exit code, texts the output must hold, env)
STREAMED = {"DISTOPT_TCP_WAYS": "2"}  # the tcp ring streamed both ways (see distopt.tcp)
CASES = [
    ("ring", 2, "kill9", 1, 8, 137, ["rank 1 was killed by SIGKILL; stopping the other ranks"], {}),
    ("ring", 2, "kill9", 1, 8, 137, ["rank 1 was killed by SIGKILL; stopping the other ranks"], STREAMED),
    ("mpi", 4, "kill9", 2, 8, None, ["prterun noticed that process rank 2", "signal 9 (Killed)"], {}),
    ("mpi", 2, "raise", 1, 8, None, ["RuntimeError: injected fault at step 8"], {}),
    ("ring", 4, "hang", 2, 8, 124, ["watchdog: no progress", "step 8 did not complete", "exited with code 124"], {}),
    ("ring", 4, "hang", 2, 8, 124, ["watchdog: no progress", "step 8 did not complete", "exited with code 124"], STREAMED),
    ("ring", 2, "nojoin", 1, 0, 137, ["init of the ring backend did not complete within 5 s"], {}),
    ("mpi", 2, "sigterm", 0, 8, 143, ["received SIGTERM; stopping all ranks"], {}),
]


@pytest.mark.parametrize(
    "backend,n,fault,rank,step,code,texts,env", CASES, ids=[f"{c[0]}-n{c[1]}-{c[2]}{'-streamed' if c[7] else ''}" for c in CASES]
)
def test_fault_ends_the_job(backend, n, fault, rank, step, code, texts, env, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = run_fault(backend, n, fault, rank, step, deadline=DEADLINE, steps=40, ckpt=ckpt, limit=120, env=env)
    assert run.code != 0, run.text
    if code is not None:
        assert run.code == code, run.text
    assert run.leftovers == [], f"processes left behind: {run.leftovers}\n{run.text}"
    assert run.fault_at == run.fault_at, f"the fault was never reached\n{run.text}"  # not NaN
    assert run.gone_after <= DEADLINE + 10, f"took {run.gone_after:.1f} s after the fault\n{run.text}"
    for text in texts:
        assert run.find(text), f"{text!r} not in the output\n{run.text}"
    assert not run.find("] done"), run.text
    if fault == "nojoin":
        assert printed_checkpoints(run) == [] and not ckpt.exists()
    else:  # the last checkpoint saved before the end loads
        assert checkpoint_problem(run, ckpt) == "", run.text


def test_watchdog_ends_a_blocked_main_thread_and_names_the_step():
    """In-process: the main thread blocked in os.read (restarted after each ping) past the deadline."""
    import io
    import os

    from distopt.watchdog import EXIT_CODE, Watchdog

    read, write = os.pipe()
    codes = []

    def exit(code):  # instead of os._exit: record, then unblock the main thread
        codes.append(code)
        os.write(write, b"x")

    out = io.StringIO()
    dog = Watchdog(timeout=0.5, heartbeat=0, stream=out, exit=exit)
    dog.rank, dog.size = 3, 4
    dog.start()
    try:
        for _ in range(3):
            dog.step_started()
        assert os.read(read, 1) == b"x"  # blocks until the watchdog fires
    finally:
        dog.stop()
        os.close(read)
        os.close(write)
    assert codes == [EXIT_CODE]
    message = out.getvalue()
    assert "distopt: rank 3 of 4 watchdog: no progress for" in message
    assert "step 3 did not complete" in message
    assert "test_faults.py" in message and "os.read(read, 1)" in message


def test_deadline_adapts_to_ten_times_the_median_step():
    from distopt.watchdog import Watchdog

    dog = Watchdog(timeout=2.0, heartbeat=0)
    assert dog.deadline == 2.0
    dog.intervals.extend([0.1, 0.15, 0.12])
    assert dog.deadline == 2.0  # 10 x median 0.12 s is below the timeout
    dog.intervals.extend([0.3, 0.3, 0.3, 0.3])
    assert dog.deadline == pytest.approx(3.0)  # 10 x median 0.3 s


def test_heartbeat_lines():
    import io
    import time

    from distopt.watchdog import Watchdog

    out = io.StringIO()
    dog = Watchdog(timeout=30, heartbeat=0.2, stream=out)
    dog.rank, dog.size = 1, 2
    dog.start()
    try:
        dog.step_started()
        time.sleep(0.05)
        dog.step_started()
        time.sleep(0.7)
    finally:
        dog.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and not dog.fired
    assert lines[0].startswith("distopt: rank 1 of 2 alive: step 2, median step 0.0")
    assert lines[0].endswith(" s, deadline 30 s")
