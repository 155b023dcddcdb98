"""Rank script: ``sleeper.py PIDDIR [ignore-term]``: write ``PIDDIR/<rank>.pid``, sleep 60 s.

With ``ignore-term`` the rank ignores SIGTERM, so only SIGKILL stops it.
"""

import os
import signal
import sys
import time
from pathlib import Path

rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
if sys.argv[2:] == ["ignore-term"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path(sys.argv[1], f"{rank}.pid").write_text(str(os.getpid()))
print(f"rank {rank} sleeping", flush=True)
time.sleep(60)
