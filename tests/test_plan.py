"""The memory planner: ``distopt.plan`` and ``distopt plan`` against real figures.

At N=2 (ring and MPI, whose default paths gather into the new parameters), for five configurations of a mixed bf16/fp32 model (master weights,
fp32 reduction, stage 1 and 2, small buckets, shards weighted 1:3), the planned bytes of each rank equal
``memory_report()`` key by key, and the report's parameter, gradient and state bytes
equal the ``nbytes`` of the arrays the run really holds.
"""

import json
import math

import mlx.core as mx
import pytest
from click.testing import CliRunner
from helpers import rank_lines, run_ranks

import distopt
from distopt.cli import main as cli
from distopt.plan import safetensors_sizes

KEYS = [
    "parameter_bytes", "gradient_bytes", "master_weight_bytes", "optimizer_state_bytes",
    "gradient_shard_bytes", "reduce_buffer_bytes", "update_buffer_bytes", "total_bytes",
]  # fmt: skip


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_plan_equals_memory_report_of_a_real_run_at_n2(backend):
    code, out, err = run_ranks(2, "plan_report.py", backend=backend, timeout=90)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    for rank in range(2):
        results = [json.loads(line[5:]) for line in rank_lines(out, rank) if line.startswith("PLAN ")]
        assert len(results) == 5, out[-3000:]
        for r in results:
            report, planned, arrays = r["report"], r["plan"], r["arrays"]
            assert {k: planned[k] for k in KEYS} == {k: report[k] for k in KEYS}, r["config"]
            assert report["parameter_bytes"] == arrays["parameters"] == report["gradient_bytes"] == arrays["gradients"]
            assert report["optimizer_state_bytes"] + report["master_weight_bytes"] == arrays["state"], r["config"]
            assert r["fits"] == [True, False]  # 1 GiB fits, 1 KiB does not


def test_plan_formula_for_a_7b_model_on_four_macs():
    p = distopt.plan(7e9, "adamax", "bf16", world_size=4, memory_gb=64, master_weights=True)
    s1, s2, alone = p["stages"][1], p["stages"][2], p["stages"]["unsharded"]
    shard = 7e9 / 4
    assert p["state_arrays"] == 2 and p["parameters"] == 7_000_000_000
    assert s1["parameter_bytes"] == s1["gradient_bytes"] == 14e9
    assert s1["master_weight_bytes"] == 4 * shard
    assert s1["optimizer_state_bytes"] == 2 * 4 * shard + 8 + 4  # m, v in fp32, plus step and learning_rate
    assert s1["gradient_shard_bytes"] == 4 * shard
    bucket = 256 * 1024**2 // 2  # bf16 elements of a 256 MiB bucket; 3 may be in flight at stage 1
    assert s1["reduce_buffer_bytes"] == 3 * 2 * bucket and s2["reduce_buffer_bytes"] == 2 * bucket
    assert alone["optimizer_state_bytes"] == 2 * 4 * 7e9 + 12
    # The new bf16 parameters of the bucket being gathered (a count: leaves as large as the
    # buckets; update() hands each bucket's to the model), plus per bucket in flight: new m,
    # v and master parts (fp32) and the part in bf16; the ring's default path gathers into
    # the new parameters.
    per_bucket = 3 * 4 * bucket // 4 + 2 * bucket // 4
    assert p["backend"] == "ring"
    assert s1["update_buffer_bytes"] == 2 * bucket + 3 * per_bucket
    assert s2["update_buffer_bytes"] == 2 * bucket + per_bucket
    # On JACCL/NCCL each bucket in flight is also gathered into a bf16 bucket first.
    rdma = distopt.plan(7e9, "adamax", "bf16", world_size=4, memory_gb=64, master_weights=True, backend="jaccl")["stages"]
    assert rdma[1]["update_buffer_bytes"] == 2 * bucket + 3 * (per_bucket + 2 * bucket)
    assert rdma[2]["update_buffer_bytes"] == 2 * bucket + per_bucket + 2 * bucket
    # No sharding: one rank updating everything at once holds all the new parameters.
    assert alone["update_buffer_bytes"] >= 14e9
    assert rdma["unsharded"] == alone
    assert s2["total_bytes"] < s1["total_bytes"] < alone["total_bytes"]
    assert s1["fits"] == [False] * 4 and s2["fits"] == [False] * 4  # 54.5 and 53.1 GiB > 75% of 64 GiB
    big = distopt.plan(7e9, "adamax", "bf16", world_size=4, memory_gb=128, master_weights=True)["stages"]
    assert big[2]["fits"] == [True] * 4 and big[1]["fits"] == [True] * 4  # 53.1 and 54.5 GiB against 96


def test_plan_cli_prints_the_table():
    result = CliRunner().invoke(cli, ["plan", "--params", "7e9", "--optimizer", "adamax", "--dtype", "bf16", "-n", "4", "--memory", "128"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "7e+09 parameters (bfloat16), Adamax (2 state arrays), 4 ranks, master weights off, backend ring"
    assert lines[1].split() == ["bytes", "per", "rank", "no", "sharding", "stage", "1", "stage", "2"]
    assert lines[2].split() == ["parameters", "13.04", "GiB", "13.04", "GiB", "13.04", "GiB"]
    assert "optimizer state" in result.output and lines[-2].split()[-3:] == ["no", "yes", "yes"]


@pytest.mark.parametrize(
    "args,error",
    [
        (["--params", "7e9", "--optimizer", "adafactor"], "Unknown optimizer 'adafactor'"),
        (["--params", "7e9", "-n", "4", "--memory", "64", "--memory", "32"], "memory_gb must be one positive number or 4"),
        (["--params", "0"], "parameter count must be a positive whole number"),
        (["--params", "7e9", "--backend", "tcp"], "'tcp' is not one of 'ring', 'mpi', 'jaccl', 'nccl'"),
    ],
)
def test_plan_cli_bad_input(args, error):
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 2 and error in result.output, result.output


def test_plan_bad_dtype():
    with pytest.raises(ValueError, match="Unknown dtype 'int8'"):
        distopt.plan(1000, dtype="int8")
    assert distopt.plan(1000, dtype=mx.float16)["dtypes"] == ["float16"]


def test_plan_from_safetensors_headers(tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = nn.Sequential(nn.Linear(30, 50), nn.Linear(50, 7))
    model.layers[0].set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp_path / "model-00001.safetensors"), {k: v for k, v in weights.items() if "0" in k})
    mx.save_safetensors(str(tmp_path / "model-00002.safetensors"), {k: v for k, v in weights.items() if "0" not in k})
    sizes = safetensors_sizes([tmp_path])
    assert sizes == {mx.bfloat16: 30 * 50 + 50, mx.float32: 50 * 7 + 7}
    assert distopt.plan(sizes, "adam", world_size=2)["stages"] == distopt.plan(model, "adam", world_size=2)["stages"]
    result = CliRunner().invoke(cli, ["plan", "--weights", str(tmp_path), "-n", "2"])
    assert result.exit_code == 0 and result.output.startswith("1.91e+03 parameters (bfloat16, float32), Adamax"), result.output
    (tmp_path / "notes.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    result = CliRunner().invoke(cli, ["plan", "--weights", str(tmp_path / "notes.safetensors")])
    assert result.exit_code == 2 and "is not a safetensors file (its header is not JSON)" in result.output
    result = CliRunner().invoke(cli, ["plan"])
    assert result.exit_code == 2 and "Give either --params N or --weights" in result.output


def test_plan_with_shards_weighted_by_memory():
    p = distopt.plan(13e9, world_size=3, memory_gb=[64, 32, 32], shard_weights="memory")
    ranks = p["stages"][2]["ranks"]
    state = [r["optimizer_state_bytes"] - 12 for r in ranks]  # m and v, bf16, of each rank's shard
    assert sum(state) == 2 * 2 * 13_000_000_002  # padded to a multiple of 3
    assert math.isclose(state[0], 2 * state[1], rel_tol=1e-6) and state[1] == state[2]  # bucket rounding only
    assert p["stages"][2]["total_bytes"] == ranks[0]["total_bytes"] > ranks[1]["total_bytes"]
    with pytest.raises(ValueError, match='shard_weights="memory" needs memory_gb'):
        distopt.plan(1e9, world_size=2, shard_weights="memory")
    result = CliRunner().invoke(cli, ["plan", "--params", "13e9", "-n", "3", "--memory", "64", "--memory", "32", "--memory", "32", "--shard-by-memory"])
    assert result.exit_code == 0 and "shards weighted 64/32/32" in result.output and "stage 2 total by rank: " in result.output
