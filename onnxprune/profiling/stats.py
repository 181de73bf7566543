"""Latency statistics (pure numpy): the figures every profile result reports."""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: The latency keys of every result, in report order.
LATENCY_KEYS = ("min", "mean", "p50", "p90", "p95", "p99", "max", "std")


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """min/mean/p50/p90/p95/p99/max/std of per-run latencies given in seconds, in milliseconds.

    Percentiles use numpy's default (linear interpolation between closest ranks); ``std`` is the
    population standard deviation (ddof=0).
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    values = (ms.min(), ms.mean(), p50, p90, p95, p99, ms.max(), ms.std())
    return {k: float(v) for k, v in zip(LATENCY_KEYS, values)}


def throughput(seconds: Sequence[float], batch_size: int) -> float:
    """Samples per second while inferring: ``batch_size * runs / sum(latencies)`` (one stream)."""
    total = float(np.sum(np.asarray(seconds, dtype=np.float64)))
    return batch_size * len(seconds) / total if total > 0 else float("inf")


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far repeated measurements of one figure disagree."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return float((v.max() - v.min()) / med) if med > 0 else 0.0
