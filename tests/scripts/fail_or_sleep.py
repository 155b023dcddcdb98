"""Rank script: ``fail_or_sleep.py PIDDIR FAILING_RANK N``.

Every rank writes ``PIDDIR/<rank>.pid``. The failing rank waits until all N pid
files exist, then raises (exit code 1); the others sleep 60 s.
"""

import os
import sys
import time
from pathlib import Path

piddir, failing, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
(piddir / f"{rank}.pid").write_text(str(os.getpid()))
if rank != failing:
    time.sleep(60)
    sys.exit(0)
while len(list(piddir.glob("*.pid"))) < n:
    time.sleep(0.05)
print(f"rank {rank} is failing now", flush=True)
raise RuntimeError("deliberate failure")
