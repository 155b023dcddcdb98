"""Run every fault many times on real ranks and print how each ended.

    python benchmarks/stress_faults.py                    # 10 runs of each case (about 30-40 min here)
    python benchmarks/stress_faults.py --repeat 2 --backends ring --sizes 2

Faults (``tests/scripts/fault_train.py`` through ``distopt launch``, random rank and
step each run): ``kill9`` (SIGKILL from outside), ``raise`` (an exception mid-step),
``hang`` (a rank stops taking part), ``nojoin`` (a rank never calls init) and
``sigterm`` (SIGTERM to the launcher, as Ctrl-C). A run passes when the launcher exits
non-zero within deadline + 10 s of the fault, no process of the job is left, the
output names the cause, and the last checkpoint (saved every 5 steps) loads.
"""

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))
from fault_harness import checkpoint_problem, run_fault  # noqa: E402

FAULTS = ["kill9", "raise", "hang", "nojoin", "sigterm"]


def cause_text(backend, fault, rank, step):
    """A line the output must hold: the cause, named."""
    return {
        "kill9": f"rank {rank} was killed by SIGKILL" if backend == "ring" else f"process rank {rank} with PID",
        "raise": f"RuntimeError: injected fault at step {step}",
        "hang": "did not complete (its reduce-scatter / all-gather never finished)",
        "nojoin": "backend did not complete within",
        "sigterm": "received SIGTERM; stopping all ranks",
    }[fault]


def one_run(backend, n, fault, deadline, rng):
    rank = rng.randrange(n)
    step = rng.randrange(6, 20)
    with tempfile.TemporaryDirectory(prefix="distopt-stress-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        run = run_fault(backend, n, fault, rank, step, deadline=deadline, steps=40, ckpt=ckpt, limit=120)
        problems = []
        if run.code == 0:
            problems.append("exit code 0")
        if run.leftovers:
            problems.append(f"left processes {run.leftovers}")
        if not run.gone_after <= deadline + 10:
            problems.append(f"ended {run.gone_after:.1f} s after the fault")
        if not run.find(cause_text(backend, fault, rank, step)):
            problems.append("cause not named")
        if fault != "nojoin" and checkpoint_problem(run, ckpt):
            problems.append(checkpoint_problem(run, ckpt))
    return run, problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["ring", "mpi"])
    p.add_argument("--sizes", nargs="+", type=int, default=[2, 4])
    p.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    p.add_argument("--deadline", type=float, default=5.0, help="DISTOPT_TIMEOUT of the ranks (s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    print(f"deadline {args.deadline:g} s; a run passes if all processes are gone within {args.deadline + 10:g} s "
          "of the fault, exit code != 0, cause named, last checkpoint loads", flush=True)
    print(f"{'backend':7} {'N':>2} {'fault':8} {'passed':>7} {'exit codes':16} {'gone after fault (s) median/max':>32}")
    failures = 0
    for backend in args.backends:
        for n in args.sizes:
            for fault in args.faults:
                runs = [one_run(backend, n, fault, args.deadline, rng) for _ in range(args.repeat)]
                bad = [(run, problems) for run, problems in runs if problems]
                failures += len(bad)
                codes = ",".join(str(c) for c in sorted({run.code for run, _ in runs}))
                gone = [run.gone_after for run, _ in runs]
                print(f"{backend:7} {n:2d} {fault:8} {len(runs) - len(bad):3d}/{len(runs):<3d} {codes:16} "
                      f"{statistics.median(gone):15.1f} / {max(gone):.1f}", flush=True)
                for run, problems in bad:
                    print(f"    FAILED: {'; '.join(problems)}\n" + "\n".join("      " + line for line in run.text.splitlines()[-15:]))
    print(f"{failures} failed run(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
