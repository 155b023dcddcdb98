"""How far a bench ratio can be trusted: a distribution-free interval for a median.

Step times on a shared machine are far from normal (one process's forward+backward on
the 2-core CI VM spreads over 283-537 ms, with no pattern from step to step), so the
interval comes from order statistics, not from a mean and a standard deviation. For
``n`` sorted samples :math:`x_{(1)} \\le \\dots \\le x_{(n)}` of any continuous
distribution, the median lies in :math:`[x_{(k)}, x_{(n+1-k)}]` with probability

.. math::

    1 - 2 \\, P(\\mathrm{Bin}(n, \\tfrac12) \\le k - 1)

and the largest ``k`` that keeps this at least the confidence gives the tightest such
interval. Written here (a dozen lines) rather than taken from SciPy, which the project
does not otherwise need.
"""

import math
import statistics


def median_interval(values, confidence=0.9):
    """``(low, high)``: an interval holding the median of ``values``' distribution with
    probability at least ``confidence``; ``None`` when there are too few values for one
    (fewer than 5 at 90%)."""
    xs, n = sorted(values), len(values)
    k, below = 0, 0.0  # below = P(Bin(n, 1/2) <= k - 1)
    while k < n // 2:
        below_next = below + math.comb(n, k) / 2**n
        if 1 - 2 * below_next < confidence:
            break
        k, below = k + 1, below_next
    return (xs[k - 1], xs[n - k]) if k else None


def paired_ratio(ours, theirs, confidence=0.9):
    """The per-repeat ratios ``ours[i] / theirs[i]`` of two methods timed rep by rep in
    turn: ``(median, interval)``, with :func:`median_interval`'s interval (or ``None``)."""
    per_rep = [a / b for a, b in zip(ours, theirs, strict=True)]
    return statistics.median(per_rep), median_interval(per_rep, confidence)
