"""What every rank runs: timed training steps of one method, and the figures of this rank.

An MLX step is timed as ``fb`` (this rank's forward and backward, evaluated), ``wait``
(a 1-element ``all_sum`` barrier: until every rank has its gradients) and ``opt``
(gradient reduction + optimizer update + parameter gather, evaluated), so ``opt``
holds no wait for a slower rank's forward and backward (MLX's CPU forward+backward
varies by tens of ms between ranks and steps). PyTorch's DDP overlaps its all-reduce
with the backward pass, so its ``opt`` is the median full step minus the median local
step under ``no_sync`` (any wait for a slower rank included) and it has no ``wait``.
"""

import gc
import json
import statistics
import sys
import time
from pathlib import Path

from .models import mlx_model, torch_model


def mlx_optimizer(method, group, lr=1e-4):
    """The optimizer a method uses: ``mlx.optimizers.Adamax`` or ``distopt.Adamax``."""
    import mlx.optimizers as optim

    import distopt

    if method in ("single", "mlx_dp"):
        return optim.Adamax(lr)
    return distopt.Adamax(lr, group=group, stage=int(method[-1]))


def run_mlx_methods(methods, kind, params, cfg, group):
    """This rank's figures for every method in ``methods`` on one model.

    Where the parent chose to interleave this model (``cfg["interleave"]``: every
    method's model fits in memory at once, :func:`distopt.bench.interleaves`), the methods
    are timed rep by rep in turn (the first method rotating), so a drift of the machine's
    load falls on all of them alike; peak memory then comes from a pass of its own, one
    method after another (warmup, then peaks over one step). Otherwise they run one
    method after another, timed and measured in the same pass.
    """
    def one_after_another(repeats):  # each run freed before the next is built
        return [MlxRun(method, kind, params, cfg, group).timed(cfg["warmup"], repeats) for method in methods]

    if len(methods) == 1 or [kind, params] not in cfg.get("interleave", []):
        return one_after_another(cfg["repeats"])
    peaks = {row["method"]: row for row in one_after_another(1)}
    runs = [MlxRun(m, kind, params, cfg, group, fresh=i == 0) for i, m in enumerate(methods)]
    for i in range(cfg["warmup"] + cfg["repeats"]):
        if i == cfg["warmup"]:
            for run in runs:
                run.start_counting()
        for run in runs[i % len(runs) :] + runs[: i % len(runs)]:
            run.step(record=i >= cfg["warmup"])
    rows = [run.figures() for run in runs]
    for row in rows:
        row.update({k: peaks[row["method"]][k] for k in ("peak_rss", "peak_mlx", "peak_cuda")}, timing="interleaved")
    return rows


class MlxRun:
    """One method training one model on this rank: timed steps and their figures.

    A step is timed as ``fb`` (forward and backward, evaluated), ``wait`` (a barrier:
    every rank has its gradients) and ``opt`` (reduction + update + gather, evaluated).
    """

    def __init__(self, method, kind, params, cfg, group, fresh=True):
        import mlx.core as mx
        import mlx.nn as nn

        if fresh:
            _release_memory()
            mx.set_cache_limit(cfg["cache_limit"])  # as the run began: a distopt method raises it for its own step
        self.method, self.kind, self.params, self.group = method, kind, params, group
        self.model, loss_fn, self.batch = mlx_model(kind, params, cfg)
        self.opt = mlx_optimizer(method, group)
        self.grad_fn = nn.value_and_grad(self.model, loss_fn)
        self.barrier = _mlx_barrier(group)
        self.fb, self.wait, self.upd, self.sent0 = [], [], [], None

    def start_counting(self):
        """Start the traffic count (and the peak counters) of the recorded steps."""
        _reset_peaks()
        self.sent0 = _sent_bytes(self.opt)

    def step(self, record=True):
        import mlx.core as mx
        import mlx.nn as nn

        self.barrier()
        t0 = time.perf_counter()
        loss, grads = self.grad_fn(self.model, *self.batch)
        mx.eval(loss, grads)
        t1 = time.perf_counter()
        self.barrier()  # every rank has its gradients: opt starts together everywhere
        t2 = time.perf_counter()
        if self.method == "mlx_dp":
            grads = nn.average_gradients(grads, group=self.group)
        self.opt.update(self.model, grads)
        mx.eval(self.model.parameters(), self.opt.state)
        t3 = time.perf_counter()
        if record:
            self.fb.append(t1 - t0)
            self.wait.append(t2 - t1)
            self.upd.append(t3 - t2)

    def timed(self, warmup, repeats):
        """``warmup`` steps, then ``repeats`` recorded ones; their figures with this method's peaks."""
        for i in range(warmup + repeats):
            if i == warmup:
                self.start_counting()
            self.step(record=i >= warmup)
        return self.figures(_peaks())

    def figures(self, peaks=None):
        from mlx.utils import tree_flatten

        n = self.group.size()
        leaves = [v for _, v in tree_flatten(self.model.parameters())]
        nparams, grad_bytes = sum(v.size for v in leaves), sum(v.nbytes for v in leaves)
        if self.method.startswith("distopt"):
            sent = (_sent_bytes(self.opt) - self.sent0) / len(self.fb)
            state = self.opt.memory_report()["optimizer_state_bytes"]
            sent_how = "counted"
        else:
            sent = 2 * (n - 1) / n * grad_bytes
            state = sum(v.nbytes for _, v in tree_flatten(self.opt.state))
            sent_how = "formula"
        peaks = peaks or {"peak_rss": None, "peak_mlx": None, "peak_cuda": None}
        return _figures(self.method, self.kind, self.params, nparams, n, self.fb, self.upd, sent, sent_how, state, peaks, self.wait)


def _mlx_barrier(group):
    import mlx.core as mx

    if group.size() == 1:
        return lambda: None
    one = mx.array(1.0)
    return lambda: mx.eval(mx.distributed.all_sum(one, group=group))


def _sent_bytes(opt):
    """Bytes this rank has sent so far through distopt's communicator."""
    report = getattr(opt, "comm_report", None)  # distopt optimizers only
    return report().get("total_sent", 0) if callable(report) else 0


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


def _figures(method, kind, params, nparams, n, fb, upd, sent, sent_how, state, peaks, wait=None):
    steps = [a + b + c for a, b, c in zip(fb, upd, wait or [0.0] * len(fb))]
    return {
        "method": method,
        "model": kind,
        "size": params,
        "params": nparams,
        "ranks": n,
        "step_ms": 1e3 * statistics.median(steps),
        "step_spread_ms": 1e3 * (max(steps) - min(steps)),
        "fb_ms": 1e3 * statistics.median(fb),
        "wait_ms": 1e3 * statistics.median(wait) if wait else None,
        "opt_ms": 1e3 * statistics.median(upd),
        "opt_spread_ms": 1e3 * (max(upd) - min(upd)),
        "step_samples_ms": [1e3 * t for t in steps],  # per repeat, in order: paired ratios of interleaved runs
        "opt_samples_ms": [1e3 * t for t in upd],
        "sent_bytes": sent,
        "sent_how": sent_how,
        "state_bytes": state,
        **peaks,
    }


def mlx_worker(cfg):
    """One rank of the MLX methods: every model and size, every method, in order."""
    import distopt
    from distopt.buffers import mlx_cache_limit

    group = distopt.init(backend=cfg.get("init_backend", "auto"))
    cfg["rank"] = group.rank()
    import mlx.core as mx

    if cfg.get("device") == "cpu":
        mx.set_default_device(mx.cpu)
    if cfg.get("mlx_cache_gb") is not None:
        mx.set_cache_limit(int(cfg["mlx_cache_gb"] * 2**30))
    cfg["cache_limit"] = mlx_cache_limit()
    rows = []
    for kind, params in cfg["jobs"]:
        rows += run_mlx_methods(cfg["methods"], kind, params, cfg, group)
    return rows


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


def _torch_run(kind, params, cfg, gpu):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    device = "cuda" if gpu else "cpu"
    model, loss_fn, x, y = torch_model(kind, params, cfg, device)
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


def worker_main(cfg_path):
    """Run the rank described by the JSON config at ``cfg_path`` and write its rows."""
    cfg = json.loads(Path(cfg_path).read_text())
    rows = torch_worker(cfg) if cfg["role"] == "torch" else mlx_worker(cfg)
    Path(cfg["out"].format(rank=cfg["rank"])).write_text(json.dumps(rows))
