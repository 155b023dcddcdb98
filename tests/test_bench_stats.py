"""The bench's paired intervals: order statistics of the per-repeat ratios."""

import math

import pytest

from distopt.bench.report import format_markdown, format_table, ratios
from distopt.bench.stats import median_interval, paired_ratio


def coverage(n, k):
    """P(x_(k) <= median <= x_(n+1-k)) for n samples of a continuous distribution."""
    return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n


@pytest.mark.parametrize("n, k", [(5, 1), (11, 3), (21, 7), (41, 15)])
def test_median_interval_is_the_tightest_order_statistics_with_90_percent(n, k):
    values = [10.0 * i for i in range(n, 0, -1)]  # unsorted on purpose
    assert median_interval(values) == (10.0 * k, 10.0 * (n + 1 - k))
    assert coverage(n, k) >= 0.9 > coverage(n, k + 1)


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_median_interval_needs_five_values_at_90_percent(n):
    assert median_interval([1.0] * n) is None


def test_paired_ratio_divides_repeat_by_repeat():
    median, interval = paired_ratio([2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 3.0, 2.0, 5.0, 2.0])
    assert median == 2.0 and interval == (1.0, 3.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def row(method, steps, opts, timing="interleaved"):
    r = {"method": method, "model": "mlp", "size": 1000, "ranks": 2, "step_ms": sorted(steps)[len(steps) // 2],
         "opt_ms": sorted(opts)[len(opts) // 2], "fb_ms": 1.0, "state_bytes": 8, "step_samples_ms": steps, "opt_samples_ms": opts}  # fmt: skip
    return {**r, "timing": timing} if timing else r


def test_ratios_pair_interleaved_repeats_only():
    ref = row("mlx_dp", [10.0] * 5, [4.0] * 5)
    ours = row("distopt_s1", [9.0, 11.0, 10.0, 12.0, 8.0], [2.0] * 5)
    (q,) = ratios([ref, ours])
    assert q["step_vs_mlx_dp_paired"] == 1.0 and q["step_vs_mlx_dp_ci"] == [0.8, 1.2]
    assert q["opt_vs_mlx_dp_paired"] == 0.5 and q["opt_vs_mlx_dp_ci"] == [0.5, 0.5]
    # one method after another (large models): repeats of different moments do not pair
    (q,) = ratios([row("mlx_dp", [10.0] * 5, [4.0] * 5, None), row("distopt_s1", [9.0] * 5, [2.0] * 5, None)])
    assert q["step_vs_mlx_dp_paired"] is None and q["step_vs_mlx_dp_ci"] is None


def test_tables_show_the_paired_interval():
    rows = [row("mlx_dp", [10.0] * 5, [4.0] * 5), row("distopt_s1", [9.0, 11.0, 10.0, 12.0, 8.0], [2.0] * 5)]
    for r in rows:
        r.update(params=1000, step_spread_ms=0.0, wait_ms=0.0, sent_bytes=0, sent_how="counted", peak_rss=1, peak_mlx=1, peak_cuda=None)
    meta = {"device": "cpu", "date": "d", "machine": "m", "commit": "c", "mlx": "x", "backend": "mpi", "load_average": 0}
    result = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
    text = format_table(result)
    assert "1.00 [0.80-1.20]" in text and "0.50 [0.50-0.50]" in text and "paired, 90%" in text
    assert "| 1.00 | 1.00 [0.80-1.20] | 1.00 | 0.50 | 0.50 [0.50-0.50] |" in format_markdown(result)


def test_methods_interleave_where_every_model_fits_in_memory(monkeypatch):
    """The parent times the MLX methods rep by rep in turn where all of them fit in half the
    host's available memory at once (MLX DP 3 model copies, distopt 1 + 2/N, plus 3 for the
    one stepping, per rank), else one after another; on a GPU up to 20M parameters."""
    import distopt.bench as bench

    monkeypatch.setattr(bench, "host_memory_available", lambda: 16 * 2**30)
    both = ["mlx_dp", "distopt_s1"]
    # 2 ranks, 100M: 2 x (3 + 2 + 3) x 400 MB = 6.4 GB <= 8 GiB; 4 ranks: 4 x 7.5 x 400 MB = 12 GB > 8 GiB
    assert bench.interleaves(both, 100_000_000, 2, "cpu")
    assert not bench.interleaves(both, 100_000_000, 4, "cpu")
    assert not bench.interleaves(["distopt_s1"], 1000, 2, "cpu")  # nothing to interleave with
    assert bench.interleaves(both, 20_000_000, 2, "gpu") and not bench.interleaves(both, 20_000_001, 2, "gpu")
