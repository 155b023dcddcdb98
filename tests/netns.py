"""Test hosts as Linux network namespaces joined by a bridge (for ``tests/test_netns.py``).

``TestHosts(count)`` creates ``count`` namespaces, each with one veth interface
``eth0`` plugged into a new bridge, with addresses 198.51.100.11, .12, ... (/24,
TEST-NET-2: documentation addresses, never routed). ``close()`` deletes everything;
the pytest fixture calls it even when a test fails. ``rsh`` is a stand-in for ssh
(``DISTOPT_RSH`` for ``distopt launch``, ``plm_ssh_agent`` for mpirun) that runs a
command inside the namespace of the host (name or IP) it is given.

Needs root and ``ip netns``; :func:`unavailable` says why not when it cannot run.
"""

import json
import os
import shutil
import subprocess
import tempfile
import uuid

SUBNET = "198.51.100"
BRIDGE_IP = f"{SUBNET}.1"  # the root namespace's address on the bridge (mpirun's daemon)

AGENT = """#!/bin/sh
# Stand-in for ssh: AGENT [ssh options] HOST COMMAND... runs COMMAND in HOST's namespace.
while [ $# -gt 0 ]; do
  case "$1" in -o|-p|-l|-i) shift 2 ;; -*) shift ;; *) break ;; esac
done
host=$1; shift
case "$host" in
{cases}
  *) echo "netns agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns; $*"
"""


def unavailable():
    """Why namespaces cannot be made here, or ``None`` when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"dtprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*argv, check=True):
    """Run a command; raise with its stderr when it fails and ``check``."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {done.stderr.strip()}")
    return done


class TestHosts:
    """``count`` namespaces on one bridge; ``names[i]`` has address ``ips[i]`` on ``eth0``."""

    __test__ = False  # not a pytest test class

    def __init__(self, count):
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"dtbr{tag}"
        self.names = [f"dt{tag}h{i}" for i in range(count)]
        self.veths = [f"dt{tag}v{i}" for i in range(count)]  # root-namespace ends
        self.ips = [f"{SUBNET}.{11 + i}" for i in range(count)]
        self.rsh = None  # path of the ssh stand-in, written by _create
        self._tmp = tempfile.mkdtemp(prefix="distopt-netns-")
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self):
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
        cases = "\n".join(f"  {name}|{ip}) ns={name} ;;" for name, ip in zip(self.names, self.ips))
        self.rsh = os.path.join(self._tmp, "netns-agent")
        with open(self.rsh, "w") as f:
            f.write(AGENT.replace("{cases}", cases))
        os.chmod(self.rsh, 0o755)
        for name, veth, ip in zip(self.names, self.veths, self.ips):
            sh("ip", "netns", "add", name)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p")
            sh("ip", "link", "set", veth + "p", "netns", name)
            self.run(name, "ip", "link", "set", veth + "p", "name", "eth0")
            self.run(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.run(name, "ip", "link", "set", "eth0", "up")
            self.run(name, "ip", "link", "set", "lo", "up")
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")

    def run(self, name, *argv, check=True):
        """Run a command inside namespace ``name``."""
        return sh("ip", "netns", "exec", name, *argv, check=check)

    def hostfile(self, path, slots=1, by_ip=False):
        """Write an MLX JSON hostfile: ssh name = namespace (or its IP), ips = its address."""
        hosts = [{"ssh": ip if by_ip else name, "ips": [ip], "slots": slots} for name, ip in zip(self.names, self.ips)]
        path.write_text(json.dumps({"hosts": hosts}))
        return path

    def cut(self, index):
        """Take host ``index``'s link down (as pulling its cable would)."""
        sh("ip", "link", "set", self.veths[index], "down")

    def shape(self, rate):
        """Limit every link to ``rate`` (e.g. ``"100mbit"``) both ways, with a token bucket."""
        for name, veth in zip(self.names, self.veths):
            for argv in (["tc"], ["ip", "netns", "exec", name, "tc"]):
                dev = veth if argv == ["tc"] else "eth0"
                sh(*argv, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                   "burst", "256kbit", "latency", "100ms")

    def unshape(self):
        for name, veth in zip(self.names, self.veths):
            sh("tc", "qdisc", "del", "dev", veth, "root", check=False)
            self.run(name, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def netem_error(self):
        """Why ``tc netem`` (latency) cannot be used here, or ``None``."""
        done = sh("tc", "qdisc", "add", "dev", self.veths[0], "root", "netem", "delay", "1ms", check=False)
        if done.returncode == 0:
            sh("tc", "qdisc", "del", "dev", self.veths[0], "root", check=False)
            return None
        return f"`tc qdisc add ... netem` fails: {done.stderr.strip()} (the kernel lacks sch_netem)"

    def pids(self):
        """Processes still running inside the namespaces, by namespace."""
        found = {name: sh("ip", "netns", "pids", name, check=False).stdout.split() for name in self.names}
        return {name: pids for name, pids in found.items() if pids}

    def close(self):
        """Kill what still runs inside, delete the namespaces (their veth pairs go with them) and the bridge."""
        for pids in self.pids().values():
            for pid in pids:
                sh("kill", "-9", pid, check=False)
        for name in self.names:
            sh("ip", "netns", "del", name, check=False)
        for veth in self.veths:
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def leftovers(self):
        """Names of this object's namespaces and links that still exist (should be none)."""
        namespaces = sh("ip", "netns", "list").stdout
        links = sh("ip", "-o", "link").stdout
        return [n for n in self.names if n in namespaces] + [x for x in [self.bridge, *self.veths] if x in links]
