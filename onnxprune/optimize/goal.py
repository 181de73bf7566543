"""What ``onnxprune optimize`` must reach (the goal) and must keep (the quality bound).

The goal is a measured speed: ``--target-speedup X`` (dense p50 / candidate p50, timed interleaved on
the profile) or ``--target-latency MS`` (candidate p50). The bound compares a candidate with the
dense model on the held-out (val) split: ``--max-drop PCT`` on the task metric (labels' top-1, or the
first figure of ``--metric``), or ``--min-fidelity X`` (top-1 agreement for class-score outputs,
cosine otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.errors import OnnxPruneError


@dataclass(frozen=True)
class Goal:
    """``kind`` is ``speedup`` (value: X) or ``latency`` (value: ms)."""

    kind: str
    value: float

    @classmethod
    def of(cls, target_speedup: float | None, target_latency_ms: float | None) -> "Goal":
        if (target_speedup is None) == (target_latency_ms is None):
            raise OnnxPruneError("give exactly one goal: --target-speedup X or --target-latency MS")
        if target_speedup is not None:
            if not (math.isfinite(target_speedup) and target_speedup > 1.0):
                raise OnnxPruneError("--target-speedup must be a number above 1 (dense p50 / pruned p50), "
                                     f"not {target_speedup:g}")
            return cls("speedup", float(target_speedup))
        if not (math.isfinite(target_latency_ms) and target_latency_ms > 0):
            raise OnnxPruneError(f"--target-latency must be a positive number of milliseconds, not {target_latency_ms:g}")
        return cls("latency", float(target_latency_ms))

    def speedup_for(self, dense_ms: float) -> float:
        """The speedup over the dense model this goal asks for."""
        return self.value if self.kind == "speedup" else dense_ms / self.value

    def met(self, speed: Mapping[str, float]) -> bool:
        """``speed``: ``{"speedup", "p50_ms", "dense_p50_ms"}`` of one interleaved measurement."""
        if self.kind == "speedup":
            return speed["speedup"] >= self.value
        return speed["p50_ms"] <= self.value

    def text(self) -> str:
        return f"{self.value:g}x speedup" if self.kind == "speedup" else f"p50 {self.value:g} ms"


@dataclass(frozen=True)
class Bound:
    """``kind`` is ``max_drop`` (value: percentage points of the task metric; with a custom
    ``metric``, percent of the dense value) or ``min_fidelity`` (value in [0, 1])."""

    kind: str
    value: float
    metric: str | None = None
    #: declared ``{output: scores|probs|embedding|value}`` (``--output-kind``); the rest inferred from the graph
    output_kinds: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, max_drop: float | None, min_fidelity: float | None, metric: str | None, labeled: bool,
           output_kinds: Mapping[str, str] | None = None) -> "Bound":
        if (max_drop is None) == (min_fidelity is None):
            raise OnnxPruneError("give exactly one quality bound: --max-drop PCT or --min-fidelity X")
        if max_drop is not None:
            if not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
                raise OnnxPruneError(f"--max-drop must be a percentage in [0, 100], not {max_drop:g}")
            if not labeled and metric is None:
                raise OnnxPruneError("--max-drop needs labels (top-1 accuracy) or --metric python:module:function; "
                                     "on unlabeled data use --min-fidelity X")
            return cls("max_drop", float(max_drop), metric, dict(output_kinds or {}))
        if not (math.isfinite(min_fidelity) and 0 < min_fidelity <= 1):
            raise OnnxPruneError(f"--min-fidelity must be in (0, 1], not {min_fidelity:g}")
        return cls("min_fidelity", float(min_fidelity), metric, dict(output_kinds or {}))

    def score(self, quality: Mapping[str, Any]) -> float:
        """The one number the bound is about, from :func:`onnxprune.optimize.quality.measure_quality`."""
        return float(quality["task"] if self.kind == "max_drop" else quality["fidelity"])

    def drop(self, quality: Mapping[str, Any], dense: Mapping[str, Any]) -> float | None:
        """The drop from the dense model in the bound's unit (percentage points, or percent of a
        custom metric's dense value); None for a fidelity bound."""
        if self.kind != "max_drop":
            return None
        d, c = float(dense["task"]), float(quality["task"])
        if self.metric is None:
            return 100.0 * (d - c)
        return 100.0 * (d - c) / abs(d) if d else 100.0 * (d - c)

    def holds(self, quality: Mapping[str, Any], dense: Mapping[str, Any]) -> bool:
        if self.kind == "max_drop":
            return self.drop(quality, dense) <= self.value + 1e-9
        return self.score(quality) >= self.value - 1e-12

    def text(self) -> str:
        if self.kind == "min_fidelity":
            return f"fidelity >= {self.value:g}"
        return f"drop <= {self.value:g}" + (" % of the metric" if self.metric else " points of top-1")
