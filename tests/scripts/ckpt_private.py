"""Rank script: rank 1 sees its own, private ROOT (a tmpfs in its own mount namespace),
as on two Macs without a shared volume. Saving must fail on every rank, clearly.

    ckpt_private.py ROOT        (needs root and util-linux ``unshare``)
"""

import os
import sys

root = sys.argv[1]
if os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1" and "CKPT_PRIVATE" not in os.environ:
    os.makedirs(root, exist_ok=True)
    os.environ["CKPT_PRIVATE"] = "1"
    script = f"mount -t tmpfs none {root} && exec {sys.executable} {' '.join(sys.argv)}"
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])

import distopt  # noqa: E402
from ckpt_common import make_model, make_optimizer, train  # noqa: E402

group = distopt.init()
model, opt = make_model(), make_optimizer("adamax")
train(model, opt, 0, 1)
try:
    distopt.save_checkpoint(root, model, opt)
    print("CKPT saved", flush=True)
except distopt.CheckpointError as e:
    print(f"CKPT error {e}", flush=True)
print("CKPT listing " + " ".join(sorted(os.listdir(root))), flush=True)
