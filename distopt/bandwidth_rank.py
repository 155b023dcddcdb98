"""One rank of ``distopt doctor``'s bandwidth test (run by ``distopt launch``, not imported).

    distopt launch -n 2 distopt/bandwidth_rank.py MIB REPEATS

Checks that ``all_sum`` of ``MIB`` MiB of float32 is right, then times it ``REPEATS``
times; rank 0 prints ``BANDWIDTH {"bytes": ..., "seconds": median, "size": N}``.
"""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder is distopt/: keep its modules from shadowing others
    import json
    import time

    import mlx.core as mx

    import distopt

    group = distopt.init()
    n, size = int(sys.argv[1]) * 2**20 // 4, group.size()
    x = mx.full((n,), float(group.rank() + 1))
    expected = size * (size + 1) / 2
    y = mx.distributed.all_sum(x, group=group)
    mx.eval(y)
    if not (y[0].item() == expected and y[-1].item() == expected):
        sys.exit(f"all_sum gave {y[0].item()}, expected {expected}")
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - start)
    if group.rank() == 0:
        print("BANDWIDTH " + json.dumps({"bytes": n * 4, "seconds": sorted(times)[len(times) // 2], "size": size}))
