"""Bad input gets a clear error naming the problem, before anything can hang.

Launcher input is checked through the real ``distopt launch`` command (in process,
no ranks start). Training input is checked in real multi-rank jobs: one job runs
every case of ``tests/scripts/fault_bad_input.py`` on every rank, and one job gives
a single rank a wrong gradient.
"""

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

import distopt
from distopt.cli import main

from helpers import rank_lines, run_ranks

ALLSUM = str(Path(__file__).parent / "scripts" / "allsum.py")


def launch(*args):
    result = CliRunner().invoke(main, ["launch", *map(str, args)])
    return result.exit_code, result.output


def test_malformed_hostfiles(tmp_path):
    cases = {
        "slots.hosts": ("mac1 slots=two\n", "line 1: slots must be a positive integer, got 'two'"),
        "words.hosts": ("mac1 cpus=2\n", "line 1: expected 'host slots=K', got 'mac1 cpus=2'"),
        "broken.json": ('[["127.0.0.1:5000"],', "not valid JSON"),
        "ip.json": ('{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.300"]}]}', "'10.0.0.300' is not an IP address"),
        "port.json": ('[["127.0.0.1:70000"]]', "port 70000 out of range"),
        "empty.hosts": ("# nothing\n", "the hostfile lists no hosts"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, output = launch("-n", 1, "--hostfile", path, ALLSUM)
        assert code == 2 and message in output and name in output, (name, output)


def test_unknown_host(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": [{"ssh": "no-such-host.invalid"}, {"ssh": "other.invalid"}]}))
    code, output = launch("-n", 2, "--hostfile", path, ALLSUM)
    assert code == 1
    assert "cannot resolve host 'no-such-host.invalid' for the ring backend" in output


def test_port_in_use():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, output = launch("-n", 2, "--port", port, ALLSUM)
    assert code == 1 and f"port {port} on 127.0.0.1 is in use" in output


def test_more_ranks_than_slots(tmp_path):
    path = tmp_path / "two.hosts"
    path.write_text("127.0.0.1 slots=2\n")
    code, output = launch("-n", 3, "--hostfile", path, ALLSUM)
    assert code == 2 and "3 ranks requested but the 1 host(s) in this hostfile have only 2 slot(s)" in output


def test_wrong_backend_name(monkeypatch):
    code, output = launch("-n", 2, "--backend", "gloo", ALLSUM)
    assert code == 2 and "'gloo' is not one of 'ring', 'mpi'" in output
    with pytest.raises(ValueError, match="Unknown backend 'gloo'; expected one of auto, mpi, ring, nccl, jaccl"):
        distopt.init(backend="gloo")
    monkeypatch.setenv("DISTOPT_BACKEND", "rnig")
    with pytest.raises(ValueError, match="DISTOPT_BACKEND='rnig' is not a backend; expected one of mpi, ring, nccl, jaccl"):
        distopt.init()


def test_learning_rate_nan_or_negative_single_process():
    for bad, shown in ((float("nan"), "nan"), (-1e-3, "-0.001"), (float("inf"), "inf")):
        with pytest.raises(ValueError, match=f"The learning rate must be a finite number >= 0, got {shown}"):
            distopt.Adamax(learning_rate=bad)
    opt = distopt.SGD(learning_rate=0.1)
    with pytest.raises(ValueError, match="got nan"):
        opt.learning_rate = float("nan")
    assert opt.learning_rate.item() == pytest.approx(0.1)


EXPECTED = {
    "differing_shapes": "DistoptError: Rank 1 differs from rank 0: parameter 'weight' is [6, 4] float32 there "
                        "but [8, 4] float32 on rank 0. All ranks must build the same model and optimizer.",
    "differing_settings": "DistoptError: Rank 1 differs from rank 0: optimizer setting 'betas' is [0.9, 0.99] "
                          "there but [0.9, 0.999] on rank 0. All ranks must build the same model and optimizer.",
    "differing_overlap": "DistoptError: Rank 1 differs from rank 0: optimizer setting 'overlap_backward' is False "
                         "there but True on rank 0. All ranks must build the same model and optimizer.",
    "empty_model": "ValueError: The parameter tree is empty: there is nothing to optimize.",
    "grads_missing": "ValueError: The gradients miss the parameter 'bias'.",
    "grads_wrong_shape": "ValueError: The gradient of 'weight' has shape (2, 2) and dtype float32; "
                         "the parameter has shape (8, 4) and dtype float32.",
    "grads_wrong_dtype": "ValueError: The gradient of 'weight' has shape (8, 4) and dtype float16; "
                         "the parameter has shape (8, 4) and dtype float32.",
    "grads_wrong_dtype_later": "ValueError: The gradients of 'weight' have shape (8, 4) and dtype bfloat16; "
                               "the optimizer expects (8, 4) and float32.",
    "lr_nan": "ValueError: The learning rate must be a finite number >= 0, got nan.",
    "lr_negative": "ValueError: The learning rate must be a finite number >= 0, got -0.1.",
    "lr_nan_set_later": "ValueError: The learning rate must be a finite number >= 0, got nan.",
}


def test_bad_training_input_on_every_rank():
    """Each case raises the same clear error on both ranks, and the ranks stay usable."""
    code, out, err = run_ranks(2, "fault_bad_input.py", "all", timeout=90, env={"DISTOPT_TIMEOUT": "30"})
    assert code == 0, out + err
    for rank in (0, 1):
        lines = rank_lines(out, rank)
        assert lines[-1] == "all cases done", out + err
        got = dict(line.split(" -> ", 1) for line in lines if " -> " in line)
        assert got == EXPECTED, f"rank {rank}: {got}"


def test_wrong_gradient_on_one_rank_ends_the_job():
    """Only rank 1 passes a wrong gradient: it names it and exits; MPI aborts the job at once."""
    code, out, err = run_ranks(2, "fault_bad_input.py", "rank1_grads", backend="mpi", timeout=60,
                               env={"DISTOPT_TIMEOUT": "30"})
    assert code != 0
    assert "[rank 1] ValueError: The gradients of 'bias' have shape (3,) and dtype float32; " \
           "the optimizer expects (8,) and float32." in out + err
    assert "no error" not in out
    assert "watchdog" not in out + err  # MPI_Abort ended rank 0, not its 30 s deadline


def test_nothing_is_unpickled_or_evaluated():
    """No distopt module imports a code-executing deserializer or calls eval/exec."""
    import ast

    forbidden_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    package = Path(distopt.__file__).parent
    problems = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if forbidden_modules & set(names):
                problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{path.name}:{node.lineno} calls {node.func.id}")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                problems.append(f"{path.name}:{node.lineno} passes allow_pickle")
    assert problems == []
