"""Side-by-side benchmark: distopt against MLX data parallelism and PyTorch ZeRO.

Every method trains the same models (an MLP and a small decoder-only transformer at
about 1M, 10M, 100M parameters) on the same synthetic data with the same number of
ranks, each rank on its own batch of the same size:

- ``single``: one process, ``mlx.optimizers.Adamax`` (no distribution);
- ``mlx_dp``: ``mlx.nn.average_gradients`` + ``mlx.optimizers.Adamax`` (unsharded);
- ``distopt_s1`` / ``distopt_s2``: ``distopt.Adamax(stage=1|2)``;
- ``torch_zero``: PyTorch DDP + ``ZeroRedundancyOptimizer(torch.optim.Adamax)`` on gloo
  (CPU) or NCCL (GPU), when PyTorch is installed.

A step is timed as ``fb`` (this rank's forward and backward) plus ``opt`` (gradient
reduction + optimizer update + parameter gather). MLX methods evaluate the two parts
separately; PyTorch's DDP overlaps its all-reduce with the backward pass, so its ``opt``
is the median full step minus the median step run under ``no_sync`` (local forward and
backward only): step time minus that rank's own forward and backward, for every method.

Scaling model (``analytic_model``): for ``N`` machines on a ring with link bandwidth
``B`` (bytes/s) and per-message latency ``a``, a step of ``P`` float32 parameters takes

.. math::

    T(N) = T_{fb} + T_{upd}(P / N) + 2\\frac{N-1}{N}\\frac{4P}{B} + 2(N-1)a

for distopt (reduce-scatter + all-gather, update of one shard) and the same with
``T_upd(P)`` for MLX data parallelism (all-reduce, full update). ``T_upd(n) = 28n/U``
with ``U`` the measured update throughput (7 float32 arrays per element).

Run it with ``distopt bench`` (see ``distopt bench --help``) or ``python -m distopt.bench``.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("single", "mlx_dp", "distopt_s1", "distopt_s2", "torch_zero")
MLX_DIST_METHODS = ("mlx_dp", "distopt_s1", "distopt_s2")
MODELS = ("mlp", "transformer")
BYTES_PER_ELEMENT_ADAMAX = 28  # read p, g, m, v and write p, m, v: 7 float32 arrays
MLP_DEPTH = 4
VOCAB = 2048
# (model dims, layers) of the transformer for a target parameter count.
TRANSFORMER_SHAPES = ((2e6, 128, 4), (2e7, 320, 8), (3e8, 768, 14), (math.inf, 2048, 20))
# Effective link bandwidths in bytes/s: line rate x 0.8 (an assumption, not a measurement).
LINKS = {"10GbE": 10e9 / 8 * 0.8, "TB4": 40e9 / 8 * 0.8, "TB5": 80e9 / 8 * 0.8}
LINK_LATENCY_S = 50e-6


# --------------------------------------------------------------------------- sizes


def parse_size(text):
    """``"1M"`` -> 1_000_000; accepts k, M, B suffixes and plain integers."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"Bad model size {text!r}: use a number with k, M or B, e.g. 10M.")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def mlp_width(params):
    """Width of a depth-4 square MLP with about ``params`` parameters (multiple of 32)."""
    return max(32, int(round(math.sqrt(params / MLP_DEPTH) / 32)) * 32)


def transformer_shape(params):
    """(dims, layers, heads) of the transformer for about ``params`` parameters."""
    for limit, dims, layers in TRANSFORMER_SHAPES:
        if params < limit:
            break
    # scale the width so that 12 * layers * dims^2 + 2 * VOCAB * dims ~ params
    dims = max(64, int(round(math.sqrt(max(params - 2 * VOCAB * dims, 12 * 64 * 64) / (12 * layers)) / 64)) * 64)
    return dims, layers, max(1, dims // 64)


# --------------------------------------------------------------------------- MLX side


def mlx_model(kind, params, cfg):
    """An MLX model, its loss function and one batch of this rank's data."""
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)  # same initial weights on every rank
    if kind == "mlp":
        width = mlp_width(params)
        model = _MlxMLP(width)
        key = mx.random.key(1000 + cfg["rank"])
        x = mx.random.normal((cfg["batch"], width), key=key)
        y = mx.random.normal((cfg["batch"], width), key=mx.random.split(key)[0])

        def loss_fn(model, x, y):
            return nn.losses.mse_loss(model(x), y)

    else:
        dims, layers, heads = transformer_shape(params)
        model = _mlx_transformer(dims, layers, heads)
        key = mx.random.key(1000 + cfg["rank"])
        x = mx.random.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), key=key)
        y = mx.random.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), key=mx.random.split(key)[0])

        def loss_fn(model, x, y):
            return nn.losses.cross_entropy(model(x), y, reduction="mean")

    mx.eval(model.parameters(), x, y)
    return model, loss_fn, (x, y)


def _MlxMLP(width):
    import mlx.nn as nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(width, width) for _ in range(MLP_DEPTH)]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nn.relu(layer(x))
            return self.layers[-1](x)

    return MLP()


def _mlx_transformer(dims, layers, heads):
    import mlx.nn as nn

    class TinyGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, dims)
            self.blocks = [nn.TransformerEncoderLayer(dims, heads, 4 * dims) for _ in range(layers)]
            self.norm = nn.LayerNorm(dims)
            self.head = nn.Linear(dims, VOCAB, bias=False)

        def __call__(self, x):
            mask = nn.MultiHeadAttention.create_additive_causal_mask(x.shape[1])
            h = self.embed(x)
            for block in self.blocks:
                h = block(h, mask)
            return self.head(self.norm(h))

    return TinyGPT()


def mlx_optimizer(method, group, lr=1e-4):
    """The optimizer a method uses: ``mlx.optimizers.Adamax`` or ``distopt.Adamax``."""
    import mlx.optimizers as optim

    import distopt

    if method in ("single", "mlx_dp"):
        return optim.Adamax(lr)
    return distopt.Adamax(lr, group=group, stage=int(method[-1]))


def run_mlx_method(method, kind, params, cfg, group):
    """Time ``cfg['repeats']`` steps of one method on one model; returns this rank's figures."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    _release_memory()
    model, loss_fn, (x, y) = mlx_model(kind, params, cfg)
    opt = mlx_optimizer(method, group)
    grad_fn = nn.value_and_grad(model, loss_fn)
    barrier = _mlx_barrier(group)
    fb, upd, sent0 = [], [], None
    for i in range(cfg["warmup"] + cfg["repeats"]):
        if i == cfg["warmup"]:
            _reset_peaks()
            sent0 = _sent_bytes(opt)
        barrier()
        t0 = time.perf_counter()
        loss, grads = grad_fn(model, x, y)
        mx.eval(loss, grads)
        t1 = time.perf_counter()
        if method == "mlx_dp":
            grads = nn.average_gradients(grads, group=group)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        t2 = time.perf_counter()
        if i >= cfg["warmup"]:
            fb.append(t1 - t0)
            upd.append(t2 - t1)
    n = group.size()
    nparams = sum(v.size for _, v in tree_flatten(model.parameters()))
    grad_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if method.startswith("distopt"):
        sent = (_sent_bytes(opt) - sent0) / cfg["repeats"]
        state = opt.memory_report()["optimizer_state_bytes"]
        sent_how = "counted"
    else:
        sent = 2 * (n - 1) / n * grad_bytes
        state = sum(v.nbytes for _, v in tree_flatten(opt.state))
        sent_how = "formula"
    return _figures(method, kind, params, nparams, n, fb, upd, sent, sent_how, state, _peaks())


def _mlx_barrier(group):
    import mlx.core as mx

    if group.size() == 1:
        return lambda: None
    one = mx.array(1.0)
    return lambda: mx.eval(mx.distributed.all_sum(one, group=group))


def _sent_bytes(opt):
    """Bytes this rank has sent so far through distopt's communicator."""
    report = getattr(opt, "comm_report", None)
    if callable(report):
        rep = report()
        for key in ("bytes_sent", "sent_bytes", "sent"):
            if isinstance(rep.get(key), (int, float)):
                return rep[key]
    comm = getattr(opt, "comm", None)
    return comm.traffic.total_sent() if comm is not None else 0


def _release_memory():
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:
        pass


def _reset_peaks():
    """Reset the process' peak RSS (Linux) and MLX's and PyTorch's peak counters."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # macOS: ru_maxrss stays the process-wide peak
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].reset_peak_memory()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.reset_peak_memory_stats()


def _peaks():
    """(peak RSS bytes, MLX peak bytes, CUDA peak bytes or None)."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    mlx_peak = None
    if "mlx.core" in sys.modules:
        mlx_peak = sys.modules["mlx.core"].get_peak_memory()
    cuda_peak = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        cuda_peak = sys.modules["torch"].cuda.max_memory_allocated()
    return {"peak_rss": rss, "peak_mlx": mlx_peak, "peak_cuda": cuda_peak}


def _figures(method, kind, params, nparams, n, fb, upd, sent, sent_how, state, peaks):
    steps = [a + b for a, b in zip(fb, upd)]
    return {
        "method": method,
        "model": kind,
        "size": params,
        "params": nparams,
        "ranks": n,
        "step_ms": 1e3 * statistics.median(steps),
        "step_spread_ms": 1e3 * (max(steps) - min(steps)),
        "fb_ms": 1e3 * statistics.median(fb),
        "opt_ms": 1e3 * statistics.median(upd),
        "opt_spread_ms": 1e3 * (max(upd) - min(upd)),
        "sent_bytes": sent,
        "sent_how": sent_how,
        "state_bytes": state,
        **peaks,
    }


def mlx_worker(cfg):
    """One rank of the MLX methods: every model and size, every method, in order."""
    import distopt

    group = distopt.init(backend=cfg.get("init_backend", "auto"))
    cfg["rank"] = group.rank()
    if cfg.get("device") == "cpu":
        import mlx.core as mx

        mx.set_default_device(mx.cpu)
    rows = []
    for kind, params in cfg["jobs"]:
        for method in cfg["methods"]:
            rows.append(run_mlx_method(method, kind, params, cfg, group))
    return rows


# --------------------------------------------------------------------------- PyTorch side


def torch_worker(cfg):
    """One rank of PyTorch DDP + ZeroRedundancyOptimizer (gloo on CPU, NCCL on GPU)."""
    import torch
    import torch.distributed as dist

    gpu = cfg.get("device") == "gpu"
    dist.init_process_group("nccl" if gpu else "gloo")
    if not gpu:
        torch.set_num_threads(cfg["threads"])
    else:
        torch.cuda.set_device(0)
    cfg["rank"] = dist.get_rank()
    rows = [_torch_run(kind, params, cfg, gpu) for kind, params in cfg["jobs"]]
    dist.barrier()
    dist.destroy_process_group()
    return rows


def _torch_model(kind, params, cfg, device):
    import torch
    import torch.nn as tnn

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1000 + cfg["rank"])
    with torch.device(device):
        return _torch_build(kind, params, cfg, gen, device)


def _torch_build(kind, params, cfg, gen, device):
    import torch
    import torch.nn as tnn

    if kind == "mlp":
        width = mlp_width(params)
        layers = []
        for i in range(MLP_DEPTH):
            layers += [tnn.Linear(width, width)] + ([tnn.ReLU()] if i < MLP_DEPTH - 1 else [])
        model = tnn.Sequential(*layers)
        x = torch.randn(cfg["batch"], width, generator=gen, device="cpu")
        y = torch.randn(cfg["batch"], width, generator=gen, device="cpu")
        loss_fn = lambda out, y: tnn.functional.mse_loss(out, y)  # noqa: E731
    else:
        dims, layers, heads = transformer_shape(params)
        model = _TorchGPT(dims, layers, heads)
        x = torch.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), generator=gen, device="cpu")
        y = torch.randint(0, VOCAB, (cfg["lm_batch"], cfg["seq"]), generator=gen, device="cpu")
        loss_fn = lambda out, y: tnn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))  # noqa: E731
    return model.to(device), loss_fn, x.to(device), y.to(device)


def _TorchGPT(dims, layers, heads):
    import torch
    import torch.nn as tnn

    class TinyGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tnn.Embedding(VOCAB, dims)
            layer = tnn.TransformerEncoderLayer(dims, heads, 4 * dims, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = tnn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = tnn.LayerNorm(dims)
            self.head = tnn.Linear(dims, VOCAB, bias=False)

        def forward(self, x):
            mask = tnn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
            return self.head(self.norm(self.blocks(self.embed(x), mask=mask, is_causal=True)))

    return TinyGPT()


def _torch_run(kind, params, cfg, gpu):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    device = "cuda" if gpu else "cpu"
    model, loss_fn, x, y = _torch_model(kind, params, cfg, device)
    ddp = DDP(model)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adamax, lr=1e-4)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def step(local):
        opt.zero_grad(set_to_none=False)
        if local:
            with ddp.no_sync():
                loss_fn(ddp(x), y).backward()
        else:
            loss_fn(ddp(x), y).backward()
            opt.step()
        sync()

    full, local = [], []
    for i in range(cfg["warmup"] + cfg["repeats"]):
        if i == cfg["warmup"]:
            _reset_peaks()
        for is_local, times in ((False, full), (True, local)):
            dist.barrier()
            t0 = time.perf_counter()
            step(is_local)
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
    n = dist.get_world_size()
    nparams = sum(p.numel() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.optim.state.values() for t in s.values() if torch.is_tensor(t))
    fb_med, step_med = statistics.median(local), statistics.median(full)
    row = _figures("torch_zero", kind, params, nparams, n, local, [0.0] * len(local), 0, "", state, _peaks())
    row.update(
        step_ms=1e3 * step_med,
        step_spread_ms=1e3 * (max(full) - min(full)),
        opt_ms=1e3 * (step_med - fb_med),
        opt_spread_ms=None,
        # DDP all-reduce (2(N-1)/N) plus ZeRO's broadcast of each rank's shard ((N-1)/N)
        sent_bytes=3 * (n - 1) / n * 4 * nparams,
        sent_how="formula",
    )
    return row


# --------------------------------------------------------------------------- update throughput


def update_throughput(elements, repeats=10, device=None):
    """GB/s of the Adamax update on flat float32 arrays: eager, compiled, and a compiled copy.

    ``compiled`` is the kernel distopt runs on each rank's shard (MLX's own
    ``Adamax.apply_single`` under ``mx.compile``). The reference ``copy`` is a compiled
    element-wise kernel over the same 7 arrays (reads p, g, m, v; writes 3 sums), so all
    three move ``28 * elements`` bytes per call.
    """
    import mlx.core as mx
    import mlx.optimizers as optim

    if device == "cpu":
        mx.set_default_device(mx.cpu)
    p, g, m, v = (mx.random.normal((elements,)) for _ in range(4))
    v = mx.abs(v)
    mx.eval(p, g, m, v)
    adamax = optim.Adamax(1e-4)

    def update(g, p, m, v):
        state = {"m": m, "v": v}
        out = adamax.apply_single(g, p, state)
        return out, state["m"], state["v"]

    kernels = {"eager": update, "compiled": mx.compile(update), "copy": mx.compile(lambda g, p, m, v: (p + g, m + g, v + g))}
    result = {"elements": elements, "bytes_per_call": BYTES_PER_ELEMENT_ADAMAX * elements, "device": str(mx.default_device())}
    for name, fn in kernels.items():
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            mx.eval(fn(g, p, m, v))
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        result[f"{name}_ms"] = 1e3 * t
        result[f"{name}_gbps"] = BYTES_PER_ELEMENT_ADAMAX * elements / t / 1e9
    return result


# --------------------------------------------------------------------------- analytic model


def analytic_model(rows, throughput, ranks=(2, 4, 8), links=None, latency=LINK_LATENCY_S):
    """Predicted step time of distopt and MLX DP for ``ranks`` Macs over each link.

    Uses this run's single-process forward+backward time per model and size, and the
    measured compiled (distopt) and eager (MLX) Adamax update throughput.
    """
    links = links or LINKS
    out = []
    for r in rows:
        if r["method"] != "single":
            continue
        grad_bytes = 4 * r["params"]
        for n in ranks:
            for link, bw in links.items():
                comm = 2 * (n - 1) / n * grad_bytes / bw + 2 * (n - 1) * latency
                upd_d = BYTES_PER_ELEMENT_ADAMAX * r["params"] / n / (throughput["compiled_gbps"] * 1e9)
                upd_m = BYTES_PER_ELEMENT_ADAMAX * r["params"] / (throughput["eager_gbps"] * 1e9)
                out.append({
                    "model": r["model"], "size": r["size"], "params": r["params"], "ranks": n, "link": link,
                    "link_gbytes_s": bw / 1e9, "comm_ms": 1e3 * comm, "fb_ms": r["fb_ms"],
                    "distopt_ms": r["fb_ms"] + 1e3 * (upd_d + comm), "mlx_dp_ms": r["fb_ms"] + 1e3 * (upd_m + comm),
                })  # fmt: skip
    return out


# --------------------------------------------------------------------------- launching ranks


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


def _worker_main(cfg_path):
    cfg = json.loads(Path(cfg_path).read_text())
    rows = torch_worker(cfg) if cfg["role"] == "torch" else mlx_worker(cfg)
    Path(cfg["out"].format(rank=cfg["rank"])).write_text(json.dumps(rows))


# --------------------------------------------------------------------------- the whole run


def merge_ranks(per_rank):
    """One row per (method, model, size, N): times from rank 0, bytes and memory the max."""
    merged = []
    for i, row in enumerate(per_rank[0]):
        row = dict(row)
        for key in ("sent_bytes", "state_bytes", "peak_rss", "peak_mlx", "peak_cuda"):
            values = [r[i][key] for r in per_rank if r[i].get(key) is not None]
            row[key] = max(values) if values else None
        merged.append(row)
    return merged


def run_bench(opts, log=print, partial=None):
    """Run every method, model, size and rank count in ``opts``; return the result dict.

    ``partial(result)``, if given, receives the rows so far after every launch.
    """
    jobs = [(kind, parse_size(s)) for kind in opts.models for s in opts.sizes]
    jobs = [(kind, n) for kind, n in jobs if kind != "transformer" or n <= opts.lm_max]
    base = {"batch": opts.batch, "lm_batch": opts.lm_batch, "seq": opts.seq, "repeats": opts.repeats, "warmup": opts.warmup, "device": opts.device}
    methods = [m for m in opts.methods if m != "single"]
    torch_ok = "torch_zero" in methods and _has_torch()
    rows, errors = [], []
    for n in sorted(set([1] + list(opts.ranks)) if "single" in opts.methods else opts.ranks):
        big = [j for j in jobs if j[1] <= opts.max_params.get(n, math.inf)]
        if not big:
            continue
        mlx_methods = ["single"] if n == 1 else [m for m in methods if m in MLX_DIST_METHODS]
        runs = [("mlx", mlx_methods, opts.backend)] if mlx_methods else []
        runs += [("torch", ["torch_zero"], "torch")] if torch_ok and n > 1 else []
        for role, names, backend in runs:
            log(f"[bench] N={n}: {', '.join(names)} on {backend}, {len(big)} models")
            try:
                rows += merge_ranks(launch(n, role, {**base, "jobs": big, "methods": names}, backend, opts.timeout))
            except RuntimeError as e:  # report it and go on with the other methods
                log(f"[bench] N={n}: {', '.join(names)} FAILED: {e}")
                errors.append(f"N={n} {', '.join(names)}: {e}")
            if partial:
                partial({"meta": _meta(opts, torch_ok), "rows": rows, "ratios": ratios(rows), "errors": errors})
    result = {"meta": _meta(opts, torch_ok), "rows": rows, "ratios": ratios(rows), "errors": errors}
    if opts.throughput:
        log(f"[bench] update throughput on {opts.throughput} elements")
        result["throughput"] = update_throughput(opts.throughput, device=opts.device)
        result["model"] = analytic_model(rows, result["throughput"])
    return result


def ratios(rows):
    """distopt against MLX DP (step time, state) and PyTorch ZeRO (opt time), same run."""
    index = {(r["method"], r["model"], r["size"], r["ranks"]): r for r in rows}
    out = []
    for (method, model, size, n), r in index.items():
        if not method.startswith("distopt"):
            continue
        ref = index.get(("mlx_dp", model, size, n))
        tz = index.get(("torch_zero", model, size, n))
        out.append({
            "method": method, "model": model, "size": size, "ranks": n,
            "step_vs_mlx_dp": r["step_ms"] / ref["step_ms"] if ref else None,
            "state_vs_mlx_dp": r["state_bytes"] / ref["state_bytes"] if ref else None,
            "opt_vs_mlx_dp": r["opt_ms"] / ref["opt_ms"] if ref else None,
            "opt_vs_torch_zero": r["opt_ms"] / tz["opt_ms"] if tz and tz["opt_ms"] > 0 else None,
            "step_vs_torch_zero": r["step_ms"] / tz["step_ms"] if tz else None,
            "mlx_compute_share": r["fb_ms"] / r["step_ms"],
        })  # fmt: skip
    return out


def _has_torch():
    try:
        import torch.distributed  # noqa: F401

        return True
    except ImportError:
        return False


def _meta(opts, torch_ok):
    import mlx.core as mx

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}",
        "commit": _commit(),
        "mlx": mx.__version__,
        "backend": opts.backend,
        "device": opts.device,
        "mlp_batch": opts.batch,
        "lm_batch": opts.lm_batch,
        "seq": opts.seq,
        "repeats": opts.repeats,
        "load_average": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "peak_memory": "device peak (mx.get_peak_memory / torch.cuda.max_memory_allocated)" if opts.device == "gpu"
        else "process peak RSS (VmHWM, reset before the timed steps)",
    }  # fmt: skip
    if torch_ok:
        import torch

        meta["torch"] = torch.__version__
    return meta


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit():
    if os.environ.get("DISTOPT_COMMIT"):
        return os.environ["DISTOPT_COMMIT"]  # a copy of the tree without .git (the GPU machine)
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# --------------------------------------------------------------------------- output


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def _size_name(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_table(result):
    """The result as plain-text tables (what ``distopt bench`` prints)."""
    meta, lines = result["meta"], []
    peak = "peak dev MiB" if meta["device"] == "gpu" else "peak RSS MiB"
    lines.append(f"distopt bench  {meta['date']}  {meta['machine']}  commit {meta['commit']}  mlx {meta['mlx']}"
                 + (f"  torch {meta['torch']}" if "torch" in meta else "") + f"  backend {meta['backend']}  load {meta['load_average']}")  # fmt: skip
    head = f"{'model':<11} {'size':>5} {'N':>2} {'method':<11} {'step ms':>9} {'spread':>7} {'fb ms':>8} {'opt ms':>8} {'sent MiB':>9} {'state MiB':>9} {peak:>12}"
    lines += [head, "-" * len(head)]
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["size"], r["ranks"], METHODS.index(r["method"]))):
        pk = r["peak_cuda"] if r["method"] == "torch_zero" and meta["device"] == "gpu" else (r["peak_mlx"] if meta["device"] == "gpu" else r["peak_rss"])
        sent = _mib(r["sent_bytes"]) + ("*" if r["sent_how"] == "formula" else "")
        lines.append(f"{r['model']:<11} {_size_name(r['params']):>5} {r['ranks']:>2} {r['method']:<11} {r['step_ms']:>9.1f} "
                     f"{r['step_spread_ms']:>7.1f} {r['fb_ms']:>8.1f} {r['opt_ms']:>8.1f} {sent:>9} {_mib(r['state_bytes']):>9} {_mib(pk):>12}")  # fmt: skip
    lines.append("step = fb (own forward+backward) + opt (reduction + update + gather); spread = max - min over repeats;")
    lines.append("sent per rank per step: counted by distopt, * = algorithm formula (ring all-reduce 2(N-1)/N; torch adds (N-1)/N broadcast)")
    for e in result.get("errors", []):
        lines.append(f"FAILED: {e}")
    if result["ratios"]:
        lines += ["", f"{'model':<11} {'size':>5} {'N':>2} {'method':<11} {'step/mlx_dp':>11} {'state/mlx_dp':>12} {'opt/mlx_dp':>10} {'opt/torch':>9} {'step/torch':>10} {'fb share':>8}"]
        for q in sorted(result["ratios"], key=lambda q: (q["model"], q["size"], q["ranks"], q["method"])):
            cells = [q[k] for k in ("step_vs_mlx_dp", "state_vs_mlx_dp", "opt_vs_mlx_dp", "opt_vs_torch_zero", "step_vs_torch_zero", "mlx_compute_share")]
            c = ["-" if v is None else f"{v:.2f}" for v in cells]
            lines.append(f"{q['model']:<11} {_size_name(q['size']):>5} {q['ranks']:>2} {q['method']:<11} {c[0]:>11} {c[1]:>12} {c[2]:>10} {c[3]:>9} {c[4]:>10} {c[5]:>8}")
    if "throughput" in result:
        t = result["throughput"]
        lines += ["", f"Adamax update on {t['elements']:,} float32 elements ({t['bytes_per_call'] / 1e9:.2f} GB moved per call, {t['device']}):"]
        for k in ("eager", "compiled", "copy"):
            lines.append(f"  {k:<9} {t[k + '_ms']:8.2f} ms  {t[k + '_gbps']:8.1f} GB/s")
        lines.append(f"  compiled update / compiled copy = {t['compiled_gbps'] / t['copy_gbps']:.2f}")
    if result.get("model"):
        lines += ["", "Analytic step time (ms) on N Macs: fb + update(P/N or P) + 2(N-1)/N*4P/B + 2(N-1)*50us; B = line rate x 0.8",
                  f"{'model':<11} {'size':>5} {'N':>2} {'link':<6} {'comm ms':>9} {'distopt':>9} {'mlx_dp':>9}"]  # fmt: skip
        for m in result["model"]:
            lines.append(f"{m['model']:<11} {_size_name(m['params']):>5} {m['ranks']:>2} {m['link']:<6} {m['comm_ms']:>9.1f} {m['distopt_ms']:>9.1f} {m['mlx_dp_ms']:>9.1f}")
    return "\n".join(lines)


def format_markdown(result):
    """The main table and the ratios as Markdown (for docs and READMEs)."""
    gpu = result["meta"]["device"] == "gpu"
    out = ["| model | N | method | step ms | spread | fb ms | opt ms | sent MiB | state MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["size"], r["ranks"], METHODS.index(r["method"]))):
        pk = (r["peak_cuda"] if r["method"] == "torch_zero" else r["peak_mlx"]) if gpu else r["peak_rss"]
        sent = _mib(r["sent_bytes"]) + ("*" if r["sent_how"] == "formula" else "")
        out.append(f"| {r['model']} {_size_name(r['size'])} | {r['ranks']} | {r['method']} | {r['step_ms']:.1f} | {r['step_spread_ms']:.1f} "
                   f"| {r['fb_ms']:.1f} | {r['opt_ms']:.1f} | {sent} | {_mib(r['state_bytes'])} | {_mib(pk)} |")  # fmt: skip
    out += ["", "| model | N | method | step / mlx_dp | state / mlx_dp | opt / mlx_dp | opt / torch_zero | step / torch_zero | fb share |", "|---|---|---|---|---|---|---|---|---|"]
    keys = ("step_vs_mlx_dp", "state_vs_mlx_dp", "opt_vs_mlx_dp", "opt_vs_torch_zero", "step_vs_torch_zero", "mlx_compute_share")
    for q in sorted(result["ratios"], key=lambda q: (q["model"], q["size"], q["ranks"], q["method"])):
        cells = " | ".join("-" if q[k] is None else f"{q[k]:.2f}" for k in keys)
        out.append(f"| {q['model']} {_size_name(q['size'])} | {q['ranks']} | {q['method']} | {cells} |")
    return "\n".join(out)


def plot(result, path):
    """Step time per method (light: forward+backward, dark: optimizer step), one panel per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'distopt[bench]' (or pip install matplotlib).") from None
    panels = sorted({(r["model"], r["size"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8), squeeze=False)
    colors = dict(zip(METHODS, ("#999999", "#d62728", "#1f77b4", "#17becf", "#ff7f0e")))
    for ax, (model, size) in zip(axes[0], panels):
        rows = sorted((r for r in result["rows"] if (r["model"], r["size"]) == (model, size)),
                      key=lambda r: (r["ranks"], METHODS.index(r["method"])))  # fmt: skip
        labels = [f"{r['method']}\nN={r['ranks']}" for r in rows]
        fb = [r["fb_ms"] for r in rows]
        ax.bar(labels, fb, color=[colors[r["method"]] for r in rows], alpha=0.4)
        ax.bar(labels, [max(r["opt_ms"], 0) for r in rows], bottom=fb, color=[colors[r["method"]] for r in rows])
        ax.set_title(f"{model} {_size_name(size)}", fontsize=9)
        ax.tick_params(axis="x", labelsize=6, rotation=90)
    axes[0][0].set_ylabel("step ms (light: fwd+bwd, dark: optimizer)")
    meta = result["meta"]
    fig.suptitle(f"distopt bench {meta['date']}, {meta['device']} ({meta['backend']}), commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- command line


def parser():
    """Arguments of ``distopt bench`` / ``python -m distopt.bench``."""
    p = argparse.ArgumentParser(prog="distopt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,transformer", help="mlp, transformer (comma separated)")
    p.add_argument("--sizes", default="1M,10M,100M", help="parameter counts, e.g. 1M,10M,100M")
    p.add_argument("--ranks", default="2,4", help="rank counts for the distributed methods")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--max-params", default="4:20M,8:20M", help="largest size per rank count, e.g. 4:20M")
    p.add_argument("--lm-max", default=None, help="largest transformer size (default 20M on CPU: the 100M one takes ~10 s a step on 2 cores)")
    p.add_argument("--backend", default="ring", choices=("ring", "mpi", "nccl"))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--batch", type=int, default=None, help="MLP rows per rank (default 16 on CPU, 256 on GPU)")
    p.add_argument("--lm-batch", type=int, default=None, help="transformer sequences per rank (default 2 on CPU, 8 on GPU)")
    p.add_argument("--seq", type=int, default=None, help="transformer sequence length (default 64 on CPU, 256 on GPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--throughput", type=str, default="16M", help="elements for the update-throughput test; 0 to skip")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    p.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here ('-' for stdout)")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a chart here (needs matplotlib)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def resolve(opts):
    """Check and normalize parsed arguments; raises ValueError naming the problem."""
    opts.models = [m for m in opts.models.split(",") if m]
    bad = [m for m in opts.models if m not in MODELS]
    if bad:
        raise ValueError(f"Unknown model {bad[0]!r}; choose from {', '.join(MODELS)}.")
    opts.sizes = [s for s in opts.sizes.split(",") if s]
    for s in opts.sizes:
        parse_size(s)
    opts.ranks = [int(n) for n in opts.ranks.split(",") if n]
    if any(n < 2 for n in opts.ranks):
        raise ValueError("--ranks takes rank counts of 2 or more (N=1 is the 'single' method).")
    opts.methods = [m for m in opts.methods.split(",") if m]
    bad = [m for m in opts.methods if m not in METHODS]
    if bad:
        raise ValueError(f"Unknown method {bad[0]!r}; choose from {', '.join(METHODS)}.")
    opts.max_params = {int(k): parse_size(v) for k, v in (item.split(":") for item in opts.max_params.split(",") if item)}
    opts.throughput = parse_size(opts.throughput)
    opts.lm_max = parse_size(opts.lm_max) if opts.lm_max else (math.inf if opts.device == "gpu" else 20_000_000)
    gpu = opts.device == "gpu"
    opts.batch = opts.batch or (256 if gpu else 16)
    opts.lm_batch = opts.lm_batch or (8 if gpu else 2)
    opts.seq = opts.seq or (256 if gpu else 64)
    if opts.backend == "nccl" and opts.device != "gpu":
        raise ValueError("--backend nccl needs --device gpu.")
    return opts


def main(argv=None):
    """Entry point of ``python -m distopt.bench`` (see ``--help``); returns the exit code."""
    opts = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that running ranks are stopped too
    if opts.worker:
        return _worker_main(opts.worker)
    try:
        opts = resolve(opts)
    except ValueError as e:
        raise SystemExit(f"distopt bench: {e}")
    save = None
    if opts.json_path and opts.json_path != "-":
        save = lambda result: Path(opts.json_path).write_text(json.dumps(result, indent=1))  # noqa: E731
    result = run_bench(opts, log=lambda s: print(s, file=sys.stderr, flush=True), partial=save)
    print(format_table(result), flush=True)
    if opts.json_path == "-":
        print(json.dumps(result, indent=1))
    elif opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=1))
    if opts.plot_path:
        plot(result, opts.plot_path)
    return result


if __name__ == "__main__":
    main()
