"""``distopt launch`` with real ranks (no mocks), plus hostfile parsing.

Every subprocess has a hard timeout; the whole file runs in well under a minute.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import REPO, SCRIPTS, launcher_env, rank_lines, run_ranks

from distopt.cli import main
from distopt.hostfile import HostfileError, load_hostfile

# --- real ranks ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ring", "mpi"])
@pytest.mark.parametrize("n", [2, 3])
def test_all_sum_over_ranks(backend, n):
    code, out, err = run_ranks(
        n, "allsum.py", "--lr", "0.1", backend=backend, timeout=60,
        launch_args=["--env", "DISTOPT_TEST_VAR=hello"],
    )
    assert code == 0, err
    for rank in range(n):
        assert rank_lines(out, rank) == [
            f"rank={rank} size={n} backend={backend} sum={n * (n + 1) // 2} "
            "args=['--lr', '0.1'] var=hello"
        ]


def test_single_rank_runs_as_plain_process():
    code, out, err = run_ranks(1, "allsum.py", timeout=30)
    assert code == 0, err
    assert rank_lines(out, 0)[0].startswith("rank=0 size=1 backend=single sum=1")


def test_stderr_is_tagged_too(tmp_path):
    script = tmp_path / "warn.py"
    script.write_text("import sys\nprint('to stderr', file=sys.stderr)\n")
    code, out, err = run_ranks(2, script, timeout=30)
    assert code == 0, err
    assert rank_lines(err, 0) == rank_lines(err, 1) == ["to stderr"]
    assert out == ""


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_failing_rank_stops_the_others(backend, tmp_path):
    start = time.monotonic()
    code, out, err = run_ranks(3, "fail_or_sleep.py", tmp_path, 1, 3, backend=backend, timeout=60)
    assert time.monotonic() - start < 20
    assert code == 1, err
    assert "rank 1 exited with code 1" in err
    assert "RuntimeError: deliberate failure" in err
    assert_all_gone(tmp_path, 3)


def test_sigterm_to_launcher_stops_ranks(tmp_path):
    launcher = start_launcher(["-n", "2", SCRIPTS / "sleeper.py", tmp_path])
    wait_for_pids(tmp_path, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM; stopping all ranks" in err
    assert_all_gone(tmp_path, 2)


def test_sigint_to_launcher_stops_mpi_ranks(tmp_path):
    launcher = start_launcher(["-n", "2", "--backend", "mpi", SCRIPTS / "sleeper.py", tmp_path])
    wait_for_pids(tmp_path, 2, launcher)
    launcher.send_signal(signal.SIGINT)
    launcher.communicate(timeout=15)
    assert launcher.returncode == 128 + signal.SIGINT
    assert_all_gone(tmp_path, 2)


def test_timeout_escalates_to_sigkill(tmp_path):
    start = time.monotonic()
    code, out, err = run_ranks(
        2, "sleeper.py", tmp_path, "ignore-term", timeout=2, launch_args=["--grace", "1"]
    )
    assert code == 124
    assert "timed out after 2 s" in err
    assert time.monotonic() - start < 15
    assert_all_gone(tmp_path, 2)


def test_port_in_use_is_reported():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_ranks(2, "allsum.py", timeout=30, launch_args=["--port", port])
    assert code == 1
    assert f"port {port} on 127.0.0.1 is in use" in err


def test_unknown_backend_is_a_usage_error():
    result = CliRunner().invoke(main, ["launch", "-n", "2", "--backend", "carrier-pigeon", "x.py"])
    assert result.exit_code == 2
    assert "'carrier-pigeon' is not one of 'ring', 'mpi'" in result.output


def test_ranks_beyond_hostfile_slots_are_refused(tmp_path):
    hostfile = write(tmp_path / "hosts", "localhost slots=2\n")
    result = CliRunner().invoke(main, ["launch", "-n", "3", "--hostfile", hostfile, "x.py"])
    assert result.exit_code == 2
    assert "3 ranks requested but the 1 host(s) in this hostfile have only 2 slot(s)" in result.output


def test_malformed_hostfile_is_a_usage_error(tmp_path):
    hostfile = write(tmp_path / "hosts", "mac1 slots=lots\n")
    result = CliRunner().invoke(main, ["launch", "--hostfile", hostfile, "x.py"])
    assert result.exit_code == 2
    assert f"{hostfile}: line 1: slots must be a positive integer, got 'lots'" in result.output


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_local_openmpi_hostfile(backend, tmp_path):
    hostfile = write(tmp_path / "hosts", "# this machine\nlocalhost slots=2\n127.0.0.1 slots=2\n")
    code, out, err = run_ranks(3, "allsum.py", backend=backend, timeout=60,
                               launch_args=["--hostfile", hostfile])
    assert code == 0, err
    assert all(f"sum=6" in rank_lines(out, rank)[0] for rank in range(3))


def test_ring_format_hostfile_fixes_ports(tmp_path):
    ports = free_ports(2)
    hostfile = write(tmp_path / "ring.json", json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    code, out, err = run_ranks(2, "allsum.py", timeout=30, launch_args=["--hostfile", hostfile])
    assert code == 0, err
    assert "sum=3" in rank_lines(out, 1)[0]


def test_remote_ranks_go_through_ssh(tmp_path):
    env, log = fake_ssh(tmp_path)
    hostfile = write(tmp_path / "hosts.json", json.dumps({"backend": "ring", "hosts": [
        {"ssh": "mac-a.invalid", "ips": ["127.0.0.1"]},
        {"ssh": "mac-b.invalid", "ips": ["127.0.0.1"], "slots": 2},
    ]}))
    port = free_ports(1)[0]
    code, out, err = run_ranks(3, "allsum.py", timeout=60, env=env,
                               launch_args=["--hostfile", hostfile, "--port", port])
    assert code == 0, err
    assert all(f"sum=6" in rank_lines(out, rank)[0] for rank in range(3))
    assert sorted(log.read_text().split()) == ["mac-a.invalid", "mac-b.invalid", "mac-b.invalid"]


def test_loopback_ring_with_remote_hosts_is_refused(tmp_path):
    hostfile = write(tmp_path / "hosts", "localhost\n198.51.100.12\n")
    result = CliRunner().invoke(main, ["launch", "--hostfile", hostfile, str(SCRIPTS / "allsum.py")])
    assert result.exit_code == 1
    assert "rank 0 would listen on 127.0.0.1, which the other hosts cannot reach" in result.output


def test_stopping_ssh_stops_remote_ranks(tmp_path):
    env, _ = fake_ssh(tmp_path)
    hosts = [{"ssh": "mac-a.invalid", "ips": ["127.0.0.1"]}, {"ssh": "mac-b.invalid", "ips": ["127.0.0.1"]}]
    hostfile = write(tmp_path / "hosts.json", json.dumps(hosts))
    piddir = tmp_path / "pids"
    piddir.mkdir()
    args = ["--hostfile", hostfile, "--port", free_ports(1)[0], SCRIPTS / "sleeper.py", piddir]
    launcher = start_launcher(args, env)
    wait_for_pids(piddir, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=15)
    assert launcher.returncode == 128 + signal.SIGTERM
    assert_all_gone(piddir, 2)


def fake_mpirun(tmp_path, version_line, before=""):
    """A ``--python`` whose folder holds an mpirun that prints ``version_line`` for
    ``--version``; run otherwise it runs the shell lines ``before``, records its argv and
    prints one line tagged as Open MPI 4.x tags (``[1,0]<stdout>:`` with no space)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    argv_file = tmp_path / "argv.txt"
    mpirun = bin_dir / "mpirun"
    mpirun.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{version_line}"; exit 0; fi\n'
        + before +
        f'for a in "$@"; do echo "$a"; done > {argv_file}\n'
        "echo '[1,0]<stdout>:hello from mpirun'\n"
    )
    mpirun.chmod(0o755)
    return bin_dir / "python", argv_file


def launch_mpi_with(python):
    """``distopt launch --backend mpi -n 2 --python PYTHON allsum.py``, finished."""
    argv = [sys.executable, "-m", "distopt.cli", "launch", "--backend", "mpi", "-n", "2", "--python", str(python), str(SCRIPTS / "allsum.py")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=launcher_env())


def test_open_mpi_4_gets_its_own_flags(tmp_path):
    python, argv_file = fake_mpirun(tmp_path, "mpirun (Open MPI) 4.1.6")
    proc = launch_mpi_with(python)
    assert proc.returncode == 0, proc.stderr
    argv = argv_file.read_text().split("\n")
    assert "--tag-output" in argv and "--output" not in argv
    assert proc.stdout == "[rank 0] hello from mpirun\n"


def pmix_failure(tmp_path, times):
    """Shell lines for :func:`fake_mpirun`: the first ``times`` runs fail as Open MPI 5's
    mpirun does when its PMIx server does not start (exit 213, before any rank)."""
    runs = tmp_path / "runs"
    return (
        f"echo run >> {runs}\n"
        f'if [ "$(wc -l < {runs})" -le {times} ]; then\n'
        "  echo \"The PMIx server's listener thread failed to start. We cannot\" >&2\n"
        "  echo 'continue.' >&2; exit 213\n"
        "fi\n"
    ), runs


def test_mpirun_that_fails_to_start_its_pmix_server_is_started_once_more(tmp_path):
    before, runs = pmix_failure(tmp_path, times=1)
    python, argv_file = fake_mpirun(tmp_path, "mpirun (Open MPI) 5.0.11", before)
    proc = launch_mpi_with(python)
    assert proc.returncode == 0, proc.stderr
    assert "distopt launch: mpirun's PMIx server did not start (an Open MPI start-up failure; no rank ran); starting mpirun once more" in proc.stderr
    assert proc.stdout == "[rank 0] hello from mpirun\n"
    assert runs.read_text() == "run\nrun\n"


def test_mpirun_whose_pmix_server_fails_twice_is_not_retried_again(tmp_path):
    before, runs = pmix_failure(tmp_path, times=5)
    python, argv_file = fake_mpirun(tmp_path, "mpirun (Open MPI) 5.0.11", before)
    proc = launch_mpi_with(python)
    assert proc.returncode == 213
    assert proc.stderr.count("starting mpirun once more") == 1
    assert proc.stderr.rstrip().endswith("distopt launch: mpirun exited with code 213")
    assert runs.read_text() == "run\nrun\n" and not argv_file.exists()


def test_mpirun_of_another_mpi_is_refused(tmp_path):
    python, argv_file = fake_mpirun(tmp_path, "HYDRA build details:")
    proc = launch_mpi_with(python)
    assert proc.returncode == 1
    assert f"{python.parent / 'mpirun'} is not Open MPI's mpirun (its --version says 'HYDRA build details:'); MLX's MPI backend needs Open MPI" in proc.stderr
    assert not argv_file.exists()  # no rank started


# --- hostfile parsing ------------------------------------------------------------


def test_openmpi_hostfile(tmp_path):
    hostfile = load_hostfile(write(tmp_path / "h", "# macs\nmac1 slots=2  # big one\n\n198.51.100.12\nmac1\n"))
    assert hostfile.format == "openmpi"
    assert [(h.ssh, h.ips, h.slots) for h in hostfile.hosts] == [
        ("mac1", [], 3), ("198.51.100.12", ["198.51.100.12"], 1)
    ]
    assert [h.ssh for h in hostfile.place(4)] == ["mac1"] * 3 + ["198.51.100.12"]


def test_mlx_json_hostfile_list(tmp_path):
    hosts = [{"ssh": "mac1", "ips": ["198.51.100.11"]}, "mac2", {"ssh": "198.51.100.13", "slots": 2}]
    hostfile = load_hostfile(write(tmp_path / "h.json", json.dumps(hosts)))
    assert hostfile.format == "mlx"
    assert [(h.ssh, h.ips, h.slots) for h in hostfile.hosts] == [
        ("mac1", ["198.51.100.11"], 1), ("mac2", [], 1), ("198.51.100.13", ["198.51.100.13"], 2)
    ]


def test_mlx_json_hostfile_dict(tmp_path):
    data = {"backend": "mpi", "envs": ["OMP_NUM_THREADS=1"], "hosts": [{"ssh": "mac1", "ips": []}]}
    hostfile = load_hostfile(write(tmp_path / "h.json", json.dumps(data)))
    assert (hostfile.backend, hostfile.envs, hostfile.slots) == ("mpi", ["OMP_NUM_THREADS=1"], 1)


def test_ring_hostfile(tmp_path):
    data = [["198.51.100.11:5000", "198.51.100.21:5001"], ["198.51.100.12:5000"]]
    hostfile = load_hostfile(write(tmp_path / "ring.json", json.dumps(data)))
    assert hostfile.format == "ring"
    assert [h.endpoints for h in hostfile.hosts] == data
    assert hostfile.hosts[0].ips == ["198.51.100.11", "198.51.100.21"]


@pytest.mark.parametrize("text, problem", [
    ("mac1 slots=two\n", "line 1: slots must be a positive integer, got 'two'"),
    ("mac1 slots=0\n", "line 1: slots must be a positive integer, got '0'"),
    ("mac1\nmac2 cpus=4\n", "line 2: expected 'host slots=K', got 'mac2 cpus=4'"),
    ("# nothing here\n", "the hostfile lists no hosts"),
    ('[{"ssh": "mac1"},', "not valid JSON"),
    ('{"backend": "ring"}', 'needs a "hosts" list'),
    ('[{"ips": ["198.51.100.11"]}]', 'host 0: missing "ssh" host name'),
    ('[{"ssh": "mac1", "ips": ["mac1.local"]}]', "host 0: 'mac1.local' is not an IP address"),
    ('[{"ssh": "mac1", "slots": -1}]', "host 0: slots must be a positive integer"),
    ('[["198.51.100.11:5000"], ["198.51.100.12"]]', "rank 1: expected \"ip:port\""),
    ('[["198.51.100.11:5000"], []]', "rank 1: empty list"),
    ('[["198.51.100.11:99999"]]', "rank 0: port 99999 out of range"),
    ('{"hosts": ["mac1"], "envs": ["NOEQUALS"]}', '"envs" must be a list of "KEY=VALUE"'),
])
def test_malformed_hostfiles_name_file_and_problem(tmp_path, text, problem):
    path = write(tmp_path / "bad", text)
    with pytest.raises(HostfileError) as error:
        load_hostfile(path)
    assert str(error.value).startswith(f"{path}: ")
    assert problem in str(error.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile"):
        load_hostfile(tmp_path / "nope")


def test_too_many_ranks_for_slots(tmp_path):
    hostfile = load_hostfile(write(tmp_path / "h", "mac1 slots=2\nmac2 slots=2\n"))
    with pytest.raises(HostfileError, match="5 ranks requested but the 2 host"):
        hostfile.place(5)


def test_example_hostfiles_parse():
    examples = sorted((REPO / "hostfiles").iterdir())
    assert examples
    for path in examples:
        if path.suffix != ".md":
            assert load_hostfile(path).slots >= 2, path


# --- helpers ---------------------------------------------------------------------


def write(path, text):
    path.write_text(text)
    return path


def free_ports(count):
    """``count`` consecutive-free ports; each port is free when checked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def fake_ssh(tmp_path):
    """An ``ssh`` on PATH that runs the command here; returns (env, log path)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    ssh = folder / "ssh"
    ssh.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SCRIPTS / "fake_ssh.py"}" "$@"\n')
    ssh.chmod(0o755)
    log = tmp_path / "ssh.log"
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "FAKE_SSH_LOG": str(log)}, log


def start_launcher(args, env=None):
    command = [sys.executable, "-m", "distopt.cli", "launch", "--timeout", "60", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=launcher_env(env))


def wait_for_pids(piddir, n, launcher, timeout=15):
    deadline = time.monotonic() + timeout
    while len(list(Path(piddir).glob("*.pid"))) < n:
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            pytest.fail(f"ranks did not start: {launcher.communicate(timeout=15)}")
        time.sleep(0.05)


def assert_all_gone(piddir, n, timeout=5):
    """Every rank whose pid is in ``piddir`` has exited (zombies count as gone)."""
    pids = [int(p.read_text()) for p in Path(piddir).glob("*.pid")]
    assert len(pids) == n
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def alive(pid):
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
