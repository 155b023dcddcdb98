"""Read the hostfiles ``distopt launch`` accepts and place ranks on their hosts.

Three formats, told apart by their content:

* Open MPI: one ``host [slots=K]`` line per host; ``#`` starts a comment.
* MLX launcher JSON: a list of hosts, or ``{"backend": ..., "envs": [...],
  "hosts": [...]}``. A host is ``{"ssh": "mac1", "ips": ["198.51.100.11"]}``
  (``"slots": K`` optional, default 1) or just the string ``"mac1"``.
* MLX ring JSON: one list of ``"ip:port"`` strings per rank.

Every problem raises :class:`HostfileError` naming the file and what is wrong.
"""

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("openmpi", "mlx", "ring")


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message names the file and the problem."""


@dataclass
class Host:
    """One machine: the name to ssh to, its IPs for the ring and its rank slots.

    ``endpoints`` is set only by the ring format, which fixes each rank's
    ``ip:port`` addresses itself.
    """

    ssh: str
    ips: list = field(default_factory=list)
    slots: int = 1
    endpoints: list = field(default_factory=list)


@dataclass
class Hostfile:
    """A parsed hostfile: its hosts plus the optional backend and ``K=V`` envs."""

    path: str
    format: str
    hosts: list
    backend: str = None
    envs: list = field(default_factory=list)

    @property
    def slots(self):
        """Total number of ranks the hosts can take."""
        return sum(host.slots for host in self.hosts)

    def place(self, n):
        """The host of each of ``n`` ranks, filling each host's slots in order."""
        if n > self.slots:
            raise HostfileError(
                f"{self.path}: {n} ranks requested but the {len(self.hosts)} host(s) "
                f"in this hostfile have only {self.slots} slot(s)"
            )
        placed = [host for host in self.hosts for _ in range(host.slots)]
        return placed[:n]


def load_hostfile(path):
    """Parse the hostfile at ``path`` in whichever of the three formats it uses."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise HostfileError(f"{path}: cannot read hostfile ({e.strerror})") from None
    if text.lstrip().startswith(("[", "{")):
        hostfile = _parse_json(path, text)
    else:
        hostfile = Hostfile(str(path), "openmpi", _parse_openmpi(path, text))
    if not hostfile.hosts:
        raise HostfileError(f"{path}: the hostfile lists no hosts")
    return hostfile


def _parse_openmpi(path, text):
    """Hosts of an Open MPI hostfile; repeated hosts add up their slots."""
    hosts = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = 1
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key not in ("slots", "max_slots", "max-slots") or not value:
                raise HostfileError(
                    f"{path}: line {number}: expected 'host slots=K', got {line.strip()!r}"
                )
            count = _positive_int(value, f"{path}: line {number}: {key}")
            slots = count if key == "slots" else slots
        name = words[0]
        if name in hosts:
            hosts[name].slots += slots
        else:
            hosts[name] = Host(name, _ips_of_name(name), slots)
    return list(hosts.values())


def _parse_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HostfileError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
    if isinstance(data, dict):
        return _parse_mlx_dict(path, data)
    if data and all(isinstance(entry, list) for entry in data):
        hosts = [_ring_host(path, rank, entry) for rank, entry in enumerate(data)]
        return Hostfile(str(path), "ring", hosts)
    return Hostfile(str(path), "mlx", _mlx_hosts(path, data))


def _parse_mlx_dict(path, data):
    if "hosts" not in data:
        raise HostfileError(f"{path}: a JSON object hostfile needs a \"hosts\" list")
    backend = data.get("backend") or None
    if backend is not None and not isinstance(backend, str):
        raise HostfileError(f"{path}: \"backend\" must be a string")
    envs = data.get("envs", [])
    if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
        raise HostfileError(f"{path}: \"envs\" must be a list of \"KEY=VALUE\" strings")
    return Hostfile(str(path), "mlx", _mlx_hosts(path, data["hosts"]), backend, envs)


def _mlx_hosts(path, entries):
    if not isinstance(entries, list):
        raise HostfileError(f"{path}: \"hosts\" must be a list")
    return [_mlx_host(path, index, entry) for index, entry in enumerate(entries)]


def _mlx_host(path, index, entry):
    where = f"{path}: host {index}"
    if isinstance(entry, str) and entry:
        return Host(entry, _ips_of_name(entry))
    if not isinstance(entry, dict):
        raise HostfileError(f"{where}: expected {{\"ssh\": ..., \"ips\": [...]}} or a name, got {entry!r}")
    ssh = entry.get("ssh")
    if not isinstance(ssh, str) or not ssh:
        raise HostfileError(f"{where}: missing \"ssh\" host name")
    ips = entry.get("ips") or _ips_of_name(ssh)
    if not isinstance(ips, list):
        raise HostfileError(f"{where}: \"ips\" must be a list of IP addresses")
    for ip in ips:
        _check_ip(ip, where)
    slots = _positive_int(entry.get("slots", 1), f"{where}: slots")
    return Host(ssh, list(ips), slots)


def _ring_host(path, rank, entry):
    where = f"{path}: rank {rank}"
    if not entry:
        raise HostfileError(f"{where}: empty list of \"ip:port\" addresses")
    ips = []
    for address in entry:
        ip, port = split_address(address, where)
        _check_ip(ip, where)
        if not 0 < port < 65536:
            raise HostfileError(f"{where}: port {port} out of range in {address!r}")
        ips.append(ip)
    return Host(ips[0], ips, 1, list(entry))


def split_address(address, where="address"):
    """``("1.2.3.4", 5000)`` from ``"1.2.3.4:5000"`` (``"[::1]:5000"`` for IPv6)."""
    if not isinstance(address, str) or ":" not in address:
        raise HostfileError(f"{where}: expected \"ip:port\", got {address!r}")
    ip, _, port = address.rpartition(":")
    if not port.isdigit():
        raise HostfileError(f"{where}: expected \"ip:port\", got {address!r}")
    return ip.strip("[]"), int(port)


def _check_ip(ip, where):
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise HostfileError(f"{where}: {ip!r} is not an IP address") from None


def _ips_of_name(name):
    """``[name]`` when the host name is an IP literal, else ``[]``."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return []
    return [name]


def _positive_int(value, what):
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or count < 1 or str(count) != str(value).strip():
        raise HostfileError(f"{what} must be a positive integer, got {value!r}")
    return count
