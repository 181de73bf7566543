"""``run_recipe``: a recipe from dense to deployed, every step cached, one report at the end.

load -> analyze -> (sensitivity) -> prune (per stage / schedule) -> retrain -> write ONNX -> evaluate
-> profile -> report. Every operating point's model is kept as ``OUTDIR/models/<run-id>.onnx`` (the
dense control as ``models/dense.onnx``). Every step goes through :class:`~.cache.StepCache`, so a
re-run (after a crash, or with one thing changed) runs only what is new. With a remote executor
(:mod:`.executor`), the points' steps run elsewhere and fill the cache first; the same sequence then
replays from the cache, so the report is built by the same code whichever executor ran it.

Fairness: one retraining config per run, the same for every method (gradual schedules split its
epochs over their steps, stated in the report); seeds aggregated as mean ± std; checkpoints are
selected on the validation split only (inside :func:`~onnxprune.training.finetune.finetune`); the
test split is evaluated once per final model, here. The dense control is the input model evaluated
and profiled as is, and with ``retrain.finetune_dense`` also fine-tuned with the same budget.
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.errors import OnnxPruneError
from ..recipes import Recipe, load_recipe
from ..recipes.loader import check_key, parse_override, resolve_recipe, set_path, validate_recipe
from . import steps
from ..core.model_io import file_sha256, load_model
from .cache import StepCache, locked
from .latency_target import is_latency
from .sweep import Plan, expand
from .context import MODELS, WORK, Context, Progress, finetune_dense_enabled, versions
from .work import dense_control, dense_finetune, run_one, sensitivity_step
from .executor import make_executor
from ..profiling.remote import sessions as remote_sessions
from .aggregate import build_report
from ..report.render import write_report
from ..quantization.static import plan_for


def resolve(recipe: "Recipe | str | os.PathLike", overrides: Iterable[str] = ()) -> Recipe:
    """A Recipe from a Recipe, a shipped name or a path, with ``--set`` overrides applied."""
    overrides = list(overrides)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        raw = recipe.model_dump(exclude_unset=True)
        raw.setdefault("name", recipe.name)
        for item in overrides:
            key, value = parse_override(item)
            check_key(key)
            set_path(raw, key, value)
        return validate_recipe(raw, "recipe", [parse_override(o)[0] for o in overrides])
    return load_recipe(recipe, overrides)


def run_recipe(recipe: "Recipe | str | os.PathLike", model_path: str | os.PathLike, outdir: str | os.PathLike,
               data: "str | Mapping[str, Any] | None" = None, hw: Sequence[str] = (), overrides: Iterable[str] = (),
               *, progress: bool = False, executor: str | None = None, ray_address: str | None = None,
               remote: str | None = None, ssh_options: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``recipe`` on ``model_path`` into ``outdir``; returns the report (also in OUTDIR/report.json).

    ``executor`` (``local`` or ``ray``) and ``ray_address`` replace the recipe's ``executor:`` settings;
    ``remote`` (``USER@HOST[:PORT]``) measures every profile on that device over SSH."""

    overrides = list(overrides)
    source = None if isinstance(recipe, Recipe) else str(resolve_recipe(recipe))
    recipe = resolve(recipe, overrides)
    runner = make_executor(recipe.executor, kind=executor, address=ray_address)
    model_path = _check_model(model_path)
    outdir = _check_outdir(outdir, model_path)
    profiles = steps.load_profiles(list(hw) or recipe.hw, remote, ssh_options)
    profiles = [recipe.profiling.apply(p) for p in profiles]
    plan = expand(recipe)
    for st in (s for r in plan.runs for s in r.stages):
        if is_latency(st) and st.target.latency.profile not in {p.name for p in profiles}:
            raise OnnxPruneError(f"a latency target names profile {st.target.latency.profile!r}, which this run does "
                                 f"not measure on; add it with --hw {st.target.latency.profile}")
    data_spec = data if data is not None else recipe.data
    needs = _needs_data(recipe, profiles)
    if data_spec is None and needs:
        raise OnnxPruneError(f"recipe {recipe.name!r} needs data ({needs}): pass --data SPEC (e.g. --data digits) "
                             "or set data in the recipe")
    ds = steps.load_data(data_spec) if data_spec is not None else None
    with locked(outdir):  # from the first write on: a second run on OUTDIR is refused
        return _run_locked(recipe, model_path, outdir, ds, profiles, plan, runner, source, overrides, progress)


def _run_locked(recipe: Recipe, model_path: Path, outdir: Path, ds: Any, profiles: list, plan: Plan, runner: Any,
                source: str | None, overrides: list[str], progress: bool) -> dict[str, Any]:
    """The run proper, every input checked, holding OUTDIR's lock."""
    for sub in (MODELS, WORK):
        (outdir / sub).mkdir(parents=True, exist_ok=True)
    ctx = Context(recipe=recipe, outdir=outdir, cache=StepCache.open(outdir), data=ds,
                  data_desc=ds.describe() if ds is not None else None, profiles=profiles, progress=Progress(progress),
                  recipe_source=source, overrides=list(overrides))
    ctx.notes.extend(ctx.cache.warnings)  # a state.json set aside
    if ds is None:
        ctx.notes.append("no data: accuracy was not measured (pass --data SPEC)")
    if not profiles:
        ctx.notes.append("no hardware profile: latency was not measured (pass --hw PROFILE, e.g. --hw x86-server-cpu)")
    t0 = time.perf_counter()
    total = len(plan.runs) + 1 + (len(plan.seeds) if finetune_dense_enabled(recipe) else 0) + (1 if recipe.sensitivity.enabled else 0)

    # a device keeps its copies for the whole run
    with remote_sessions(), ctx.progress.running(total, recipe.name), ExitStack() as replaying:
        if runner.remote:  # the driver's own steps, then every point's chain on the executor into the cache
            dense = dense_control(ctx, model_path, latency=False)
            sens = sensitivity_step(ctx, dense["path"]) if recipe.sensitivity.enabled else None
            ctx.progress.advance(2 if sens is not None else 1)
            runner.fill(ctx, model_path, plan, dense["path"], sens)
            ctx.progress.frozen = True
            replaying.enter_context(ctx.cache.replay())  # below: the report's inputs, all from the cache
        dense = dense_control(ctx, model_path)
        ctx.progress.advance()
        sens = None
        if recipe.sensitivity.enabled:
            sens = sensitivity_step(ctx, dense["path"])
            ctx.progress.advance()
        runs = {}
        for spec in plan.runs:
            runs[spec.id] = run_one(ctx, spec, dense["path"], sens)
            ctx.progress.advance()
        dense_ft = []
        if finetune_dense_enabled(recipe):
            for seed in plan.seeds:
                dense_ft.append(dense_finetune(ctx, dense["path"], seed))
                ctx.progress.advance()

    ctx.notes.extend(ctx.cache.remeasured)  # measurements recorded on another machine were taken again here
    report = build_report(ctx, model_path, dense, dense_ft, plan, runs, sens, seconds=time.perf_counter() - t0)

    write_report(report, outdir)
    return report


def _needs_data(recipe: Recipe, profiles: Sequence[Any] = ()) -> str:
    q = recipe.quantize
    if q.enabled and plan_for(None if q.format == "auto" else q.format, profiles[0].backend if profiles else None)[
            "format"] != "fp16":
        return "int8 calibration (quantize.enabled)"
    if recipe.retrain.epochs > 0:
        return "retraining"
    if recipe.sensitivity.enabled:
        return "sensitivity analysis"
    if recipe.recover.calibrate:
        return "calibration (recover.calibrate)"
    if any(s.criterion in steps.GRADIENT_CRITERIA for m in recipe.methods() for s in m.stages):
        return "gradient criteria"
    return ""


def _check_model(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    if not p.exists():
        raise OnnxPruneError(f"{p}: no such model file")
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory, expected an .onnx file")

    load_model(p)  # one clear line for a corrupt or unsupported file, before any work
    return p


def _check_outdir(outdir: str | os.PathLike, model_path: Path) -> Path:
    d = Path(outdir)
    if d.exists() and not d.is_dir():
        raise OnnxPruneError(f"{d}: exists and is not a directory; choose another -o")
    if model_path.resolve().parent in ((d / MODELS).resolve(), (d / WORK).resolve()):
        raise OnnxPruneError(f"{model_path}: the input model is inside {d}'s {model_path.parent.name}/ folder, which the "
                             "run writes; move it or choose another -o")
    return d


__all__ = ["run_recipe", "resolve", "Context", "versions", "file_sha256", "Plan"]
