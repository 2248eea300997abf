"""Summaries of timing samples.

Invariant: every figure is computed from the raw samples of one run by the nearest-rank rule,
so a percentile is always a value that was actually measured.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `samples`; NaN if there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median of `values`, ignoring NaNs; NaN if none is left."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    """min/p50/p99/max in µs and the count of `samples_ns` (nanoseconds)."""
    ordered = sorted(samples_ns)
    return {
        "n": len(ordered),
        "min_us": (ordered[0] / 1000) if ordered else math.nan,
        "p50_us": percentile(ordered, 50) / 1000,
        "p99_us": percentile(ordered, 99) / 1000,
        "max_us": (ordered[-1] / 1000) if ordered else math.nan,
    }
