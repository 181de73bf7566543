"""``onnxprune optimize``: from a model, a speed goal on a hardware profile, a quality bound and a
budget to the model to ship, trying the cheapest path first (see :mod:`.search`).

- :mod:`.goal`: the goal (``--target-speedup`` / ``--target-latency``) and the bound (``--max-drop`` /
  ``--min-fidelity``)
- :mod:`.steps`: one call per piece (allocation, calibration, distillation, quantization, timing, quality)
- :mod:`.search`: the escalation and the run cache
- :mod:`.report`, :mod:`.recipe`: ``OUTDIR/report.{json,md,html}`` and ``OUTDIR/recipe.yaml``
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..core.errors import OnnxPruneError
from .goal import Bound, Goal
from . import recipe as recipe_mod, report as report_mod, steps
from .search import copy_chosen, verdicts, Search, Settings
from ..datasets import load_dataset
from ..core.model_io import load_graph, refuse_overwrite_input
from ..pipeline.cache import StepCache
from ..profiling.hw_profile import load_hw_profile
from ..profiling.runners import check_available

__all__ = ["optimize", "start_search", "Goal", "Bound"]


def optimize(model: str | os.PathLike, outdir: str | os.PathLike, *, hw: str, data: Any,
             target_speedup: float | None = None, target_latency_ms: float | None = None,
             max_drop: float | None = None, min_fidelity: float | None = None, metric: str | None = None,
             max_epochs: int = 0, time_budget_min: float | None = None, batch_size: int | None = None,
             quantize: bool = False, bisect_steps: int = 4, seed: int = 0,
             output_kinds: Mapping[str, str] | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the search and write ``outdir``/{model.onnx, report.json, report.md, report.html, recipe.yaml}.

    Returns the report (``reached`` False when the goal was not met within the bound: the best model
    found is written all the same). The val split chooses; the test split is scored once, for the
    chosen model and the dense one."""

    t0 = time.perf_counter()
    model, outdir = Path(model), Path(outdir)
    search = start_search(model, outdir, hw=hw, data=data, target_speedup=target_speedup,
                          target_latency_ms=target_latency_ms, max_drop=max_drop, min_fidelity=min_fidelity,
                          metric=metric, max_epochs=max_epochs, time_budget_min=time_budget_min, batch_size=batch_size,
                          quantize=quantize, bisect_steps=bisect_steps, seed=seed, log=log, output_kinds=output_kinds)
    goal, bound, ds, cache, batch, dense_q = (search.s.goal, search.s.bound, search.data, search.cache, search.batch,
                                              search.dense_quality)
    profile = search.profile
    chosen = search.run()
    verdicts(search.candidates, chosen, bound, goal)

    if chosen is not None:
        copy_chosen(cache.outdir / chosen["file"], outdir / "model.onnx")
        test = {"chosen": steps.measure_quality(outdir / "model.onnx", model, ds, "test", bound),
                "dense": steps.measure_quality(model, model, ds, "test", bound)}
    else:
        copy_chosen(model, outdir / "model.onnx")
        test = {}
        search.notes.append("no candidate beat the dense model within the bound: model.onnx is the dense model")
    reached = bool(chosen and chosen["meets_goal"] and chosen["within_bound"])
    report: dict[str, Any] = {
        "model": str(model), "output": str(outdir / "model.onnx"), "profile": profile.name, "batch_size": batch,
        "goal": {"kind": goal.kind, "value": goal.value}, "goal_text": goal.text(),
        "bound": {"kind": bound.kind, "value": bound.value, "metric": metric}, "bound_text": bound.text(),
        "budget": {"max_epochs": int(max_epochs), "time_budget_min": time_budget_min},
        "data": ds.describe(), "dense": {"quality": dense_q, "p50_ms": search.dense_ms},
        "candidates": search.candidates, "chosen": chosen["id"] if chosen else None, "reached": reached,
        "speedup": chosen["speed"]["speedup"] if chosen else 1.0,
        "quality": chosen["quality"] if chosen else dense_q, "test": test,
        "measured_on": measured_on(profile, batch),
        "cache": dict(cache.counts()), "seconds": round(time.perf_counter() - t0, 3),
        "notes": search.notes,
    }
    report["message"] = message(report, chosen)
    if chosen is not None:
        raw = recipe_mod.recipe_of(chosen, model=model, hw=hw, data_spec=data, batch=batch)
        recipe_mod.write_recipe(raw, outdir / "recipe.yaml")
        report["recipe"] = "recipe.yaml"
        report["notes"].append("recipe.yaml re-prunes the same kept channels per group and distils as chosen; "
                               "`onnxprune run` does not calibrate per-layer stages, so a calibration-only path is "
                               "reproduced without the calibration re-fit")
    report_mod.write(report, outdir)
    return report


def start_search(model: Path, outdir: Path, *, hw: str, data: Any, target_speedup: float | None,
                 target_latency_ms: float | None, max_drop: float | None, min_fidelity: float | None, metric: str | None,
                 max_epochs: int, time_budget_min: float | None, batch_size: int | None, quantize: bool,
                 bisect_steps: int, seed: int, log: Callable[[str], None] | None,
                 output_kinds: Mapping[str, str] | None = None):
    """Every input checked (one line on the first bad one, before any work), the dense model scored
    on val, the run cache opened: a :class:`~.search.Search` ready to run (``bench_optimize`` also
    drives one by hand for its grid)."""

    load_graph(model)  # a bad model fails here, in one line, before any work
    goal = Goal.of(target_speedup, target_latency_ms)
    if isinstance(max_epochs, bool) or int(max_epochs) < 0:
        raise OnnxPruneError(f"--max-epochs must be an integer >= 0, not {max_epochs}")
    if time_budget_min is not None and not time_budget_min > 0:
        raise OnnxPruneError(f"--time-budget must be a positive number of minutes, not {time_budget_min:g}")
    if batch_size is not None and int(batch_size) < 1:
        raise OnnxPruneError(f"--batch-size must be at least 1, not {batch_size}")
    profile = load_hw_profile(hw)
    check_available(profile)
    ds = load_dataset(data)
    bound = Bound.of(max_drop, min_fidelity, metric, ds.labeled, output_kinds)
    ds.split("val")  # selection needs the held-out split: one clear line when it is missing
    if outdir.exists() and not outdir.is_dir():
        raise OnnxPruneError(f"{outdir}: exists and is not a directory")
    refuse_overwrite_input(model, outdir / "model.onnx")
    batch = int(batch_size or profile.batch_sizes[0])
    inputs = steps.calibration_data(ds, model)
    shapes = steps.measure_shapes(inputs, batch)
    cache = StepCache.open(outdir / "candidates")
    s = Settings(model=model, outdir=outdir, hw=hw, data_spec=data, goal=goal, bound=bound, max_epochs=int(max_epochs),
                 time_budget_s=None if time_budget_min is None else 60.0 * time_budget_min, batch_size=batch,
                 quantize=quantize, bisect_steps=bisect_steps, seed=seed)
    dense_q = steps.measure_quality(model, model, ds, "val", bound)
    return Search(s=s, data=ds, dense_quality=dense_q, batch=batch, shapes=shapes, inputs=inputs, cache=cache,
                  log=log or (lambda line: None), profile=profile)


def measured_on(profile, batch: int) -> str:
    """Where and how every speed figure of the report was taken."""
    where = f"remote {profile.remote}" if getattr(profile, "remote", None) else f"host {platform.node()}"
    return (f"profile {profile.name} ({profile.backend}, {where}), batch {batch}, p50 latency timed interleaved "
            "with the dense model (dense, candidate, dense, ...)")


def message(report: dict[str, Any], chosen: dict[str, Any] | None) -> str:
    """The one line the command ends with."""
    if chosen is None:
        return (f"goal {report['goal_text']} not reached: no candidate held the bound ({report['bound_text']}); "
                "model.onnx is the dense model")
    q = chosen["quality"]
    qual = f"drop {chosen['drop']:.2f}" if chosen.get("drop") is not None else f"fidelity {q['fidelity']:.4f}"
    what = f"{chosen['speed']['speedup']:.2f}x ({chosen['speed']['p50_ms']:.3f} ms), {qual} on val, via {chosen['path']}"
    if report["reached"]:
        return f"goal {report['goal_text']} reached: {what}"
    return f"goal {report['goal_text']} not reached within {report['bound_text']}: best found {what}; written to model.onnx"
