"""Latency-aware target: prune until the profile's latency budget is met, measured on the profile.

Structured pruning only (zeros do not make dense kernels faster). Bisection over the channel ratio
in ``[0, max_ratio]``: every probe prunes the dense model at a ratio, writes it, and measures the
chosen latency percentile on the profile; the search keeps the smallest ratio that met the budget
once the interval is narrower than ``tolerance``. Latency is noisy and not strictly monotone in the
ratio, so the final model's latency is measured again (after retraining) by the pipeline, and the
report states both: the probe that chose the ratio is ``latency_search.selection_estimate_ms`` (the
best of several noisy draws, so optimistic), the pipeline's own fresh measurement is the figure of
record.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..core.errors import OnnxPruneError
from ..recipes.schema import LatencyTarget, Stage, Target
from . import steps
from ..profiling.provenance import merge_measured_on


def bisect_ratio(latency_at: Callable[[float], float], budget: float, max_ratio: float,
                 tolerance: float) -> tuple[float, list[dict[str, float]]]:
    """Smallest ratio in [0, max_ratio] (to ``tolerance``) whose latency meets ``budget``, and the probes.

    Raises when even ``max_ratio`` misses the budget. Ratio 0 (the dense model) is returned when it
    already meets it.
    """
    probes: list[dict[str, float]] = []

    def probe(r: float) -> bool:
        lat = float(latency_at(r))
        probes.append({"ratio": r, "latency_ms": lat})
        return lat <= budget

    if probe(0.0):
        return 0.0, probes
    if not probe(max_ratio):
        best = probes[-1]["latency_ms"]
        raise OnnxPruneError(f"latency budget {budget:g} ms is out of reach: {best:.3f} ms at the largest ratio "
                             f"{max_ratio:g} (raise target.latency.max_ratio or the budget)")
    lo, hi = 0.0, max_ratio
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return hi, probes


def prune_to_latency(source: str | os.PathLike, stage: Stage, hw_profile, seed: int,
                     measure: Callable[[str, Any], float] | None = None):
    """Prune ``source`` (a path) with ``stage`` until ``stage.target.latency`` is met; the
    :class:`PruneResult` of the chosen ratio, its summary extended with ``latency_search``."""

    lt: LatencyTarget = stage.target.latency
    if stage.kind != "structured":
        raise OnnxPruneError("a latency target needs kind: structured (zeros do not make dense kernels faster)")
    if lt.profile != hw_profile.name:
        raise OnnxPruneError(f"latency target names profile {lt.profile!r}, which this run does not measure on "
                             f"(profiles: {hw_profile.name}); add it with --hw {lt.profile}")
    where: list = []  # measured_on of each probe (when the default measure runs them)
    measure = measure or _measure_percentile(lt.percentile, where)
    results: dict[float, Any] = {}
    if stage.hw is None:  # the probes' ratio targets drop the latency target: keep its profile's channel multiple
        stage = stage.model_copy(update={"hw": lt.profile})

    def at(r: float) -> float:
        if r == 0.0:
            return measure(str(source), hw_profile)
        res = steps.prune_stage(source, stage.model_copy(update={"target": Target(ratio=r)}), seed)
        results[r] = res
        with tempfile.TemporaryDirectory(prefix="onnxprune-lat-") as tmp:
            path = Path(tmp) / "probe.onnx"
            steps.save(res.model, path)
            return measure(str(path), hw_profile)

    ratio, probes = bisect_ratio(at, lt.budget_ms, lt.max_ratio, lt.tolerance)
    if ratio == 0.0:
        res = steps.prune_stage(source, stage.model_copy(update={"target": Target(ratio=0.0)}), seed)
    else:
        res = results[ratio]
    chosen = [p["latency_ms"] for p in probes if p["ratio"] == ratio]
    res.summary["latency_search"] = {"profile": lt.profile, "percentile": lt.percentile, "budget_ms": lt.budget_ms,
                                     "ratio": ratio, "selection_estimate_ms": chosen[-1] if chosen else None,
                                     "probes": probes}
    if where:
        res.summary["latency_search"]["measured_on"] = merge_measured_on(where)
    return res


def _measure_percentile(percentile: str, where: list | None = None) -> Callable[[str, Any], float]:
    def measure(path: str, hw_profile) -> float:
        rec = steps.profile(path, hw_profile, memory=False)["results"][0]
        if where is not None:
            where.append(rec.get("measured_on"))
        return float(rec["latency_ms"][percentile])

    return measure


def is_latency(stage: Stage) -> bool:
    return stage.target is not None and stage.target.kind == "latency"


__all__ = ["bisect_ratio", "prune_to_latency", "is_latency"]
