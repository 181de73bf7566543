"""The escalation: cheapest path first, more only when the quality bound fails.

1. latency-aware allocation to the goal + calibration toward the dense model (seconds, no torch);
2. label-free distillation from the dense model, 1, 2, 4 ... up to ``--max-epochs`` epochs;
3. when even that breaks the bound, a lower target: bisection over the speedup between the fastest
   model within the bound so far (at first the dense model, 1x) and the target where the bound
   broke, each probe through 1, then 2 with the whole epoch budget at once. When the allocation
   could not reach the goal's speed at all, the same bisection runs between what it reached and the
   goal (the allocation is steered by noisy measurements: another target can give a faster model);
4. ``--quantize``: the chosen model quantized, kept only when measured faster and within the bound.

It stops as soon as a candidate meets the goal within the bound. Every candidate is one step of
the run cache (``OUTDIR/candidates/state.json``): a re-run answers finished candidates from it.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import OnnxPruneError
from . import steps
from .goal import Bound, Goal
from ..core.model_io import atomic_path, save_model

#: the allocation aims this much past the goal, so that the candidate's own re-measurement (the
#: number the decision uses) does not fall below it on timing noise alone
SPEED_MARGIN = 0.05
#: a quantized model is kept only when measured this much faster than the float one (timing noise
#: on a busy machine is a few percent: a model that is no faster must not win on it)
QUANT_MIN_GAIN = 0.05
#: a probe below this speedup is not worth a candidate: the dense model is the answer there
MIN_SPEEDUP = 1.05


@dataclass
class Settings:
    """One ``onnxprune optimize`` run (the CLI flags)."""

    model: Path
    outdir: Path
    hw: str
    data_spec: Any
    goal: Goal
    bound: Bound
    max_epochs: int = 0
    time_budget_s: float | None = None
    batch_size: int | None = None
    quantize: bool = False
    bisect_steps: int = 4
    seed: int = 0

    def config(self) -> dict[str, Any]:
        """What a candidate's cache key depends on besides its own step settings."""
        return {"hw": self.hw, "data": self.data_spec if isinstance(self.data_spec, (str, dict)) else str(self.data_spec),
                "bound_metric": self.bound.metric, "output_kinds": dict(self.bound.output_kinds), "seed": self.seed}


@dataclass
class Search:
    """State of one run: the candidates so far and the clock."""

    s: Settings
    data: Any
    dense_quality: dict[str, Any]
    batch: int
    shapes: dict[str, tuple[int, ...]]
    inputs: dict
    cache: Any
    log: Callable[[str], None]
    profile: Any = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    dense_ms: float | None = None

    # --------------------------------------------------------------------------- budget

    def out_of_time(self) -> bool:
        b = self.s.time_budget_s
        if b is not None and time.perf_counter() - self.started >= b:
            note = f"time budget of {b / 60:g} min spent: the search stopped there"
            if note not in self.notes:
                self.notes.append(note)
            return True
        return False

    # ----------------------------------------------------------------------- candidates

    def _judge(self, c: dict[str, Any]) -> dict[str, Any]:
        seen = next((x for x in self.candidates if x["id"] == c["id"]), None)
        if seen is not None:  # the same target again (a bisection probe): one candidate, judged once
            return seen
        c["within_bound"] = self.s.bound.holds(c["quality"], self.dense_quality)
        c["drop"] = self.s.bound.drop(c["quality"], self.dense_quality)
        c["meets_goal"] = self.s.goal.met(c["speed"])
        if self.dense_ms is None:
            self.dense_ms = c["speed"]["dense_p50_ms"]
        self.candidates.append(c)
        self.log(f"  {c['id']}: {c['speed']['speedup']:.2f}x, {self._quality_text(c)}"
                 f"{'' if c['within_bound'] else ' (breaks the bound)'}{' [cached]' if c.get('cached') else ''}")
        return c

    def _quality_text(self, c: dict[str, Any]) -> str:
        if c["drop"] is not None:
            return f"{c['quality']['task_name']} {c['quality']['task']:.4f} (drop {c['drop']:.2f})"
        return f"fidelity {c['quality']['fidelity']:.4f}"

    def _step(self, name: str, config: dict[str, Any], out: Path, inputs: list[Path],
              work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        ran = []

        def fn() -> dict[str, Any]:
            t = time.perf_counter()
            res = work()
            res["seconds"] = round(time.perf_counter() - t, 3)
            ran.append(True)
            return res

        profile_file = [Path(self.s.hw)] if Path(self.s.hw).is_file() else []  # a profile file's content counts
        res = dict(self.cache.run(name, {**self.s.config(), "data_described": self.data.describe(), **config}, fn,
                                  inputs=[*inputs, *profile_file], outputs=[out]))
        res["cached"] = not ran
        return res

    def prune(self, target: dict[str, float]) -> dict[str, Any]:
        """Allocation to ``target`` (``target_speedup`` or ``target_latency_ms``) + calibration."""
        label = "-".join(f"{'s' if k == 'target_speedup' else 'ms'}{v:.4g}" for k, v in target.items())
        cid = f"prune-{label}"
        out = self.cache.outdir / f"{cid}.onnx"

        def work() -> dict[str, Any]:
            alloc = steps.allocate(self.s.model, self.s.hw, target, self.shapes, self.cache.outdir / "latency-tables")
            counts = steps.kept_counts(alloc.summary)
            cal = steps.calibrate_counts(self.s.model, counts, alloc.summary, self.inputs, self.shapes)
            save_model(cal.model, out)
            la = alloc.summary.get("latency_allocation") or {}
            return {"id": cid, "path": "allocation + calibration", "target": target, "file": out.name,
                    "groups": [{k: g[k] for k in ("id", "kept", "total")} for g in alloc.summary.get("groups", [])],
                    "macs_reduction": cal.summary.get("macs_reduction"),
                    "allocation": {"met": la.get("met"), "iterations": len(la.get("iterations", [])),
                                   "achieved": (alloc.summary.get("target") or {}).get("achieved")},
                    "calibration": {k: (cal.summary.get("calibration") or {}).get(k)
                                    for k in ("method", "samples", "outputs")},
                    **self._measure(out)}

        return self._judge(self._step("prune", {"target": target, "batch": self.batch}, out, [self.s.model], work))

    def distill(self, parent: dict[str, Any], epochs: int) -> dict[str, Any]:
        cid = f"{parent['id']}-distill{epochs}"
        src, out = self.cache.outdir / parent["file"], self.cache.outdir / f"{cid}.onnx"

        def work() -> dict[str, Any]:
            model, hist = steps.distill(src, self.s.model, self.data, epochs, seed=self.s.seed,
                                        output_kinds=self.s.bound.output_kinds)
            save_model(model, out)
            return {"id": cid, "path": f"allocation + calibration + distillation ({epochs} epoch{'s' * (epochs > 1)})",
                    "target": parent["target"], "file": out.name, "parent": parent["id"], "epochs": epochs,
                    "groups": parent.get("groups"), "macs_reduction": parent.get("macs_reduction"), "training": hist,
                    **self._measure(out)}

        return self._judge(self._step("distill", {"parent": parent["id"], "epochs": epochs, "batch": self.batch}, out,
                                      [self.s.model, src], work))

    def quantized(self, parent: dict[str, Any]) -> dict[str, Any]:
        cid = f"{parent['id']}-int8"
        src, out = self.cache.outdir / parent["file"], self.cache.outdir / f"{cid}.onnx"

        def work() -> dict[str, Any]:
            info = steps.quantize(src, out, self.s.data_spec, self.s.hw)
            return {"id": cid, "path": parent["path"] + " + INT8 quantization", "target": parent.get("target"),
                    "file": out.name, "parent": parent["id"], "epochs": parent.get("epochs", 0),
                    "groups": parent.get("groups"),
                    "macs_reduction": parent.get("macs_reduction"), "quantization": info, **self._measure(out)}

        return self._judge(self._step("quantize", {"parent": parent["id"], "batch": self.batch}, out,
                                      [self.s.model, src], work))

    def _measure(self, path: Path) -> dict[str, Any]:
        speed = steps.measure_speed(self.s.model, path, self.s.hw, self.batch, self.shapes)
        quality = steps.measure_quality(path, self.s.model, self.data, "val", self.s.bound)
        return {"speed": speed, "quality": quality}

    # ---------------------------------------------------------------------------- search

    def epochs_ladder(self) -> list[int]:
        """1, 2, 4 ... then ``max_epochs`` (each a fresh distillation of the calibrated model)."""
        out, e = [], 1
        while e < self.s.max_epochs:
            out.append(e)
            e *= 2
        return out + [self.s.max_epochs] if self.s.max_epochs > 0 else []

    def try_target(self, target: dict[str, float], ladder: bool = True) -> dict[str, Any]:
        """The cheapest candidate at ``target`` that holds the bound (or the last one tried).
        ``ladder`` False: after calibration, straight to the whole epoch budget (the bisection's
        probes: the goal's own candidates showed that fewer epochs were not enough)."""
        c = base = self.prune(target)
        if c["within_bound"]:
            return c
        for e in (self.epochs_ladder() if ladder else self.epochs_ladder()[-1:]):
            if self.out_of_time():
                break
            c = self.distill(base, e)
            if c["within_bound"]:
                return c
        return c

    def run(self) -> dict[str, Any] | None:
        """Search; the chosen candidate (None: nothing beat the dense model within the bound)."""
        g = self.s.goal
        first_target = {"target_speedup": g.value * (1 + SPEED_MARGIN)} if g.kind == "speedup" else \
            {"target_latency_ms": g.value / (1 + SPEED_MARGIN)}
        self.log(f"goal {g.text()}, bound {self.s.bound.text()}: allocation + calibration first")
        c = self.try_target(first_target)
        if c["within_bound"] and c["meets_goal"]:
            return self._finish(c)
        goal_speedup = g.speedup_for(self.dense_ms)
        best = c if c["within_bound"] else None
        # lo: the fastest within the bound so far (the dense model: 1x); hi: where the bound broke, or
        # the goal when the allocation could not reach it within the bound
        lo = best["speed"]["speedup"] if best else 1.0
        hi = goal_speedup if best else min(goal_speedup, c["speed"]["speedup"])
        for _ in range(self.s.bisect_steps):
            mid = (lo + hi) / 2
            if mid < MIN_SPEEDUP or hi - lo < 0.02 * hi or self.out_of_time():
                break
            self.log(f"within the bound at {lo:.2f}x, not at {hi:.2f}x: trying {mid:.2f}x")
            c = self.try_target({"target_speedup": round(mid * (1 + SPEED_MARGIN), 4)}, ladder=False)
            if c["within_bound"]:
                if best is None or c["speed"]["speedup"] > best["speed"]["speedup"]:
                    best = c
                if c["meets_goal"]:
                    break
                if c["speed"]["speedup"] > lo:
                    lo = c["speed"]["speedup"]
                else:
                    hi = mid  # asking for more did not give more
            else:
                hi = mid
        return self._finish(best)

    def _finish(self, chosen: dict[str, Any] | None) -> dict[str, Any] | None:
        if chosen is not None and self.s.quantize and not self.out_of_time():
            q = self.quantized(chosen)
            if q is not None:
                if q["within_bound"] and q["speed"]["speedup"] > chosen["speed"]["speedup"] * (1 + QUANT_MIN_GAIN):
                    chosen = q
                else:
                    q["why_not"] = "quantized model " + ("breaks the bound" if not q["within_bound"] else
                                                         f"not measured faster ({q['speed']['speedup']:.2f}x vs "
                                                         f"{chosen['speed']['speedup']:.2f}x unquantized; "
                                                         f"needs {QUANT_MIN_GAIN:.0%} more)")
        return chosen


def verdicts(candidates: list[dict[str, Any]], chosen: dict[str, Any] | None, bound: Bound, goal: Goal) -> None:
    """Why each candidate was kept or rejected (in place: ``verdict``)."""
    for c in candidates:
        if chosen is not None and c["id"] == chosen["id"]:
            c["verdict"] = "chosen: " + ("meets the goal within the bound" if c["meets_goal"] else
                                         "the fastest within the bound (the goal was not reached)")
        elif chosen is not None and "quantization" in chosen and chosen.get("parent") == c["id"]:
            c["verdict"] = "rejected: its INT8 version is measured faster within the bound"
        elif c.get("why_not"):
            c["verdict"] = "rejected: " + c["why_not"]
        elif not c["within_bound"]:
            c["verdict"] = f"rejected: breaks the bound ({bound.text()})"
        elif not c["meets_goal"]:
            c["verdict"] = f"rejected: misses the goal ({goal.text()})" + (
                "; slower than the chosen one" if chosen is not None else "")
        else:
            c["verdict"] = "rejected: within the bound and the goal, but not the one chosen"


def copy_chosen(src: Path, dest: Path) -> None:
    """``OUTDIR/model.onnx``, written atomically."""

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def speedup_text(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


__all__ = ["Settings", "Search", "verdicts", "copy_chosen", "SPEED_MARGIN", "OnnxPruneError"]
