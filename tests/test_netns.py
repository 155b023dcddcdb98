"""Multi-host runs: ranks in separate network namespaces (198.51.100.0/24) joined by a bridge.

``distopt launch --hostfile`` starts each rank inside its host's namespace through
``DISTOPT_RSH`` (a stand-in for ssh, see ``tests/netns.py``); the ranks talk only
over the veth links. Skipped, with the reason, without root or ``ip netns``.
"""

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from fault_harness import launcher_env, run_fault  # noqa: E402
from netns import TestHosts, sh, unavailable  # noqa: E402

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")
DEADLINE = 5.0
STEPS_SCRIPT = Path(__file__).parent / "scripts" / "fault_netsteps.py"


@pytest.fixture
def make_hosts():
    """``make_hosts(count)`` -> TestHosts; all are deleted after the test, pass or fail."""
    made = []

    def make(count):
        made.append(TestHosts(count))
        return made[-1]

    yield make
    for hosts in made:
        hosts.close()
    assert [h.leftovers() for h in made] == [[] for _ in made]


def link_bytes(hosts):
    """Bytes sent + received so far on each host's link (root-namespace end of its veth)."""
    out = []
    for veth in hosts.veths:
        stats = Path(f"/sys/class/net/{veth}/statistics")
        out.append(int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text()))
    return out


def test_ring_trains_across_namespaces_over_the_links(make_hosts, tmp_path):
    hosts = make_hosts(3)
    before = link_bytes(hosts)
    run = run_fault("ring", 3, "none", 0, 0, deadline=DEADLINE, steps=10,
                    launch_args=["--hostfile", hosts.hostfile(tmp_path / "hosts.json")],
                    env={"DISTOPT_RSH": hosts.rsh}, limit=90)
    assert run.code == 0, run.text
    assert len(run.find("] done")) == 3, run.text
    for rank in range(3):
        assert run.find(f"[rank {rank}] step 10 "), run.text
    moved = [b - a for a, b in zip(before, link_bytes(hosts))]
    params = 16 * 64 + 64 + 64 * 4 + 4
    assert all(m > 10 * params * 4 for m in moved), f"bytes over each link: {moved}"


def test_ring_listens_on_hostfile_addresses_and_init_times_out(make_hosts, tmp_path):
    """The last rank never joins: the others listen (on their hostfile address only) and time out."""
    hosts = make_hosts(3)
    listening = {}

    def look():  # until both waiting ranks listen, or the job is over
        end = time.monotonic() + 30
        while time.monotonic() < end and not all(listening.get(name) for name in hosts.names[:2]):
            for name in hosts.names[:2]:
                listening[name] = listening.get(name) or hosts.run(name, "ss", "-Hltn").stdout.split()
            time.sleep(0.2)

    looker = threading.Thread(target=look)
    looker.start()
    run = run_fault("ring", 3, "nojoin", 2, 0, deadline=DEADLINE,
                    launch_args=["--hostfile", hosts.hostfile(tmp_path / "hosts.json")],
                    env={"DISTOPT_RSH": hosts.rsh}, limit=90)
    looker.join()
    assert run.code != 0 and run.leftovers == [], run.text
    assert run.find("init of the ring backend did not complete within 5 s"), run.text
    assert run.gone_after <= DEADLINE + 10, run.text
    for name, ip in zip(hosts.names[:2], hosts.ips[:2]):
        local = [word for word in listening[name] if re.fullmatch(r"[\d.*:\[\]]+:\d+", word)]
        assert any(word.startswith(ip + ":") for word in local), (name, listening[name])
        assert not any(word.startswith(("0.0.0.0:", "*:", "[::]:")) for word in local), (name, listening[name])


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_cut_link_mid_run_fails_within_the_deadline(make_hosts, tmp_path, backend):
    """Host 1's link goes down at step 5: the watchdog names the stuck step, the job ends.

    mpirun cannot reach its daemon on the cut host to stop it, so it hangs after
    reporting the failure; ``distopt launch`` then kills it. That daemon stays on the
    cut host (as it would on a real Mac until its connection times out): printed here.
    """
    hosts = make_hosts(3)
    hostfile = hosts.hostfile(tmp_path / "hosts.json", by_ip=backend == "mpi")
    run = run_fault(backend, 3, "none", 0, 0, deadline=DEADLINE, steps=300, launch_args=["--hostfile", hostfile],
                    env={"DISTOPT_RSH": hosts.rsh}, trigger=("] step 5 ", lambda: hosts.cut(1)), limit=90)
    assert run.code != 0 and run.leftovers == [], run.text
    assert run.gone_after <= DEADLINE + 10, f"{run.gone_after:.1f} s\n{run.text}"
    assert run.find("watchdog: no progress"), run.text
    assert run.find("did not complete (its reduce-scatter / all-gather never finished)"), run.text
    assert not run.find("] done"), run.text
    left = hosts.pids()
    print(f"\n{backend}: ended {run.gone_after:.1f} s after the cut, code {run.code}; "
          f"processes left in the namespaces: {left or 'none'}")
    if backend == "ring":
        assert run.code == 124 and left == {}, run.text


def steps_table(hosts, hostfile, sizes):
    """Rank 0's ``params bytes_per_step median_step_s`` lines for each size."""
    env = launcher_env(30)
    env["DISTOPT_RSH"] = hosts.rsh
    argv = [sys.executable, "-m", "distopt.cli", "launch", "--backend", "ring", "--hostfile", str(hostfile),
            str(STEPS_SCRIPT), *map(str, sizes), "--steps", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"params (\d+) bytes_per_step (\d+) median_step_s ([\d.]+)", done.stdout)
    assert len(rows) == len(sizes), done.stdout
    return [(int(p), int(b), float(t)) for p, b, t in rows]


def test_shaped_links_step_time_against_bytes(make_hosts, tmp_path):
    """tc token-bucket shaping stands in for slow Ethernet vs Thunderbolt; prints, asserts no timing."""
    hosts = make_hosts(2)
    hostfile = hosts.hostfile(tmp_path / "hosts.json")
    sizes = [65536, 524288]
    print("\nlink rate   params    bytes/step  median step (s)")
    results = {}
    for rate in [None, "1gbit", "100mbit"]:
        if rate:
            hosts.shape(rate)
        results[rate] = steps_table(hosts, hostfile, sizes)
        for params, sent, seconds in results[rate]:
            print(f"{rate or 'unshaped':10} {params:8d} {sent:12d}  {seconds:.4f}")
    hosts.unshape()
    # the same bytes move whatever the rate: only time depends on the link
    assert len({tuple(b for _, b, _ in rows) for rows in results.values()}) == 1, results


def test_netem_latency(make_hosts):
    hosts = make_hosts(2)
    reason = hosts.netem_error()
    if reason:
        pytest.skip(reason)
    hosts.run(hosts.names[0], "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "5ms")
    done = hosts.run(hosts.names[0], sys.executable, "-c",
                     "import socket,time;t=time.time();s=socket.socket();s.settimeout(2)\n"
                     f"try: s.connect(('{hosts.ips[1]}', 9))\nexcept OSError: pass\nprint(time.time()-t)")
    assert float(done.stdout) >= 0.005


def test_mpirun_across_namespaces(make_hosts, tmp_path):
    """mpirun starts its daemons through the same stand-in (``--prtemca plm_ssh_agent``)."""
    hosts = make_hosts(2)
    before = link_bytes(hosts)
    # No fault here: the watchdog deadline only has to outlast a slow start of Open MPI's
    # daemons in the namespaces while the rest of the suite loads both cores. (This test
    # failed once in a full-suite run with 20 s; the output was not kept, so a too-short
    # deadline is a guess at the cause, not a finding.)
    run = run_fault("mpi", 2, "none", 0, 0, deadline=60, steps=10,
                    launch_args=["--hostfile", hosts.hostfile(tmp_path / "hosts.json", by_ip=True)],
                    env={"DISTOPT_RSH": hosts.rsh}, limit=150)
    assert run.code == 0, run.text
    assert len(run.find("] done")) == 2, run.text
    moved = [b - a for a, b in zip(before, link_bytes(hosts))]
    params = 16 * 64 + 64 + 64 * 4 + 4
    assert all(m > 10 * params * 4 for m in moved), f"bytes over each link: {moved}"
