"""Rank script: all_sum of (rank + 1) over the launched group, printed by every rank.

Also echoes its arguments and ``DISTOPT_TEST_VAR`` so tests can see what reached it.
"""

import os
import sys

import mlx.core as mx

import distopt.group as g

group = g.init()
total = mx.distributed.all_sum(mx.array(group.rank() + 1), group=group).item()
print(
    f"rank={group.rank()} size={group.size()} backend={g.backend_of(group)} sum={total} "
    f"args={sys.argv[1:]} var={os.environ.get('DISTOPT_TEST_VAR')}"
)
