"""Find the pruning ratio that meets a MACs or params target (``--target-macs F`` / ``--target-params F``).

``F`` is the fraction *kept* (0.5 = a 2x reduction). The search measures the real pruned model at
each step (the caller's ``measure``), because channel counts are integers and coupled groups, limits
and unprunable layers make any closed-form estimate drift. Kept fraction only goes down as the ratio
goes up, so bisection finds the smallest ratio whose model meets the target; groups that this
last ratio step cut are then given back their channels one by one wherever the target still holds
(:func:`fill_up`), so the result is at or just under the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..channels.types import KeepPlan
from ..core.errors import OnnxPruneError

#: Bisection stops when the ratio bracket is this narrow (finer than one channel of a 4096-wide layer).
RATIO_TOL = 1e-4


@dataclass
class SearchResult:
    ratio: float
    plan: KeepPlan
    achieved: float  # kept fraction measured on the pruned model
    evaluations: int  # distinct plans measured


def plan_key(plan: KeepPlan) -> tuple:
    """A hashable identity of ``plan`` (many ratios give the same plan: counts are integers)."""
    return tuple(sorted((gid, np.asarray(kept, dtype=np.int64).tobytes()) for gid, kept in plan.items()))


def find_ratio(plan_for: Callable[[float], KeepPlan], measure: Callable[[KeepPlan], float], target: float,
               max_ratio: float, *, kind: str = "macs", limits_text: str = "") -> SearchResult:
    """Smallest ratio in [0, max_ratio] whose plan keeps at most ``target`` of the figure.

    ``measure(plan)`` returns the kept fraction (after / before) of the pruned model; results are
    cached per :func:`plan_key`, so the real model is built once per distinct plan."""
    if not 0.0 < target <= 1.0:
        raise OnnxPruneError(f"--target-{kind} must be in (0, 1] (the fraction kept), got {target}")
    cache: dict[tuple, float] = {}

    def cost(plan: KeepPlan) -> float:
        key = plan_key(plan)
        if key not in cache:
            cache[key] = float(measure(plan))
        return cache[key]

    def evaluate(r: float) -> tuple[KeepPlan, float]:
        plan = plan_for(r)
        return plan, cost(plan)

    plan0, f0 = evaluate(0.0)
    if f0 <= target:
        return SearchResult(0.0, plan0, f0, len(cache))
    hi_plan, f_hi = evaluate(max_ratio)
    if f_hi > target:
        raise OnnxPruneError(
            f"--target-{kind} {target:g} is unreachable: pruning every group to its limit "
            f"({limits_text or f'--max-ratio {max_ratio:g}'}) still keeps {f_hi:.3f} of the {kind}; "
            f"raise the target, relax the limits, or check the unprunable groups (onnxprune analyze)")
    lo, hi = 0.0, max_ratio
    while hi - lo > RATIO_TOL:
        mid = (lo + hi) / 2
        plan, f = evaluate(mid)
        if f <= target:
            hi, hi_plan, f_hi = mid, plan, f
        else:
            lo = mid
    plan, f = fill_up(hi_plan, f_hi, plan_for(lo), target, cost)
    return SearchResult(hi, plan, f, len(cache))


def fill_up(plan: KeepPlan, kept: float, larger: KeepPlan, target: float,
            cost: Callable[[KeepPlan], float]) -> tuple[KeepPlan, float]:
    """``plan`` (under the target) with groups given back, one at a time, the channels ``larger``
    (the plan one ratio step below, over the target) keeps, wherever the model stays under it
    (``cost``: the kept fraction of a plan, memoized by the search).

    One ratio step can cut many channels at once: every head group of a 4-head model goes from 2
    heads to 1 at the same ratio, so ``--target-macs 0.5`` would land at 0.36 when 2 heads in one
    layer and 1 in the other meets it. Giving back is greedy, group by group in the plan's order."""
    for gid in plan:
        if len(larger.get(gid, ())) <= len(plan[gid]):
            continue
        trial = {**plan, gid: larger[gid]}
        f = cost(trial)
        if f <= target:
            plan, kept = trial, f
    return plan, kept
