"""``distopt doctor`` finds real problems and says how to fix them.

Other hosts are reached through ``DISTOPT_RSH`` (the launcher's ssh stand-in): a small
agent that runs the probe on this machine, fails like ssh for one host, and gives another
host a different MLX version. Every run has a hard timeout.
"""

import ctypes.util
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import launcher_env

from distopt.doctor import Check, check_mpi_libname, report

AGENT = textwrap.dedent(
    """
    import os, subprocess, sys
    argv = sys.argv[1:]
    while argv and argv[0].startswith("-"):
        if argv.pop(0) in ("-o", "-p", "-i", "-l"):
            argv.pop(0)
    host, command = argv[0], " ".join(argv[1:])
    if host == "down.example":
        sys.stderr.write("ssh: connect to host down.example port 22: Connection refused\\n")
        sys.exit(255)
    env = dict(os.environ)
    if host == "old.example":  # an older MLX installed there
        env["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "old") + os.pathsep + env.get("PYTHONPATH", "")
    sys.exit(subprocess.call(["sh", "-c", command], env=env))
    """
)


def doctor(*args, env=None, timeout=120):
    done = subprocess.run(
        [sys.executable, "-m", "distopt.cli", "doctor", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=launcher_env(env), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def lines_about(out, name):
    """The report line of check ``name`` and its fix line, if any."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[7:].startswith(name + ":"):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("       fix:") else ""
            return line, fix
    raise AssertionError(f"no line for {name!r} in:\n{out}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthy_setup_passes_and_measures_bandwidth(tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"ssh": "mac1.example", "ips": ["127.0.0.2"]}, {"ssh": "mac2.example", "ips": ["127.0.0.3"]}]')
    env = {"DISTOPT_RSH": f"{sys.executable} {agent}"}
    code, out, err = doctor("--hostfile", hostfile, "--port", free_port(), "--mib", "4", env=env)
    assert code == 0, out + err
    assert out.splitlines()[-1] == "all checks passed"
    names = ["mlx", "backends", "open mpi", "mpi4py", "MLX_MPI_LIBNAME", "ports", "host mac1.example", "host mac2.example"]
    for name in names + ["bandwidth ring", "bandwidth mpi", "bandwidth ring (hostfile)"]:
        line, _ = lines_about(out, name)
        assert line.startswith("[ok  ]"), line
    assert "ring yes, mpi yes" in lines_about(out, "backends")[0]
    for backend in ("ring", "mpi"):
        line = lines_about(out, f"bandwidth {backend}")[0]
        assert "all_sum of 4 MiB between 2 local ranks" in line and "GB/s bus" in line, line
    line = lines_about(out, "bandwidth ring (hostfile)")[0]
    assert f"all_sum of 4 MiB across the 2 hosts of {hostfile}" in line and "GB/s bus" in line, line


def test_hostfile_problems_are_named_with_fixes(tmp_path):
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    old = tmp_path / "old" / "mlx-0.0.1.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx\nVersion: 0.0.1\n")
    with socket.socket() as held:  # a ring port already taken on busy.example (this machine)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(
            '[{"ssh": "busy.example", "ips": ["127.0.0.1"]}, {"ssh": "good.example", "ips": ["127.0.0.2"]},'
            ' {"ssh": "down.example", "ips": ["127.0.0.3"]}, {"ssh": "old.example", "ips": ["127.0.0.4"]},'
            ' {"ssh": "wrongip.example", "ips": ["198.51.100.99"]}]'
        )
        env = {"DISTOPT_RSH": f"{sys.executable} {agent}", "MLX_MPI_LIBNAME": str(tmp_path / "missing" / "libmpi.so.40")}
        code, out, err = doctor("--hostfile", hostfile, "--port", port, "--mib", "4", env=env)
    assert code == 1, out + err

    assert lines_about(out, "hostfile")[0] == f"[ok  ] hostfile: {hostfile}: mlx format, 5 host(s), 5 slot(s)"
    line, fix = lines_about(out, "host good.example")
    assert line.startswith("[ok  ] host good.example: ssh ok; python 3.") and not fix, out
    line, fix = lines_about(out, "host busy.example")
    assert line == f"[FAIL] host busy.example: ring port 127.0.0.1:{port} in use", out
    assert "--port" in fix
    line, fix = lines_about(out, "host down.example")
    assert line == "[FAIL] host down.example: ssh failed: exit code 255: ssh: connect to host down.example port 22: Connection refused"
    assert "ssh-copy-id down.example" in fix
    line, fix = lines_about(out, "host old.example")
    import mlx.core as mx

    assert line == f"[FAIL] host old.example: mlx 0.0.1 (here {mx.__version__})", out
    assert "pip install -e ." in fix
    line, fix = lines_about(out, "host wrongip.example")
    assert line == "[FAIL] host wrongip.example: IP 198.51.100.99 not on any interface of the host", out
    assert "ipconfig getifaddr" in fix

    line, fix = lines_about(out, "MLX_MPI_LIBNAME")
    assert line == f"[FAIL] MLX_MPI_LIBNAME: {tmp_path / 'missing' / 'libmpi.so.40'} does not exist"
    assert fix.startswith("       fix: unset it, or export MLX_MPI_LIBNAME=")
    # The ring test still runs; the MPI one is skipped, since MPI cannot start.
    assert lines_about(out, "bandwidth ring")[0].startswith("[ok  ] bandwidth ring: all_sum of 4 MiB")
    assert "bandwidth mpi" not in out and "bandwidth ring (hostfile)" not in out  # hosts failed
    assert out.splitlines()[-1] == "5 problem(s): MLX_MPI_LIBNAME, host busy.example, host down.example, host old.example, host wrongip.example"


def test_mpi_libname_values():
    libmpi = Path(sys.prefix) / "lib" / "libmpi.so.40"
    if sys.platform == "darwin":
        libmpi = Path(sys.prefix) / "lib" / "libmpi.40.dylib"
    assert check_mpi_libname(str(libmpi), str(libmpi)).status == "ok"
    unset = check_mpi_libname(None, str(libmpi))
    assert (unset.status, unset.detail) == ("ok", f"unset; distopt.init and distopt launch set it to {libmpi}")
    if sys.platform != "darwin":  # the unversioned name is a linker script that dlopen refuses
        script = check_mpi_libname(str(libmpi.with_name("libmpi.so")), str(libmpi))
        assert script.status == "fail" and "linker script: use libmpi.so.40" in script.detail
    libc = ctypes.util.find_library("c")
    other = check_mpi_libname(libc, str(libmpi))
    assert (other.status, other.detail) == ("fail", f"{libc} is not Open MPI (MLX's MPI backend needs Open MPI)")


def test_report_format(capsys):
    checks = [Check("a", "ok", "fine"), Check("b", "warn", "slow", "do x"), Check("c", "fail", "broken", "do y")]
    assert report(checks) == 1
    assert capsys.readouterr().out == (
        "[ok  ] a: fine\n[WARN] b: slow\n       fix: do x\n[FAIL] c: broken\n       fix: do y\n1 problem(s): c\n"
    )
    assert report(checks[:2]) == 0
    assert capsys.readouterr().out.endswith("all checks passed (1 warning(s))\n")


def test_launch_check_hosts_script_runs_the_doctor():
    """``launch/check-hosts.sh HOSTFILE`` is ``distopt doctor --hostfile HOSTFILE``."""
    repo = Path(__file__).resolve().parents[1]
    script = repo / "launch" / "check-hosts.sh"
    env = launcher_env({"DISTOPT": str(Path(sys.executable).parent / "distopt")})
    done = subprocess.run([script, repo / "hostfiles" / "localhost.hosts", "--no-bandwidth"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ok  ] hostfile: " in done.stdout and done.stdout.rstrip().endswith("all checks passed")
    missing = subprocess.run([script], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "usage:" in missing.stderr
