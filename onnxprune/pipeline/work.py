"""The work of one recipe run, point by point: the dense control, each operating point
(prune, retrain, evaluate), the dense model's fine-tuned copy, sensitivity, and the latency of
each. The local loop (:mod:`.run`) and the Ray executor (:mod:`.executor`) call the same functions,
so a point is built the same way wherever it runs."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping
from ..core.errors import OnnxPruneError
from ..quantization import quantize_model
from ..quantization.static import plan_for
from ..core.quantized import quantization_kind
from . import steps
from .latency_target import is_latency, prune_to_latency
from .sweep import RunSpec
from .context import MODELS, WORK, Context, dense_finetuned_name, node_info
from ..core.model_io import atomic_path, load_graph, write_text_atomic
from .sensitivity import run_sensitivity, to_csv
import onnx


def _measure(ctx: Context, path: Path, label: str, dense: Path | None = None, latency: bool = True,
             gzip: bool = True) -> dict[str, Any]:
    """figures (gzip size with ``gzip``) + evaluate (+ profile, with ``latency``) of one written model,
    each a cached step."""
    ctx.progress.step(f"{label}: figures")
    figures = ctx.cache.run("figures", {} if gzip else {"gzip": False}, lambda: steps.model_figures(path, gzip=gzip),
                            inputs=[path])
    acc = None
    if ctx.data is not None:
        ctx.progress.step(f"{label}: evaluate")
        splits = list(ctx.recipe.evaluation.splits)
        ref = None if ctx.data.labeled else (dense or path)  # unlabeled data: fidelity to the dense model
        metric = ctx.recipe.evaluation.metric
        acc = ctx.cache.run("evaluate", {"data": ctx.data_desc, "splits": splits, "bs": ctx.recipe.evaluation.batch_size,
                                         **({"metric": metric} if metric else {})},
                            lambda: steps.evaluate(path, ctx.data, splits, ctx.recipe.evaluation.batch_size,
                                                   reference=ref, metric=metric),
                            inputs=[path] + ([ref] if ref is not None and ref != path else []))
    out = {"figures": figures, "accuracy": acc, "profiles": {}, "speedups": {}}
    return {**out, **measure_latency(ctx, path, label, dense)} if latency else out


def measure_latency(ctx: Context, path: Path, label: str, dense: Path | None = None) -> dict[str, Any]:
    """Profile one written model on every profile (recording the node it ran on); with ``dense``, also
    its speedup over the dense model timed interleaved with it. Remote executors run this part alone,
    holding a machine's measuring slot."""

    profs = {}
    for p in ctx.profiles:
        ctx.progress.step(f"{label}: profile {p.name}")
        cfg = {"profile": p.model_dump(), "memory": ctx.recipe.profiling.memory}
        profs[p.name] = ctx.cache.run("profile", cfg, lambda p=p: {**steps.profile(path, p, memory=ctx.recipe.profiling.memory),
                                                                   "node": node_info()}, inputs=[path], measures=p)
    speedups = {}
    if dense is not None:
        for p in ctx.profiles:
            ctx.progress.step(f"{label}: interleaved with dense on {p.name}")
            speedups[p.name] = ctx.cache.run("speedup-vs-dense", {"profile": p.model_dump()},
                                             lambda p=p: steps.speedup_vs(dense, path, p), inputs=[dense, path],
                                             measures=p)
    return {"profiles": profs, "speedups": speedups}


def dense_control(ctx: Context, model_path: Path, latency: bool = True) -> dict[str, Any]:
    """The input model, copied to models/dense.onnx, analysed, evaluated and profiled as is."""
    dest = ctx.path(MODELS, "dense.onnx")
    ctx.progress.step("dense: copy")

    def copy() -> dict[str, Any]:
        with atomic_path(dest) as tmp:
            shutil.copyfile(model_path, tmp)
        return {"source": str(model_path)}

    ctx.cache.run("copy-input", {"dest": ctx.rel(dest) if dest.exists() else "models/dense.onnx"}, copy,
                  inputs=[model_path], outputs=[dest])

    def analyze() -> dict[str, Any]:  # a refusal is a result too (recorded, so a replay finds it)
        try:
            return steps.analyze(dest)
        except OnnxPruneError as exc:
            return {"error": str(exc)}

    analysis = ctx.cache.run("analyze", {}, analyze, inputs=[dest])
    if "error" in analysis:
        ctx.notes.append(f"channel analysis: {analysis['error']}")
        analysis = None
    measured = _measure(ctx, dest, "dense", latency=latency, gzip=_gzip_dense(ctx))
    return {"path": dest, "analysis": analysis, **measured,
            "quantized": quantized_twin(ctx, dest, "dense", dest, measured["figures"], latency=latency)}


def _gzip_dense(ctx: Context) -> bool:
    """The dense control gets a gzip size where some point has one to compare with."""
    return any(steps.gzip_meaningful(m.stages) for m in ctx.recipe.methods())


def sensitivity_step(ctx: Context, dense: Path) -> dict[str, Any]:
    cfg = ctx.recipe.sensitivity
    profs = ctx.profiles if cfg.latency else []
    csv_path = ctx.path("sensitivity.csv")

    def work() -> dict[str, Any]:
        res = run_sensitivity(dense, ctx.data, cfg, profiles=profs, progress=ctx.progress.step,
                              batch_size=ctx.recipe.evaluation.batch_size)
        write_text_atomic(csv_path, to_csv(res))
        return res

    key = {"cfg": cfg.model_dump(), "data": ctx.data_desc, "profiles": [p.model_dump() for p in profs]}
    res = ctx.cache.run("sensitivity", key, work, inputs=[dense], outputs=[csv_path], measures=True if profs else None)
    return {**res, "csv": ctx.rel(csv_path)}


def _train_config(ctx: Context, seed: int, steps_count: int = 1):
    rt = ctx.recipe.retrain
    d = rt.train_config_dict(seed)
    if steps_count > 1:
        d["epochs"] = max(1, round(rt.epochs / steps_count))
    return steps.train_config(d)


def run_one(ctx: Context, spec: RunSpec, dense: Path, sens: Mapping[str, Any] | None, latency: bool = True) -> dict[str, Any]:
    """Prune (one shot or gradually), retrain, write, then measure one run (profile it with ``latency``)."""
    rt = ctx.recipe.retrain
    final = ctx.path(MODELS, f"{spec.id}.onnx")
    retraining = rt.epochs > 0 and ctx.data is not None
    gradual = spec.schedule.kind != "one-shot" and spec.schedule.steps > 1 and retraining
    teacher = dense if rt.distillation or (ctx.data is not None and not ctx.data.labeled) else None  # no labels: distil
    cfg = spec.config()
    per_layer = sens.get("per_layer_ratios") if sens else None
    train_hist = None
    if gradual:
        if len(spec.stages) != 1:
            raise OnnxPruneError(f"method {spec.method}: an {spec.schedule.kind} schedule takes exactly one stage")
        ctx.progress.step(f"{spec.id}: {spec.schedule.kind} prune + retrain")
        key = {**cfg, "train": rt.model_dump(), "data": ctx.data_desc}

        def gradual_work() -> dict[str, Any]:
            model, hist = steps.prune_gradually(dense, ctx.data, spec.stages[0], spec.schedule.kind, spec.schedule.steps,
                                                _train_config(ctx, spec.seed, spec.schedule.steps),
                                                teacher=teacher, seed=spec.seed)
            steps.save(model, final)
            last = hist["per_step"][-1] if hist["per_step"] else {}
            summary = {**(last.get("prune_summary") or {}), "gradual": {k: hist[k] for k in ("schedule", "steps", "targets",
                                                                                             "structured_target")}}
            return {"prune": steps.prune_summary(summary), "train": _small_history(hist)}

        rec = ctx.cache.run("gradual", key, gradual_work, inputs=[dense] + ([teacher] if teacher else []), outputs=[final])
        prune_info, train_hist = rec["prune"], rec["train"]
    else:
        pruned = ctx.path(WORK, f"{spec.id}.pruned.onnx") if retraining else final
        ctx.progress.step(f"{spec.id}: prune")
        key = {**cfg, "data": ctx.data_desc if _uses_data(spec) else None,
               "per_layer": per_layer if any(s.per_layer == "sensitivity" for s in spec.stages) else None,
               "profiles": [p.model_dump() for p in ctx.profiles] if any(is_latency(s) for s in spec.stages) else None,
               **({"recover": ctx.recipe.recover.model_dump(), "recover_data": ctx.data_desc}
                  if ctx.recipe.recover.calibrate else {})}
        timed = next((p for s in spec.stages if is_latency(s) for p in ctx.profiles if p.name == s.target.latency.profile), None)
        prune_info = ctx.cache.run("prune", key, lambda: _prune_work(ctx, spec, dense, pruned, per_layer),
                                   inputs=[dense], outputs=[pruned], measures=timed)
        if spec.schedule.kind != "one-shot" and not retraining:
            ctx.notes.append(f"{spec.id}: {spec.schedule.kind} schedule without retraining is one-shot pruning")
        if retraining:
            ctx.progress.step(f"{spec.id}: retrain")
            tkey = {"train": rt.model_dump(), "seed": spec.seed, "data": ctx.data_desc}

            def retrain_work() -> dict[str, Any]:
                model, hist = steps.retrain(pruned, ctx.data, _train_config(ctx, spec.seed), teacher=teacher)
                steps.save(model, final)
                return _small_history(hist)

            train_hist = ctx.cache.run("retrain", tkey, retrain_work, inputs=[pruned] + ([teacher] if teacher else []),
                                       outputs=[final])
    measured = _measure(ctx, final, spec.id, dense, latency=latency, gzip=steps.gzip_meaningful(spec.stages))
    return {"spec": spec, "path": final, "prune": prune_info, "train": train_hist, **measured,
            "quantized": quantized_twin(ctx, final, spec.id, dense, measured["figures"], seed=spec.seed, latency=latency)}


def _uses_data(spec: RunSpec) -> bool:
    return any(s.criterion in steps.GRADIENT_CRITERIA for s in spec.stages)


def _prune_work(ctx: Context, spec: RunSpec, dense: Path, out: Path, per_layer: Mapping[str, float] | None) -> dict[str, Any]:
    """Apply the stages in order (one shot) and write the result to ``out``."""

    source: Any = dense
    summaries = []
    for stage in spec.stages:
        if steps.is_identity(stage):
            summaries.append({"method": stage.kind, "notes": ["target removes nothing: the model is unchanged"]})
            continue
        grads = steps.gradients_for(source, ctx.data, spec.seed) if stage.criterion in steps.GRADIENT_CRITERIA else None
        if is_latency(stage):
            prof = next(p for p in ctx.profiles if p.name == stage.target.latency.profile)
            src_path = source if not isinstance(source, onnx.ModelProto) else _tmp_save(ctx, source, spec.id)
            res = prune_to_latency(src_path, stage, prof, spec.seed)
        else:
            pl = None
            if stage.per_layer == "sensitivity":
                if per_layer is None:
                    raise OnnxPruneError(f"method {spec.method}: per_layer: sensitivity needs sensitivity.enabled: true")
                pl = per_layer
            elif isinstance(stage.per_layer, dict):
                pl = stage.per_layer
            cal = None if pl is not None else steps.calibration_for(ctx.recipe.recover, ctx.data, stage, source, spec.seed)
            res = steps.prune_stage(source, stage, spec.seed, gradients=grads, per_layer=pl, calibration=cal)
        summaries.append(steps.prune_summary(res.summary))
        source = res.model
    if isinstance(source, onnx.ModelProto):
        steps.save(source, out)
    else:
        with atomic_path(out) as tmp:
            shutil.copyfile(source, tmp)
    return _merge_summaries(summaries)


def _tmp_save(ctx: Context, model, run_id: str) -> Path:
    p = ctx.path(WORK, f"{run_id}.stage-input.onnx")
    steps.save(model, p)
    return p


def _merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    if len(summaries) == 1:
        return summaries[0]
    merged = {"stages": summaries, "notes": [n for s in summaries for n in s.get("notes", [])]}
    layered = [s for s in summaries if s.get("layers")]
    if layered:
        merged["layers"] = layered[-1]["layers"]
    return merged


def dense_finetune(ctx: Context, dense: Path, seed: int, latency: bool = True) -> dict[str, Any]:
    """The dense model fine-tuned with the same budget (the control for 'is it the retraining?')."""
    rt = ctx.recipe.retrain
    final = ctx.path(MODELS, dense_finetuned_name(seed))
    ctx.progress.step(f"dense fine-tune s{seed}")

    def work() -> dict[str, Any]:
        model, hist = steps.retrain(dense, ctx.data, _train_config(ctx, seed), teacher=dense if rt.distillation else None)
        steps.save(model, final)
        return _small_history(hist)

    hist = ctx.cache.run("retrain", {"train": rt.model_dump(), "seed": seed, "data": ctx.data_desc, "dense": True}, work,
                         inputs=[dense], outputs=[final])
    label = f"dense-finetuned-s{seed}"
    measured = _measure(ctx, final, label, dense, latency=latency, gzip=_gzip_dense(ctx))
    return {"seed": seed, "path": final, "train": hist, **measured,
            "quantized": quantized_twin(ctx, final, label, dense, measured["figures"], seed=seed, latency=latency)}


# ------------------------------------------------------------------------------------ quantized twins

def quant_settings(ctx: Context) -> dict[str, Any]:
    """The recipe's ``quantize:`` settings with the format resolved: ``auto`` follows the run's first
    profile's backend, as ``onnxprune quantize --hw`` does (the backend also sets TensorRT's placement)."""
    q = ctx.recipe.quantize
    backend = ctx.profiles[0].backend if ctx.profiles else None
    plan = plan_for(None if q.format == "auto" else q.format, backend)
    return {**q.model_dump(exclude={"enabled", "format"}), "format": plan["format"], "requested": q.format,
            "backend": backend}


def twin_path(ctx: Context, float_path: Path) -> Path:
    """``models/<run>-int8.onnx`` (``-fp16`` for a float16 twin) beside the float model."""
    suffix = "fp16" if quant_settings(ctx)["format"] == "fp16" else "int8"
    return ctx.path(MODELS, f"{Path(float_path).stem}-{suffix}.onnx")


def quantized_twin(ctx: Context, float_path: Path, label: str, dense: Path, float_figures: Mapping[str, Any],
                   seed: int = 0, latency: bool = True) -> dict[str, Any] | None:
    """The recipe's ``quantize:`` stage on one final model (None when it is off): a cached
    ``quantize`` step calibrated on the data's training split (labels unused), then the float model's
    own figures/evaluate (and with ``latency``, profile/speedup) steps on the quantized file."""
    if not ctx.recipe.quantize.enabled:
        return None
    already = quantization_kind(load_graph(float_path))
    if already:  # a quantized input model: its points have no float twin to make
        ctx.notes.append(f"{label}: not quantized again (quantize:): the model is already {already['label']}")
        return None
    settings = quant_settings(ctx)
    twin = twin_path(ctx, float_path)
    ctx.progress.step(f"{label}: quantize ({settings['format']})")
    key = {**settings, "seed": seed, "data": ctx.data_desc}
    summary = ctx.cache.run("quantize", key, lambda: _quantize_work(ctx, float_path, twin, settings, seed),
                            inputs=[float_path], outputs=[twin])
    measured = _measure(ctx, twin, f"{label} {twin.stem.rsplit('-', 1)[-1]}", dense, latency=False, gzip=False)
    # the quantized file stores the float model's weights in fewer bits: its weight and MAC counts are the
    # float model's (the graph's Q/DQ scales are not parameters of the model), its size its own
    figures = {**{k: float_figures.get(k) for k in ("params", "nonzero_params", "sparsity", "macs", "nonzero_macs",
                                                     "layers")}, "file_bytes": measured["figures"]["file_bytes"],
               "gzip_bytes": None}
    out = {"path": twin, "quantization": summary, **measured, "figures": figures}
    return {**out, **twin_latency(ctx, twin, float_path, label, dense)} if latency else out


def _quantize_work(ctx: Context, float_path: Path, twin: Path, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    train = replace(ctx.data, val=None, test=None) if ctx.data is not None else None  # never the scored splits
    fmt = None if settings["requested"] == "auto" else settings["format"]  # auto: the quantizer says why (the backend)
    res = quantize_model(float_path, twin, train, fmt=fmt, backend=settings["backend"],
                         per_channel=settings["per_channel"], method=settings["method"], samples=settings["samples"],
                         check_samples=settings["check_samples"], seed=seed)
    keep = ("format", "why", "per_channel", "calibration", "quantized_ops", "file_bytes", "input_file_bytes",
            "size_ratio", "fidelity", "notes", "seconds")
    return {k: res[k] for k in keep if k in res}


def twin_latency(ctx: Context, twin: Path, float_path: Path, label: str, dense: Path) -> dict[str, Any]:
    """The quantized twin on every profile: profiled, timed interleaved with the dense model
    (``speedups``), and with its own float model (``speedups_vs_float``: is quantizing it faster?)."""
    lat = measure_latency(ctx, twin, f"{label} quantized", dense)
    if Path(float_path) == Path(dense):  # the dense control's twin: the same timing
        return {**lat, "speedups_vs_float": lat["speedups"]}
    vs_float = {}
    for p in ctx.profiles:
        ctx.progress.step(f"{label} quantized: interleaved with its float model on {p.name}")
        vs_float[p.name] = ctx.cache.run("speedup-vs-float", {"profile": p.model_dump()},
                                         lambda p=p: steps.speedup_vs(float_path, twin, p), inputs=[float_path, twin],
                                         measures=p)
    return {**lat, "speedups_vs_float": vs_float}


def job_latency(ctx: Context, path: Path, label: str, dense: Path, own_dense: bool = False) -> dict[str, Any]:
    """The latency part of one job (what a remote executor's latency task runs): its model's, then its
    quantized twin's. ``own_dense``: the job is the dense control (no speedup over itself)."""
    lat = measure_latency(ctx, path, label, None if own_dense else dense)
    if ctx.recipe.quantize.enabled and not quantization_kind(load_graph(path)):  # as quantized_twin decides
        lat["quantized"] = twin_latency(ctx, twin_path(ctx, path), path, label, dense)
    return lat


def _small_history(hist: Mapping[str, Any]) -> dict[str, Any]:
    """What the report keeps of a training history."""
    keep = ("best_epoch", "best_val_top1", "initial_val_top1", "seconds", "teacher", "sparsity", "device")
    out = {k: hist[k] for k in keep if k in hist}
    if "epochs" in hist and isinstance(hist["epochs"], list):
        out["epochs"] = [{k: e.get(k) for k in ("epoch", "train_loss", "val_top1", "lr")} for e in hist["epochs"]]
    if "per_step" in hist:
        out["per_step"] = [{k: s.get(k) for k in ("step", "target", "val_top1_after_prune", "val_top1_after_retrain",
                                                   "best_epoch")} for s in hist["per_step"]]
    if "val_onnx" in hist:
        out["val_onnx_top1"] = (hist["val_onnx"] or {}).get("top1")
    return out
