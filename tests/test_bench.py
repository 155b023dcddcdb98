"""Smoke test of ``distopt bench``: real ranks, tiny models, the table and JSON have every column."""

import importlib.util
import json
import subprocess
import sys

from helpers import launcher_env

COLUMNS = ("step_ms", "step_spread_ms", "fb_ms", "wait_ms", "opt_ms", "sent_bytes", "state_bytes", "peak_rss", "peak_mlx")
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_bench_two_ranks_table_and_json(tmp_path):
    methods = "single,mlx_dp,distopt_s1,distopt_s2" + (",torch_zero" if HAS_TORCH else "")
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "distopt.cli", "bench", "--models", "mlp,transformer", "--sizes", "16k",
        "--ranks", "2", "--methods", methods, "--repeats", "2", "--warmup", "1", "--lm-batch", "1",
        "--seq", "8", "--throughput", "64k", "--timeout", "120", "--json", str(out), "--mlx-cache-gb", "0.5",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launcher_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for header in ("step ms", "spread", "fb ms", "wait ms", "opt ms", "sent MiB", "state MiB", "peak RSS MiB", "step/mlx_dp", "GB/s"):
        assert header in proc.stdout, header

    assert "mlx cache limit 0.5 GiB" in proc.stdout  # --mlx-cache-gb is recorded in the header and JSON
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["meta"]["mlx_cache_limit_gb"] == 0.5
    rows = {(r["method"], r["model"], r["ranks"]): r for r in result["rows"]}
    expected = {("single", m, 1) for m in ("mlp", "transformer")}
    expected |= {(x, m, 2) for x in methods.split(",")[1:] for m in ("mlp", "transformer")}
    assert set(rows) == expected
    for row in rows.values():
        for column in COLUMNS:
            assert column in row, column
        assert row["step_ms"] > 0 and row["fb_ms"] > 0 and row["peak_rss"] > 0
    # the MLX methods of one launch (tiny models) are timed rep by rep in turn, and say so
    for (method, model, n), row in rows.items():
        assert row.get("timing") == ("interleaved" if n == 2 and method != "torch_zero" else None), (method, model)
    assert "timed rep by rep in turn" in proc.stdout
    # every MLX row keeps its repeats in order (rank 0's), which pair rep by rep; two
    # repeats are too few for a 90% interval, so the table prints "-" and the JSON None
    for (method, model, n), row in rows.items():
        if method != "torch_zero":
            assert len(row["step_samples_ms"]) == len(row["opt_samples_ms"]) == 2, (method, model)
            assert sorted(row["step_samples_ms"])[0] <= row["step_ms"] <= sorted(row["step_samples_ms"])[1]
    for q in result["ratios"]:
        assert q["step_vs_mlx_dp_paired"] > 0 and q["step_vs_mlx_dp_ci"] is None and q["opt_vs_mlx_dp_ci"] is None

    # state per rank: distopt holds its half of MLX DP's Adamax state (plus two scalars)
    for model in ("mlp", "transformer"):
        full = rows[("mlx_dp", model, 2)]
        for stage in ("distopt_s1", "distopt_s2"):
            mine = rows[(stage, model, 2)]
            assert mine["sent_how"] == "counted"
            assert full["state_bytes"] / 2 <= mine["state_bytes"] <= full["state_bytes"] / 2 + 64
    # the MLP (4 x (64*64 + 64) float32, even, one bucket) sends exactly 2(N-1)/N of its gradient
    mlp = rows[("distopt_s1", "mlp", 2)]
    assert mlp["params"] == 4 * (64 * 64 + 64)
    assert mlp["sent_bytes"] == 2 * (2 - 1) / 2 * 4 * mlp["params"] == rows[("mlx_dp", "mlp", 2)]["sent_bytes"]
    assert {q["method"] for q in result["ratios"]} == {"distopt_s1", "distopt_s2"}
    assert result["throughput"]["compiled_gbps"] > 0 and result["throughput"]["copy_gbps"] > 0
    assert {m["ranks"] for m in result["model"]} == {2, 4, 8}
