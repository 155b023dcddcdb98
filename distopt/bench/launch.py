"""Start N ranks of a benchmark worker (ring, MPI, NCCL or PyTorch) and collect their rows."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_envs(n, backend, tmp, device):
    """Environment of each rank for ``backend`` (ring, mpi handled by mpirun, nccl, torch)."""
    threads = str(max(1, (os.cpu_count() or 1) // n))
    base = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if device == "gpu":
        base["NCCL_NVLS_ENABLE"] = "0"
    if n == 1:
        return [base]
    envs = []
    if backend == "ring":
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(n)]))
        for r in range(n):
            envs.append({**base, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), "DISTOPT_BACKEND": "ring"})
    elif backend == "nccl":
        port = str(_free_port())
        for r in range(n):
            envs.append({**base, "MLX_RANK": str(r), "MLX_WORLD_SIZE": str(n), "NCCL_HOST_IP": "127.0.0.1",
                         "NCCL_PORT": port, "CUDA_VISIBLE_DEVICES": str(r), "DISTOPT_BACKEND": "nccl"})  # fmt: skip
    elif backend == "torch":
        port = str(_free_port())
        for r in range(n):
            env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": str(n)}
            if device == "gpu":
                env["CUDA_VISIBLE_DEVICES"] = str(r)
            envs.append(env)
    else:
        raise ValueError(f"Unknown backend {backend!r} for the benchmark: use ring, mpi or nccl.")
    return envs


def launch(n, role, cfg, backend, timeout):
    """Run ``n`` ranks of ``role`` (mlx or torch) and return every rank's rows."""
    with tempfile.TemporaryDirectory(prefix="distopt-bench-") as tmp:
        cfg = {**cfg, "role": role, "out": str(Path(tmp) / "rank{rank}.json"), "threads": max(1, (os.cpu_count() or 1) // n)}
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "distopt.bench", "--worker", str(cfg_path)]
        if role == "mlx" and backend == "mpi" and n > 1:
            mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
            procs = [subprocess.Popen([mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(n),
                                       "-x", "DISTOPT_BACKEND=mpi", "-x", "PYTHONUNBUFFERED=1", *cmd])]  # fmt: skip
        else:
            envs = _rank_envs(n, "torch" if role == "torch" else backend, tmp, cfg.get("device"))
            procs = [subprocess.Popen(cmd, env=env) for env in envs]
        _wait_all(procs, timeout, f"{role} ranks (N={n}, {backend})")
        rows = []
        for r in range(n):
            path = Path(cfg["out"].format(rank=r))
            if not path.exists():
                raise RuntimeError(f"Rank {r} of the {role} benchmark (N={n}) wrote no result.")
            rows.append(json.loads(path.read_text()))
        return rows


def _wait_all(procs, timeout, what):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            left = deadline - time.monotonic()
            if p.wait(timeout=max(left, 0.1)) != 0:
                raise RuntimeError(f"The {what} failed (exit code {p.returncode}); see the output above.")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"The {what} did not finish within {timeout} s.") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
