"""Parity: distopt after 20 steps equals all_sum-averaged gradients + mlx.optimizers.

Real ranks through ``distopt launch`` on the MPI and ring backends. Every optimizer and
hyperparameter branch (SGD plain, momentum, dampening, Nesterov, weight decay;
Adagrad; Adamax; learning-rate schedules) runs for both stages in one launch per
(backend, N). At N=1 and N=2 the sum over ranks is order-free and the result must be
bitwise equal; at N=3 and N=4 it must be equal within float32 rounding of a
differently ordered sum.
"""

import json

import pytest
from helpers import rank_lines, run_ranks

CONFIGS = 9  # configurations in tests/scripts/parity.py


def parity_results(n, backend, bucket_bytes):
    code, out, err = run_ranks(n, "parity.py", "all", bucket_bytes, backend=backend, timeout=240)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    results = []
    for rank in range(n):
        lines = [json.loads(line.split(" ", 1)[1]) for line in rank_lines(out, rank) if line.startswith("PARITY ")]
        assert len(lines) == 2 * CONFIGS, f"rank {rank} printed {len(lines)} results\n{out[-3000:]}\n{err[-3000:]}"
        results += lines
    return results


@pytest.mark.parametrize("backend", ["mpi", "ring"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_parity_with_mlx_optimizers(n, backend):
    # At N=2, small buckets (64 bytes) so every step crosses many bucket and parameter
    # borders; one bucket at N=3, 4, whose ranks share 2 cores here and pay for every
    # extra collective.
    results = parity_results(n, backend, bucket_bytes=64 if n == 2 else 1 << 20)
    for r in results:
        where = f"{r['config']} stage {r['stage']} rank {r['rank']} of {n}"
        assert r["size"] == n
        assert r["state_keys_match"], where
        assert r["step"] == 20 and r["lr"] == r["ref_lr"], where
        if n <= 2:
            assert r["params_exact"], f"{where}: params differ by {r['params_max_diff']}"
            assert r["state_exact"], f"{where}: state differs by {r['state_max_diff']}"
        else:
            assert r["params_close"], f"{where}: params differ by {r['params_max_diff']}"
            assert r["state_close"], f"{where}: state differs by {r['state_max_diff']}"


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_overlap_backward_reduces_the_last_bucket_first(backend):
    """With ``overlap_backward`` (default) a step reduces its buckets last one first, the
    order in which the backward pass finishes them; without, in layout order. Both give
    bitwise the same parameters and state."""
    code, out, err = run_ranks(2, "overlap_order.py", backend=backend, timeout=90)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    for rank in range(2):
        lines = [json.loads(line[6:]) for line in rank_lines(out, rank) if line.startswith("ORDER ")]
        assert len(lines) == 1, out[-3000:]
        (on, buckets), (off, buckets_off), same = lines[0]["on"], lines[0]["off"], lines[0]["same_result"]
        assert buckets == buckets_off == len(off) == len(set(off)) and buckets >= 8, lines[0]
        assert off == sorted(off), lines[0]
        assert on == sorted(off, reverse=True), lines[0]
        assert same, lines[0]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_state_memory_is_one_nth_within_padding(n):
    for r in parity_results(n, "mpi", bucket_bytes=1 << 20):
        scalars = 8 + 4  # "step" (uint64) and "learning_rate" (float32), kept whole on every rank
        state_arrays = 2 if r["config"].startswith("adamax") else 1
        sharded = r["state_bytes"] - scalars
        unsharded = r["state_bytes_unsharded"] - scalars
        padding = r["padded_elements"] * 4 * state_arrays
        assert sharded * n == unsharded + padding, r
        assert padding < n * 4 * state_arrays


def test_cpu_step_writes_the_new_state_into_the_old_states_memory():
    """One compiled kernel per output on the CPU lets MLX donate each old state array to
    its successor: every state part of every bucket keeps its address from step to step
    (a kernel of several outputs would allocate fresh memory for each)."""
    code, out, err = run_ranks(2, "state_in_place.py", backend="ring", timeout=90)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    for rank in range(2):
        lines = [json.loads(line[8:]) for line in rank_lines(out, rank) if line.startswith("INPLACE ")]
        assert lines == [{"adamax": [18, 18], "adagrad": [9, 9], "sgd_momentum": [9, 9]}], out[-3000:]


def test_step_buffers_are_reused_from_mlx_cache_not_fresh_memory():
    """``cache_step_buffers`` (default) raises MLX's cache limit to ``step_buffer_bytes()``
    (never lowers a larger one): steps then reuse freed buffers and take almost no fresh
    pages; with it off, MLX's 32 MiB Linux default hands the new parameters back to the
    OS every step and the next step faults them in again."""
    code, out, err = run_ranks(2, "step_buffers_cached.py", backend="ring", timeout=150)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    page = 4096
    for rank in range(2):
        lines = [json.loads(line[6:]) for line in rank_lines(out, rank) if line.startswith("CACHE ")]
        assert len(lines) == 1, out[-3000:]
        cached, plain, user = lines[0]["cached"], lines[0]["not_cached"], lines[0]["user_limit_kept"]
        need = cached["step_buffer_bytes"]
        new_parameters = 2 * (4096 * 4096 + 4096) * 4
        assert need > new_parameters > cached["before"] == 32 * 1024**2
        assert cached["after"] == need
        assert plain["after"] == plain["before"] == 32 * 1024**2
        assert user["before"] == user["after"] == 8 << 30
        assert cached["faults"] < 0.05 * need / page, lines[0]
        assert user["faults"] < 0.05 * need / page, lines[0]
        assert plain["faults"] > 0.5 * new_parameters / page, lines[0]


def test_update_hands_each_buckets_new_parameters_to_the_model():
    """``opt.update(model, grads)`` puts each bucket's new parameters into the model as it is
    gathered, so the old ones are freed during the step: MLX's peak beyond the model,
    gradients and state stays below the size of the new parameters alone, while
    ``apply_gradients`` (all new parameters until it returns) goes above it. Same bits
    both ways; a model whose parameters are a plain list of arrays is updated in place of
    each array; gradients the model lacks are refused by name before the step."""
    code, out, err = run_ranks(2, "update_frees_old.py", backend="ring", timeout=120)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    for rank in range(2):
        frees = [json.loads(line[6:]) for line in rank_lines(out, rank) if line.startswith("FREES ")]
        lists = [json.loads(line[6:]) for line in rank_lines(out, rank) if line.startswith("LISTS ")]
        assert len(frees) == len(lists) == 1, out[-3000:]
        f, lst = frees[0], lists[0]
        report = f["report"]
        assert f["same"] and f["buckets"] == 17, f
        assert f["apply"] >= f["parameter_bytes"], f
        assert f["update"] < f["parameter_bytes"], f
        planned = report["gradient_shard_bytes"] + report["reduce_buffer_bytes"] + report["update_buffer_bytes"]
        assert f["update"] <= planned, f
        assert lst["update"] == lst["apply"] and lst["types"] == ["array"] * 3, lst
        assert lst["error"] == "The model has no parameter 'v' to update: the gradients hold it and the model does not.", lst
