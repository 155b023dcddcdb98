"""Rank script: resume ROOT if it has a checkpoint, train one step, save (may be told to crash).

    ckpt_crash.py ROOT [KEEP_LAST [HIDDEN]]   (DISTOPT_CKPT_CRASH=point[:rank] makes the save die)
"""

import sys
import time

import distopt
from ckpt_common import make_model, make_optimizer, train

root = sys.argv[1]
keep_last = int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) > 0 else None
hidden = int(sys.argv[3]) if len(sys.argv) > 3 else 13
group = distopt.init()
model, opt = make_model(hidden=hidden), make_optimizer("adamax")
try:
    distopt.load_checkpoint(root, model, opt)
except distopt.CheckpointError as e:
    print(f"fresh start: {e}", flush=True)
step = int(opt.step.item())
train(model, opt, step, step + 1)
print("SAVING", flush=True)
start = time.perf_counter()
path = distopt.save_checkpoint(root, model, opt, keep_last=keep_last)
print(f"SAVED {path} {time.perf_counter() - start:.3f}", flush=True)
