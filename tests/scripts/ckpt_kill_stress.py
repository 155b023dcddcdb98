"""Stress (prints figures): SIGKILL a saving process at random moments; the latest checkpoint must load.

    python tests/scripts/ckpt_kill_stress.py [--runs 30] [--hidden 300000]

Each run resumes from ROOT/latest, trains one step and saves (keep_last=2); this script
kills it (SIGKILL) a random time after the save starts, up to 1.2 times a save's duration. After every kill the
latest checkpoint is loaded and its files checked; the step may only stay or advance by one.
"""

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distopt  # noqa: E402
from ckpt_common import make_model, make_optimizer  # noqa: E402
from distopt.consolidate import summary  # noqa: E402


def run(root, hidden, kill_after=None):
    """Run one resume-train-save; with ``kill_after``, SIGKILL it that long after it starts saving.

    Returns the save's duration (no kill), or whether the process was killed.
    """
    cmd = [sys.executable, str(HERE / "ckpt_crash.py"), str(root), "2", str(hidden)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("SAVING") and kill_after is not None:
            time.sleep(kill_after)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                return True
        if line.startswith("SAVED"):
            seconds = float(line.split()[-1])
    proc.wait(timeout=120)
    assert proc.returncode == 0
    return seconds if kill_after is None else False


def latest_step(root, hidden):
    model, opt = make_model(hidden=hidden), make_optimizer("adamax", plain=True)
    distopt.load_checkpoint(root, model, opt)
    assert all(v == "ok" for v in summary(root)["check"].values())
    return int(opt.step.item())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=300000)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp()) / "run"
    run(root, args.hidden)
    save = run(root, args.hidden)  # how long a save takes
    step = first = latest_step(root, args.hidden)
    killed = mid_save = 0
    for i in range(args.runs):
        tmp_before = {p.name for p in root.iterdir() if p.name.startswith(".tmp-step")}
        was_killed = run(root, args.hidden, kill_after=random.uniform(0, 1.2 * save))
        killed += was_killed
        mid_save += was_killed and any(p.name.startswith(".tmp-step") and p.name not in tmp_before for p in root.iterdir())
        new = latest_step(root, args.hidden)
        assert new in (step, step + 1), (step, new)
        step = new
    print(f"{args.runs} saves of ~{save:.2f} s; {killed} SIGKILLed at a random moment up to 1.2x a save's duration: "
          f"{mid_save} mid-save (a temporary directory left), {step - first} after publishing; "
          "after every run the latest checkpoint loaded and its sha256s verified")  # fmt: skip
    shutil.rmtree(root.parent)


if __name__ == "__main__":
    main()
