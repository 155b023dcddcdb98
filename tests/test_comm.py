"""Communication paths: every path on every CPU backend, N = 1..4, through real ranks.

One launch per (backend, N) runs ``tests/scripts/comm_check.py`` over all the paths
that backend can run (``DISTOPT_COMM``): collectives bitwise against locally computed
sums, bytes per call and per step (``comm_report``) against the ring minimum
2(N-1)/N, optimizer parity with mlx.optimizers on mixed float32/bfloat16/float16
parameters with equal and unequal shards, and the compiled step. The float16/bfloat16
MPI sum is also checked in-process against MLX's own addition on edge values.
"""

import mlx.core as mx
import numpy as np
import pytest
from helpers import rank_lines, run_ranks

from distopt.comm import half_sum_op

# allsum does the same on both backends; on the (slow to start) TCP ring it runs at N=2 only.
PATHS = {"ring": ["ring", "tcp", "allsum"], "mpi": ["mpi4py-ring", "mpi4py", "ring", "allsum"]}


def paths_for(backend, n):
    return ["ring", "tcp"] if backend == "ring" and n > 2 else PATHS[backend]


# One rank runs no collective, so N=1 is launched once.
@pytest.mark.parametrize("backend,n", [("ring", 1), ("ring", 2), ("ring", 3), ("ring", 4), ("mpi", 2), ("mpi", 3), ("mpi", 4)])
def test_every_path_moves_minimal_bytes_and_matches_mlx(backend, n):
    paths = paths_for(backend, n)
    code, out, err = run_ranks(n, "comm_check.py", ",".join(paths), backend=backend, timeout=150)
    assert code == 0, f"exit {code}\n{out[-4000:]}\n{err[-4000:]}"
    for rank in range(n):
        lines = rank_lines(out, rank)
        for path in paths:
            expected = ["parity", "parity compiled"] + (["collectives"] if n > 1 else [])
            for check in expected:
                assert any(line.startswith(f"OK {path} {check}") for line in lines), (rank, path, check, out[-3000:])
            assert any(line.startswith(f"DONE {path}") for line in lines), (rank, path, out[-3000:])
        if n == 2:
            assert any(line.startswith(f"OK {paths[0]} half_rounding") for line in lines)
        if n > 1:
            assert "OK refusals" in lines


@pytest.mark.parametrize("ways", [0, 1, 2])
def test_tcp_ring_schedules_in_small_chunks(ways):
    """Each tcp schedule (``DISTOPT_TCP_WAYS``: step by step, streamed one way, both
    ways) on 3 ranks, 1 KiB chunks so that every part streams in many: bitwise sums,
    bytes and parity as above."""
    env = {"DISTOPT_TCP_WAYS": str(ways), "DISTOPT_TCP_CHUNK_KIB": "1"}
    code, out, err = run_ranks(3, "comm_check.py", "tcp", backend="ring", timeout=150, env=env)
    assert code == 0, f"exit {code}\n{out[-4000:]}\n{err[-4000:]}"
    for rank in range(3):
        lines = rank_lines(out, rank)
        for check in ("collectives", "parity", "parity compiled"):
            assert any(line.startswith(f"OK tcp {check}") for line in lines), (rank, check, out[-3000:])


@pytest.mark.parametrize("name,value,expected", [
    ("DISTOPT_TCP_WAYS", "3", "DISTOPT_TCP_WAYS='3': expected 0 (step by step), 1 (streamed one way) or 2 (both ways round the ring)."),
    ("DISTOPT_TCP_CHUNK_KIB", "0.5", "DISTOPT_TCP_CHUNK_KIB='0.5': expected a whole number of KiB, at least 1."),
])
def test_bad_tcp_schedule_is_refused(name, value, expected):
    code, out, err = run_ranks(2, "comm_check.py", "tcp", backend="ring", timeout=60, env={name: value})
    assert code == 1, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    assert f"ValueError: {expected}" in out + err, out[-3000:] + err[-3000:]


EDGES = [0.0, -0.0, 1.0, -1.0, 3.0e-8, 6.0e-5, 1.0e-40, 65504.0, 60000.0, 3.0e38, float("inf"), float("-inf"), float("nan"), 1.5, 0.1, 2.0**-14]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mpi_half_sum_is_mlx_addition(dtype):
    mlx_dtype = getattr(mx, dtype)
    edges = mx.array(EDGES).astype(mlx_dtype)
    a = mx.concatenate([mx.repeat(edges, len(EDGES)), mx.random.normal((4096,), key=mx.random.key(1)).astype(mlx_dtype) * 100])
    b = mx.concatenate([mx.tile(edges, len(EDGES)), mx.random.normal((4096,), key=mx.random.key(2)).astype(mlx_dtype)])
    words_a = np.array(a.view(mx.uint16))
    words_b = np.array(b.view(mx.uint16))
    half_sum_op(dtype)(memoryview(words_a), memoryview(words_b), None)
    got = mx.array(words_b).view(mlx_dtype)
    expected = a + b
    nan = mx.isnan(expected)
    assert mx.array_equal(mx.isnan(got), nan).item()
    bits = lambda x: mx.where(nan, 0, x.view(mx.uint16))  # noqa: E731  (bitwise, so -0.0 != 0.0)
    assert mx.array_equal(bits(got), bits(expected)).item()
