"""Results across ranks and methods: ratios, the link model, text and Markdown tables, a chart."""

from .models import METHODS
from .stats import paired_ratio
from .throughput import BYTES_PER_ELEMENT_ADAMAX

# Effective link bandwidths in bytes/s: line rate x 0.8 (an assumption, not a measurement).
LINKS = {"10GbE": 10e9 / 8 * 0.8, "TB4": 40e9 / 8 * 0.8, "TB5": 80e9 / 8 * 0.8}
LINK_LATENCY_S = 50e-6


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
            **_paired_vs(r, ref, "step"),
            **_paired_vs(r, ref, "opt"),
        })  # fmt: skip
    return out


def _paired_vs(ours, ref, what):
    """``{what}_vs_mlx_dp_paired`` (median of the per-repeat ratios) and ``..._ci`` (its 90%
    interval, :func:`distopt.bench.stats.median_interval`) where both methods were timed rep
    by rep in turn; ``None`` otherwise (repeats of different moments do not pair)."""
    median = interval = None
    if ref and ours.get("timing") == ref.get("timing") == "interleaved" and f"{what}_samples_ms" in ours:
        median, interval = paired_ratio(ours[f"{what}_samples_ms"], ref[f"{what}_samples_ms"])
    return {f"{what}_vs_mlx_dp_paired": median, f"{what}_vs_mlx_dp_ci": list(interval) if interval else None}


def _interval(q, what):
    """``q``'s paired ratio of ``what`` against MLX DP and its 90% interval as text, e.g.
    ``0.99 [0.93-1.08]`` (``-`` where nothing pairs, ``[-]`` below 5 repeats)."""
    median, ci = q.get(f"{what}_vs_mlx_dp_paired"), q.get(f"{what}_vs_mlx_dp_ci")
    if median is None:
        return "-"
    return f"{median:.2f} " + (f"[{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "[-]")


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


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def _size_name(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _ms(value):
    """Milliseconds with one decimal, or '-' where a method has no such figure."""
    return "-" if value is None else f"{value:.1f}"


def format_table(result):
    """The result as plain-text tables (what ``distopt bench`` prints)."""
    meta, lines = result["meta"], []
    peak = "peak dev MiB" if meta["device"] == "gpu" else "peak RSS MiB"
    lines.append(f"distopt bench  {meta['date']}  {meta['machine']}  commit {meta['commit']}  mlx {meta['mlx']}"
                 + (f"  torch {meta['torch']}" if "torch" in meta else "") + f"  backend {meta['backend']}  load {meta['load_average']}"
                 + (f"  mlx cache limit {meta['mlx_cache_limit_gb']} GiB" if meta.get("mlx_cache_limit_gb") is not None else ""))  # fmt: skip
    head = f"{'model':<11} {'size':>5} {'N':>2} {'method':<11} {'step ms':>9} {'spread':>7} {'fb ms':>8} {'wait ms':>8} {'opt ms':>8} {'sent MiB':>9} {'state MiB':>9} {peak:>12}"
    lines += [head, "-" * len(head)]
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["size"], r["ranks"], METHODS.index(r["method"]))):
        pk = r["peak_cuda"] if r["method"] == "torch_zero" and meta["device"] == "gpu" else (r["peak_mlx"] if meta["device"] == "gpu" else r["peak_rss"])
        sent = _mib(r["sent_bytes"]) + ("*" if r["sent_how"] == "formula" else "")
        lines.append(f"{r['model']:<11} {_size_name(r['params']):>5} {r['ranks']:>2} {r['method']:<11} {r['step_ms']:>9.1f} "
                     f"{r['step_spread_ms']:>7.1f} {r['fb_ms']:>8.1f} {_ms(r.get('wait_ms')):>8} {r['opt_ms']:>8.1f} {sent:>9} {_mib(r['state_bytes']):>9} {_mib(pk):>12}")  # fmt: skip
    lines.append("step = fb (own forward+backward) + wait (barrier: every rank has its gradients) + opt (reduction + update + gather);")
    lines.append("torch: opt = median full step - median no_sync step (DDP overlaps its all-reduce with backward); spread = max - min over repeats;")
    lines.append("sent per rank per step: counted by distopt, * = algorithm formula (ring all-reduce 2(N-1)/N; torch adds (N-1)/N broadcast)")
    if any(r.get("timing") == "interleaved" for r in result["rows"]):
        lines.append("MLX methods timed rep by rep in turn where every method's model fits in memory at once (peak memory from a pass of its own, one method after another); others one after another")
    for e in result.get("errors", []):
        lines.append(f"FAILED: {e}")
    if result["ratios"]:
        lines += ["", f"{'model':<11} {'size':>5} {'N':>2} {'method':<11} {'step/mlx_dp':>11} {'paired, 90%':>16} {'state/mlx_dp':>12} {'opt/mlx_dp':>10} {'paired, 90%':>16} {'opt/torch':>9} {'step/torch':>10} {'fb share':>8}"]
        for q in sorted(result["ratios"], key=lambda q: (q["model"], q["size"], q["ranks"], q["method"])):
            cells = [q[k] for k in ("step_vs_mlx_dp", "state_vs_mlx_dp", "opt_vs_mlx_dp", "opt_vs_torch_zero", "step_vs_torch_zero", "mlx_compute_share")]
            c = ["-" if v is None else f"{v:.2f}" for v in cells]
            lines.append(f"{q['model']:<11} {_size_name(q['size']):>5} {q['ranks']:>2} {q['method']:<11} {c[0]:>11} {_interval(q, 'step'):>16} {c[1]:>12} "
                         f"{c[2]:>10} {_interval(q, 'opt'):>16} {c[3]:>9} {c[4]:>10} {c[5]:>8}")  # fmt: skip
        if any(q.get("step_vs_mlx_dp_ci") for q in result["ratios"]):
            lines.append("paired: median of the per-repeat ratios (methods timed rep by rep in turn) [where it lies with 90% confidence, order statistics]")
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
    out = ["| model | N | method | step ms | spread | fb ms | wait ms | opt ms | sent MiB | state MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["size"], r["ranks"], METHODS.index(r["method"]))):
        pk = (r["peak_cuda"] if r["method"] == "torch_zero" else r["peak_mlx"]) if gpu else r["peak_rss"]
        sent = _mib(r["sent_bytes"]) + ("*" if r["sent_how"] == "formula" else "")
        out.append(f"| {r['model']} {_size_name(r['size'])} | {r['ranks']} | {r['method']} | {r['step_ms']:.1f} | {r['step_spread_ms']:.1f} "
                   f"| {r['fb_ms']:.1f} | {_ms(r.get('wait_ms'))} | {r['opt_ms']:.1f} | {sent} | {_mib(r['state_bytes'])} | {_mib(pk)} |")  # fmt: skip
    out += ["", "| model | N | method | step / mlx_dp | paired [90%] | state / mlx_dp | opt / mlx_dp | paired [90%] | opt / torch_zero | step / torch_zero | fb share |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = ("step_vs_mlx_dp", "state_vs_mlx_dp", "opt_vs_mlx_dp", "opt_vs_torch_zero", "step_vs_torch_zero", "mlx_compute_share")
    for q in sorted(result["ratios"], key=lambda q: (q["model"], q["size"], q["ranks"], q["method"])):
        c = ["-" if q[k] is None else f"{q[k]:.2f}" for k in keys]
        cells = " | ".join([c[0], _interval(q, "step"), c[1], c[2], _interval(q, "opt"), *c[3:]])
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
        below = [r["fb_ms"] + (r.get("wait_ms") or 0) for r in rows]
        ax.bar(labels, fb, color=[colors[r["method"]] for r in rows], alpha=0.4)
        ax.bar(labels, [b - f for b, f in zip(below, fb)], bottom=fb, color="#dddddd")
        ax.bar(labels, [max(r["opt_ms"], 0) for r in rows], bottom=below, color=[colors[r["method"]] for r in rows])
        ax.set_title(f"{model} {_size_name(size)}", fontsize=9)
        ax.tick_params(axis="x", labelsize=6, rotation=90)
    axes[0][0].set_ylabel("step ms (light: fwd+bwd, grey: wait, dark: optimizer)")
    meta = result["meta"]
    fig.suptitle(f"distopt bench {meta['date']}, {meta['device']} ({meta['backend']}), commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
