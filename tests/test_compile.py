"""The whole training step (forward, backward, reduce-scatter, sharded update, gather)
under ``mx.compile``, as mlx-lm compiles its step, equals the eager step bitwise.

2 real ranks on ring and MPI; configurations in tests/scripts/compile_step.py: stage 1,
stage 2 with many small buckets and a schedule, and bf16 with fp32 master shards,
clipping and a non-finite batch on rank 1 that both runs skip; and 3-step gradient
accumulation with clipping, compiled as two functions (accumulate, release + update).
"""

import json
import math

import pytest
from helpers import rank_lines, run_ranks

CONFIGS = ["adamax_stage1", "adamax_stage2_buckets_schedule", "bf16_master_clip_skip", "accumulate_3_clip"]


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_compiled_step_equals_eager_step(backend):
    code, out, err = run_ranks(2, "compile_step.py", backend=backend, timeout=150)
    assert code == 0, f"launcher exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    for rank in range(2):
        results = [json.loads(line[8:]) for line in rank_lines(out, rank) if line.startswith("COMPILE ")]
        assert [r["config"] for r in results] == CONFIGS, out[-3000:]
        for r in results:
            where = f"{r['config']} rank {rank} ({backend})"
            assert r["size"] == 2 and r["params_moved"], where
            assert r["params_equal"], f"{where}: params differ by {r['params_max_diff']}"
            assert r["state_equal"], f"{where}: state differs by {r['state_max_diff']}"
            assert all(a == b or math.isnan(a) and math.isnan(b) for a, b in zip(r["losses"], r["compiled_losses"])), where
            skipped = 1 if r["config"] == "bf16_master_clip_skip" else 0
            assert r["skipped"] == skipped and r["step"] == 5 - skipped, where
