"""Run scripts as real ranks through ``distopt launch``, for tests.

    from helpers import run_ranks, rank_lines

    code, out, err = run_ranks(2, "allsum.py", backend="mpi")
    assert code == 0, err
    assert rank_lines(out, 1) == [...]
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"


def run_ranks(n, script, *args, backend="ring", timeout=120, env=None, launch_args=()):
    """Run ``python script *args`` as ``n`` ranks; returns ``(returncode, stdout, stderr)``.

    ``script`` may be a path or a file name under ``tests/scripts``. ``env`` adds
    variables to the launcher (and so to local ranks); ``launch_args`` are extra
    ``distopt launch`` options such as ``["--hostfile", path]``. The launcher
    stops the ranks after ``timeout`` seconds (exit code 124); should it hang
    itself, it is killed and :class:`TimeoutError` raised with its output.
    """
    command = [
        sys.executable, "-m", "distopt.cli", "launch", "-n", str(n), "--backend", backend,
        "--timeout", str(timeout), *map(str, launch_args), str(_script_path(script)), *map(str, args),
    ]
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launcher_env(env)
    )
    try:
        out, err = launcher.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        out, err = _stop(launcher)
        raise TimeoutError(f"distopt launch did not finish in {timeout + 30} s\n{out}\n{err}") from None
    return launcher.returncode, out, err


def rank_lines(output, rank):
    """The lines of ``output`` printed by ``rank``, without their ``[rank k] `` prefix."""
    prefix = f"[rank {rank}] "
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def launcher_env(extra=None):
    """This environment plus ``extra``, with the repository first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _script_path(script):
    path = Path(script)
    if not path.is_absolute() and not path.exists():
        path = SCRIPTS / path
    return path.resolve()


def _stop(launcher):
    """SIGTERM (the launcher then stops its ranks), SIGKILL if that is not enough."""
    launcher.send_signal(signal.SIGTERM)
    try:
        return launcher.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        launcher.kill()
        return launcher.communicate()
