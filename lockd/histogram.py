"""A histogram kept as plain numbers, for the metrics (lockd.metrics) to read when scraped.

Invariant: `counts[i]` is how many observed values fell in bucket i, the values at most
`bounds[i]` and above `bounds[i - 1]` (the last bucket: above every bound), and `total` is
their sum; observing costs a bisect and two additions, and reading changes nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Histogram:
    """Counts of observed values per bucket, and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        """`bounds`: the buckets' upper bounds, increasing (a last bucket, +Inf, is added)."""
        assert list(bounds) == sorted(set(bounds)), bounds
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (Prometheus'
        # `le` is "less than or equal").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus exposes them: (`le`, values at most it), +Inf last."""
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((_le(bound), float(running)))
        return buckets


def _le(bound: float) -> str:
    """A bound as Prometheus clients write `le`: 0.5, 1.0, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
