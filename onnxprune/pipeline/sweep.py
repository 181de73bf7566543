"""Sweep expansion: methods x operating points x seeds -> the runs of a recipe.

Each run has a stable id (``<method>-<point>-s<seed>``, used for ``OUTDIR/models/<id>.onnx``) and an
operating-point id without the seed (``<method>-<point>``) under which seeds are aggregated into
mean ± std. A stage without its own target takes the point's target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..recipes.schema import Recipe, Schedule, Stage, Target
from ..core.errors import OnnxPruneError


@dataclass(frozen=True)
class RunSpec:
    """One pruned model to produce: a method at an operating point with a seed."""

    method: str
    point: str  # operating-point label ("c4", "macs0.5", "default")
    seed: int
    stages: tuple[Stage, ...]
    schedule: Schedule
    target: Target | None = None

    @property
    def id(self) -> str:
        return f"{self.method}-{self.point}-s{self.seed}"

    @property
    def point_id(self) -> str:
        """The operating point this run belongs to (seeds aggregated)."""
        return f"{self.method}-{self.point}"

    def config(self) -> dict[str, Any]:
        """JSON form, used for the step cache key and the report's settings."""
        return {
            "method": self.method,
            "point": self.point,
            "seed": self.seed,
            "target": self.target.model_dump(exclude_none=True) if self.target else None,
            "stages": [s.model_dump(exclude_none=True) for s in self.stages],
            "schedule": self.schedule.model_dump(),
        }


@dataclass
class Plan:
    runs: list[RunSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    @property
    def point_ids(self) -> list[str]:
        return list(dict.fromkeys(r.point_id for r in self.runs))

    def runs_of(self, point_id: str) -> list[RunSpec]:
        return [r for r in self.runs if r.point_id == point_id]


def expand(recipe: Recipe) -> Plan:
    """All runs of ``recipe`` in a deterministic order (method, point, seed)."""
    runs: list[RunSpec] = []
    seeds = list(dict.fromkeys(recipe.sweep.seeds))
    for method in recipe.methods():
        points: list[Target | None] = list(recipe.points_of(method)) or [None]
        for target in points:
            stages = tuple(_with_target(s, target) for s in method.stages)
            label = target.label() if target is not None else _own_label(stages)
            for seed in seeds:
                runs.append(RunSpec(method=method.name, point=label, seed=seed, stages=stages,
                                    schedule=recipe.schedule_of(method), target=target))
    ids = [r.id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise OnnxPruneError(f"recipe: field 'sweep': operating points repeat ({', '.join(dup)}); "
                             "expected distinct points per method")
    return Plan(runs=runs, seeds=seeds)


def _with_target(stage: Stage, target: Target | None) -> Stage:
    if stage.target is not None or target is None or stage.kind == "nm":
        return stage
    return stage.model_copy(update={"target": target})


def _own_label(stages: tuple[Stage, ...]) -> str:
    """Point label from the stages' own targets ("macs0.5", "2:4", "macs0.5+2:4")."""
    parts = []
    for s in stages:
        if s.kind == "nm":
            parts.append(f"{s.n}of{s.m}")
        elif s.target is not None:
            parts.append(s.target.label())
        elif s.per_layer is not None:
            parts.append("per-layer")
    return "+".join(parts) or "default"
