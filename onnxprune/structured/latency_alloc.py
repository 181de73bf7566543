"""Latency-aware channel allocation (HALP, Shen et al. 2022): ``prune --target-speedup X`` /
``--target-latency MS`` on a hardware profile.

1. Per-layer latency tables of the prunable groups are measured on the profile (or read from the
   cache): :mod:`.latency_table`.
2. A greedy knapsack over the groups (:func:`knapsack`) removes, one kernel-friendly step at a time
   (multiples of the profile's ``channel_multiple``), the channels that cost the least per
   millisecond saved, until the estimated latency meets the budget. A step's cost is the fraction
   of the importance it loses plus ``macs_weight`` x the fraction of the MACs it removes: with
   importance alone (HALP) the knapsack also cuts MACs that buy little time (MobileNetV2 at 2x:
   3.4x fewer MACs), while the MACs term spends the cut where time per MAC is highest.
3. The pruned model is timed interleaved with the dense one on the profile (D P D P ...). The table
   estimate is only a guide: when the measured speedup misses the goal (or overshoots it by more
   than the tolerance), the estimated budget is rescaled by the measured error and the allocation
   runs again, up to ``max_iterations`` times. The best model that met the goal is kept (most
   importance); when none did, the fastest.
4. The kept model is timed again, in a fresh interleaved run, and *that* figure is reported
   (``achieved``): the run that picked it is the best of several noisy draws, so it is optimistic
   (the winner's curse). It stays in the summary as ``selection_estimate``; ``met`` is said of the
   fresh run.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ..channels.types import Group, KeepPlan
from ..core.errors import OnnxPruneError
from ..core.pruning_result import PruneResult
from .allocate import Limits, global_scores, group_limits, lower_bound, select, window_needs
from ..channels.analyze import analyze_channels
from ..core.prepare import prepare
from ..profiling.hw_profile import load_hw_profile
from ..profiling.runners import check_available
from .importance import SELF_NORMALIZED
from .prune import _check_args, _prune_prepared, _restore_io
from ..core.model_io import save_model
from ..channels.rewrite import apply_plan
from .latency_table import latency_table, layer_macs, static_view
from ..profiling import compare_models

#: default weight of the MACs a knapsack step removes against the importance it loses (both as
#: fractions of the whole): see :func:`knapsack`'s ``penalty`` and bench/bench_latency_alloc.py
MACS_WEIGHT = 4.0


@dataclass
class Choice:
    """The kept counts a group may take (descending, ``counts[0]`` = all) and the importance kept at each."""

    gid: int
    counts: list[int]
    kept: list[float]


def valid_counts(size: int, blocks: int, limits: Limits) -> list[int]:
    """Kept counts a group may take, largest first: all of it, then multiples of
    lcm(blocks, round_to) down to the limits (multiples of ``blocks`` when none fits)."""
    lo = lower_bound(size, blocks, limits)
    for unit in dict.fromkeys((math.lcm(blocks, int(limits.round_to)), blocks)):
        first = math.ceil(lo / unit) * unit
        if first <= size:
            steps = list(range(size // unit * unit, first - 1, -unit))
            return [size] + [c for c in steps if c != size]
    return [size]


def choice_for(group: Group, scores: np.ndarray, limits: Limits) -> Choice:
    """A :class:`Choice` whose importance is the sum of the kept (most important) scores."""
    counts = valid_counts(group.size, group.blocks, limits)
    desc = np.cumsum(np.sort(np.asarray(scores, dtype=np.float64))[::-1])
    return Choice(group.id, counts, [float(desc[c - 1]) if c else 0.0 for c in counts])


def knapsack(choices: Sequence[Choice], latency: Callable[[Mapping[int, int]], float],
             saving: Callable[[Mapping[int, int], int, int], float], budget: float,
             penalty: Callable[[Mapping[int, int], int, int], float] | None = None) -> tuple[dict[int, int], float]:
    """Greedy knapsack: from all channels kept, repeatedly take the step (one group to its next
    smaller count) that loses the least importance per unit of latency saved, until
    ``latency(counts) <= budget`` or no step saves anything. Returns (counts, estimated latency).

    ``saving(counts, gid, new)`` is the latency saved by moving group ``gid`` to ``new`` kept
    channels from ``counts`` (others unchanged): only the layers of that group need recomputing.
    ``penalty(counts, gid, new)``, in importance units, is added to a step's cost (the allocator
    charges the MACs a step removes, so that time is bought with as few MACs as possible)."""
    state = {c.gid: c.counts[0] for c in choices}
    pos = {c.gid: 0 for c in choices}
    lat = latency(state)
    while lat > budget:
        best: tuple[float, float, Choice] | None = None
        for c in choices:
            i = pos[c.gid]
            if i + 1 >= len(c.counts):
                continue
            saved = saving(state, c.gid, c.counts[i + 1])
            if saved <= 0:
                continue
            lost = c.kept[i] - c.kept[i + 1] + (penalty(state, c.gid, c.counts[i + 1]) if penalty else 0.0)
            cost = lost / saved
            if best is None or cost < best[0] or (cost == best[0] and saved > best[1]):
                best = (cost, saved, c)
        if best is None:
            break  # nothing left saves latency: the budget is out of reach within the limits
        c = best[2]
        pos[c.gid] += 1
        state[c.gid] = c.counts[pos[c.gid]]
        lat -= best[1]
    return state, lat


def next_budget(history: Sequence[tuple[float, float]], goal: float) -> float:
    """The estimated latency fraction to ask for next, from (estimated, measured) fractions so far.

    One point: rescale by its measured error. Two or more: the secant through the last two (the
    measured fraction is roughly affine in the estimate: layers the table does not see are a fixed
    part). Bounded to a factor 4 of the last estimate, so one noisy measurement cannot swing the
    budget to nothing or to the dense model."""
    e, m = history[-1]
    guess = e * goal / m
    if len(history) >= 2:
        e0, m0 = history[-2]
        if e != e0 and (m - m0) / (e - e0) > 0:
            guess = e + (goal - m) * (e - e0) / (m - m0)
    return min(1.0, max(e / 4, min(e * 4, guess)))


def _goal(target_speedup: float | None, target_latency_ms: float | None) -> Callable[[float], float]:
    """dense p50 -> the pruned/dense latency fraction the target asks for."""
    if target_speedup is not None:
        return lambda dense_ms: 1.0 / target_speedup
    return lambda dense_ms: target_latency_ms / dense_ms


def prune_for_latency(source: str | os.PathLike | onnx.ModelProto, hw, *, target_speedup: float | None = None,
                      target_latency_ms: float | None = None, criterion: str = "l1", round_to: int | None = None,
                      min_keep: int = 1, max_ratio: float = 0.9, ignore: Sequence[str] = (), seed: int = 0,
                      input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                      gradients: Mapping[str, np.ndarray] | None = None, cache: str | os.PathLike | None = None,
                      max_iterations: int = 3, tolerance: float = 0.03, macs_weight: float = MACS_WEIGHT,
                      calibration: Any = None) -> PruneResult:
    """Prune ``source`` to ``target_speedup`` (dense p50 / pruned p50) or ``target_latency_ms``
    (pruned p50) on hardware profile ``hw``, keeping the most importance (see the module docstring).

    ``round_to`` defaults to the profile's ``channel_multiple``, counted in weight columns
    (:func:`~.allocate.column_limits`: a head group keeps whole heads). ``macs_weight`` charges each step
    the fraction of the MACs it removes, times this weight, beside the fraction of importance it
    loses (0: importance only, as in HALP). The summary adds ``latency_allocation`` {profile,
    timing, met, achieved, selection_estimate, chosen, iterations, importance_kept, table} and a
    ``target`` of kind ``speedup`` or ``latency`` whose ``achieved`` comes from the fresh run.
    ``calibration`` (a :class:`onnxprune.calibration.StructuredCalibration`): the data-aware
    criterion ``activation`` and the re-fit of the chosen model, as in ``prune_structured``."""

    if (target_speedup is None) == (target_latency_ms is None):
        raise OnnxPruneError("give exactly one of --target-speedup X, --target-latency MS")
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup >= 1.0):
        raise OnnxPruneError(f"--target-speedup must be at least 1 (dense p50 / pruned p50), not {target_speedup:g}")
    if target_latency_ms is not None and not (math.isfinite(target_latency_ms) and target_latency_ms > 0):
        raise OnnxPruneError(f"--target-latency must be a positive number of milliseconds, not {target_latency_ms:g}")
    if max_iterations < 1:
        raise OnnxPruneError("max_iterations must be at least 1")
    if not (math.isfinite(macs_weight) and macs_weight >= 0):
        raise OnnxPruneError(f"macs_weight must be a number >= 0, not {macs_weight:g}")
    _check_args(0.0, None, None, criterion, "global", seed)
    profile = load_hw_profile(hw)
    check_available(profile)
    per_columns = round_to is None  # the profile's multiple counts weight columns (whole heads: column_limits)
    if round_to is None:
        round_to = profile.channel_multiple or 1
    limits = Limits(max_ratio=float(max_ratio), min_keep=min_keep, round_to=round_to, columns=per_columns)
    if isinstance(ignore, str):
        ignore = (ignore,)
    goal_of = _goal(target_speedup, target_latency_ms)

    with tempfile.TemporaryDirectory(prefix="onnxprune-halp-") as tmp:
        tmp_dir = Path(tmp)
        if isinstance(source, onnx.ModelProto):
            dense_path = save_model(source, tmp_dir / "dense.onnx")
        else:
            dense_path = Path(source)
        prep = prepare(source, input_shapes)
        analysis = analyze_channels(prep.view)
        info: dict[str, Any] = {}

        def plan_of(groups: list[Group], scores: dict[int, np.ndarray]) -> KeepPlan:
            info.update(_allocate(prep, analysis, groups, scores, profile, limits, dense_path, goal_of,
                                  self_normalized=criterion in SELF_NORMALIZED, cache=cache, tmp_dir=tmp_dir,
                                  max_iterations=max_iterations, tolerance=tolerance, macs_weight=macs_weight))
            return info.pop("plan")

        result = _prune_prepared(prep, analysis, kind="ratio", value=0.0, criterion=criterion, scope="global",
                                 limits=limits, ignore=tuple(ignore), seed=int(seed), gradients=gradients, plan_of=plan_of,
                                 calibration=calibration)
    s = result.summary
    if not info:  # no prunable group: nothing was allocated or measured
        info = {"met": False, "iterations": [], "note": "no prunable group"}
    got = info.get("achieved") or {}
    kind, value = ("speedup", target_speedup) if target_speedup is not None else ("latency", target_latency_ms)
    achieved = got.get("measured_speedup") if kind == "speedup" else got.get("pruned_p50_ms")
    s["target"] = {"kind": kind, "value": value, "achieved": achieved}
    s["latency_allocation"] = {"profile": profile.name, "timing": "interleaved", "macs_weight": macs_weight,
                               **{k: v for k, v in info.items()}}
    s["notes"].extend(_notes(info, profile.name, f"speedup {target_speedup:g}x" if kind == "speedup"
                             else f"p50 {target_latency_ms:g} ms"))
    return result


def _figures(m: Mapping[str, Any]) -> str:
    return f"{m['measured_speedup']:.2f}x (p50 {m['pruned_p50_ms']:.3f} ms vs dense {m['dense_p50_ms']:.3f} ms"


def _notes(info: Mapping[str, Any], profile: str, what: str) -> list[str]:
    """The summary's lines: the fresh run's figure first, the selection run's beside it."""
    notes = []
    untimed = (info.get("table") or {}).get("untimed") or []
    if untimed:
        nodes = sorted({u["node"] for u in untimed})
        notes.append(f"{len(untimed)} layer variant(s) of {', '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''} got no "
                     f"time from the per-node profiler on {profile}: those layers count as a fixed cost (no saving "
                     "credited for pruning them), never as 0 ms")
    got, sel = info.get("achieved"), info.get("selection_estimate")
    if not got or not sel:
        return notes
    fresh = f"{_figures(got)}, a fresh interleaved run; the run that selected it read {_figures(sel)})"
    if not info.get("met"):
        notes.append(f"target {what} on {profile} was NOT met: achieved {fresh}; raise --max-ratio, lower the target, "
                     "or check the unprunable groups")
    else:
        notes.append(f"latency-aware allocation on {profile}: achieved {fresh}, "
                     f"{info['importance_kept']:.1%} of the importance kept")
    return notes


def _allocate(prep, analysis, groups: list[Group], scores: dict[int, np.ndarray], profile, limits: Limits,
              dense_path: Path, goal_of, *, self_normalized: bool, cache, tmp_dir: Path, max_iterations: int,
              tolerance: float, macs_weight: float = 0.0) -> dict[str, Any]:
    """Table -> knapsack -> measured check, repeated with a rescaled budget (module docstring)."""

    if not groups:
        return {"plan": {}, "met": False, "iterations": []}
    view = static_view(prep.view)  # shapes at the given input shapes (a transformer's sequence length)
    table = latency_table(view, analysis, [g.id for g in groups], profile, dense_path,
                          input_shapes=prep.concrete_shapes, cache=None if cache is None else Path(cache))
    norm = {g.id: global_scores(scores[g.id], self_normalized) for g in groups}
    choices = [choice_for(g, norm[g.id], group_limits(g, limits)) for g in groups]
    total_importance = sum(c.kept[0] for c in choices) or 1.0
    by_group: dict[int, list] = {}
    for layer in table.layers:
        for gid in layer.groups:
            by_group.setdefault(gid, []).append(layer)

    def saving(counts: Mapping[int, int], gid: int, new: int) -> float:
        after = {**counts, gid: new}
        return table.scale * sum(l.ms(counts, table.sizes) - l.ms(after, table.sizes) for l in by_group.get(gid, ()))

    macs_full = {l.node: layer_macs(view, l) for l in table.layers}
    total_macs = sum(macs_full.values())
    macs_unit = macs_weight * total_importance / total_macs if total_macs > 0 else 0.0

    def macs_removed(counts: Mapping[int, int], gid: int, new: int) -> float:
        """MACs the step removes, in importance units (fraction of the layers' MACs x weight)."""
        after = {**counts, gid: new}
        return macs_unit * sum(macs_full[l.node] * (l.kept_fraction(counts, table.sizes)
                                                    - l.kept_fraction(after, table.sizes)) for l in by_group.get(gid, ()))

    def plan_for(counts: Mapping[int, int]) -> KeepPlan:
        return {g.id: select(scores[g.id], counts[g.id], g.blocks, window_needs(g, limits)) for g in groups}

    iterations: list[dict[str, Any]] = []
    plans: list[KeepPlan] = []
    paths: list[Path] = []
    budget_fraction = None
    last_counts: dict[int, int] = {}
    for _ in range(max_iterations):
        if budget_fraction is None:  # first pass: the goal against the table's own dense latency
            budget_fraction = goal_of(table.dense_ms)
        counts, est = knapsack(choices, table.estimate, saving, budget_fraction * table.dense_ms,
                               penalty=macs_removed if macs_unit > 0 else None)
        if iterations and counts == last_counts:
            break  # the rescaled budget gives the same model (e.g. every group at its limit)
        last_counts = counts
        plan = plan_for(counts)
        pruned = apply_plan(prep.model, analysis, plan, values=prep.view.const, check=False)
        _restore_io(pruned, prep.original)
        path = save_model(pruned, tmp_dir / f"candidate{len(plans)}.onnx")
        dense_ms, pruned_ms, where = _interleaved(dense_path, path, profile, prep.concrete_shapes)
        measured, goal = pruned_ms / dense_ms, goal_of(dense_ms)
        kept = sum(c.kept[c.counts.index(counts[c.gid])] for c in choices) / total_importance
        iterations.append({"budget_fraction": budget_fraction, "estimated_ms": est, "estimated_speedup": table.dense_ms / est,
                           "dense_p50_ms": dense_ms, "pruned_p50_ms": pruned_ms, "measured_speedup": dense_ms / pruned_ms,
                           "goal_fraction": goal, "met": measured <= goal, "importance_kept": kept,
                           "channels_kept": int(sum(counts.values())), "measured_on": where})
        plans.append(plan)
        paths.append(path)
        if measured <= goal and measured >= goal * (1.0 - tolerance):
            break  # met, without pruning much more than asked
        next_fraction = next_budget([(it["estimated_ms"] / table.dense_ms, it["pruned_p50_ms"] / it["dense_p50_ms"])
                                     for it in iterations], goal)
        if abs(next_fraction - budget_fraction) < 1e-6:
            break
        budget_fraction = next_fraction
    met = [i for i, it in enumerate(iterations) if it["met"]]
    best = max(met, key=lambda i: iterations[i]["importance_kept"]) if met else \
        max(range(len(iterations)), key=lambda i: iterations[i]["measured_speedup"])
    dense_ms, pruned_ms, where = _interleaved(dense_path, paths[best], profile, prep.concrete_shapes)
    goal = goal_of(dense_ms)
    achieved = {"dense_p50_ms": dense_ms, "pruned_p50_ms": pruned_ms, "measured_speedup": dense_ms / pruned_ms,
                "goal_fraction": goal, "met": pruned_ms / dense_ms <= goal, "timing": "interleaved, a fresh run",
                "measured_on": where}
    sel = iterations[best]
    return {"plan": plans[best], "met": achieved["met"], "achieved": achieved,
            "selection_estimate": {k: sel[k] for k in ("dense_p50_ms", "pruned_p50_ms", "measured_speedup", "met")},
            "chosen": {"iteration": best, **sel}, "iterations": iterations, "importance_kept": sel["importance_kept"],
            "table": {"cached": table.cached, "path": table.path, "layers": len(table.layers),
                      "measure_s": table.measure_s, "dense_ms": table.dense_ms, "measured_on": table.measured_on,
                      "untimed": table.untimed}}


def _interleaved(dense_path: Path, path: Path, profile, input_shapes) -> tuple[float, float, dict | None]:
    """(dense p50, pruned p50) in ms of one interleaved run (D P D P ...) on ``profile``, in fresh
    sessions, and where it was measured."""

    res = compare_models(dense_path, path, profile, input_shapes=input_shapes)
    cmp = res["comparisons"][0]
    return float(cmp["a"]["latency_ms"]["p50"]), float(cmp["b"]["latency_ms"]["p50"]), cmp.get("measured_on") or res.get("measured_on")
