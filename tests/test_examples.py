"""The examples train for real through ``distopt launch``: the loss falls, the loss curve
is the same for 1, 2 and 4 ranks with the same global batch, and ``--resume`` continues a
checkpoint exactly where the uninterrupted run would be (on another N: within rounding).

Runs are kept small (tiny models, tens of steps); every launch has a hard timeout.
"""

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import REPO, run_ranks

EXAMPLES = REPO / "examples"
LINE = re.compile(r"^\[rank 0\] step\s+(\d+)/\d+ \| loss ([0-9.]+|nan|inf)", re.M)
TIMEOUT = 150
TINY_LM = ["--dims", "32", "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "8", "--log-every", "2"]


def launch(n, example, *args, backend="ring"):
    """Run ``examples/<example>`` on ``n`` ranks; return ({step: loss}, stdout). Fails on a non-zero exit."""
    code, out, err = run_ranks(n, EXAMPLES / example, *args, backend=backend, timeout=TIMEOUT)
    assert code == 0, f"{example} on {n} rank(s) exited {code}\n{out}\n{err}"
    curve = {int(step): float(loss) for step, loss in LINE.findall(out)}
    assert curve, f"no loss lines in the output of {example}:\n{out}"
    return curve, out


def in_parallel(*calls, backends=("ring", "ring")):
    """Run independent launches ``(n, example, *args)`` at once; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(launch, *call, backend=b) for call, b in zip(calls, backends)]
        return [f.result() for f in futures]


def assert_same_curve(a, b, tolerance, what):
    assert sorted(a) == sorted(b), f"{what}: logged steps differ: {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert math.isclose(a[step], b[step], abs_tol=tolerance), f"{what}: step {step}: loss {a[step]} vs {b[step]}"


def assert_falls(curve, by, what):
    steps = sorted(curve)
    first, last = curve[steps[0]], curve[steps[-1]]
    assert last < first - by, f"{what}: loss did not fall by {by}: {first} at step {steps[0]} -> {last} at step {steps[-1]}"


def test_mlp_curve_equal_for_1_and_2_ranks_and_resume(tmp_path):
    ck = tmp_path / "mlp"
    common = ["--steps", "30", "--log-every", "5"]
    (one, _), (two, out) = in_parallel(
        (1, "mlp.py", *common),
        (2, "mlp.py", *common, "--save-every", "15", "--checkpoint-dir", ck),
    )
    assert_falls(one, 0.5, "mlp N=1")
    # fp32: one mean over 256 rows vs the mean of two means over 128 rows, then the same update.
    assert_same_curve(one, two, 1e-4, "mlp N=1 vs N=2")
    assert "train accuracy" in out
    # Bytes per step on 2 ranks: 19,978 fp32 parameters = 2 parts of 9,989; the reduce-scatter
    # and the all-gather each send one part and receive one: 4 x 9,989 x 4 B = 159,824 B.
    assert all(line.endswith("| 159.8 kB/step") for line in out.splitlines() if "/step" in line), out
    assert (ck / "step-00000015").is_dir() and (ck / "latest").read_text().strip() == "step-00000030"

    # Resume at step 15: on the same N, bit for bit the uninterrupted run; on 4 ranks (MPI), within rounding.
    (same, out_same), (four, out_four) = in_parallel(
        (2, "mlp.py", *common, "--resume", ck / "step-00000015", "--checkpoint-dir", tmp_path / "a"),
        (4, "mlp.py", *common, "--resume", ck / "step-00000015", "--checkpoint-dir", tmp_path / "b"),
        backends=("ring", "mpi"),
    )
    assert sorted(same) == [20, 25, 30], out_same
    assert same == {s: two[s] for s in same}
    assert "4 rank(s)" in out_four
    assert_same_curve(four, {s: two[s] for s in four}, 1e-4, "mlp resumed on 4 ranks vs 2")


def test_charlm_and_bf16_finetune(tmp_path):
    ck = tmp_path / "charlm"
    lm = [*TINY_LM, "--steps", "16", "--lr", "1e-2", "--sample", "60"]
    (one, _), (two, out) = in_parallel(
        (1, "charlm.py", *lm),
        (2, "charlm.py", *lm, "--checkpoint-dir", ck),
        backends=("ring", "mpi"),
    )
    assert_falls(one, 0.5, "charlm N=1")
    assert_same_curve(one, two, 1e-4, "charlm N=1 (ring) vs N=2 (mpi)")
    sample = out.split("[rank 0] sample:\n", 1)[1].splitlines()
    assert sample[0] == "[rank 0] HAMLET." and len("".join(sample)) > 60, out

    # Fine-tune the checkpoint's weights in bf16 with fp32 master shards.
    tune = ["--weights", ck, "--heads", "2", "--steps", "16", "--log-every", "2", "--lr", "1e-2", "--batch-size", "16", "--sample", "0"]
    (t1, _), (t2, out2) = in_parallel(
        (1, "finetune_bf16.py", *tune),
        (2, "finetune_bf16.py", *tune, "--save-every", "8", "--checkpoint-dir", tmp_path / "tune"),
    )
    assert "bf16" in out2 and "fp32 master shards" in out2
    assert_falls(t2, 0.2, "finetune N=2")
    # bf16 gradients (8-bit mantissa) are averaged in a different order for N=1 and N=2
    # (measured differences up to 5e-4).
    assert_same_curve(t1, t2, 5e-3, "finetune N=1 vs N=2")
    resumed, out3 = launch(2, "finetune_bf16.py", *tune, "--resume", tmp_path / "tune" / "step-00000008")
    assert sorted(resumed) == [10, 12, 14, 16], out3
    assert resumed == {s: t2[s] for s in resumed}, "resume restores bf16 weights, fp32 masters and state exactly"
