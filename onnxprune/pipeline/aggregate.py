"""Turn the per-run step results into ``report.json`` (schema: :mod:`onnxprune.report.schema`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..profiling.provenance import merge_measured_on
from ..report.schema import SCHEMA_VERSION, stat
from ..core.model_io import file_sha256
from ..report.guidance import speedup_guidance
from ..core.version import __version__
from ..report.plots import latency_pareto
from .context import versions

LATENCY_KEYS = ("p50", "p90", "p95", "p99", "mean", "min", "max", "std")
#: a quantized twin timed less than this much faster than its float model is "not faster": interleaved
#: timings of the same compute differ by a few percent from run to run (as ``onnxprune quantize`` says)
QUANT_FASTER = 1.03


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _accuracy(measured: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    accs = [m["accuracy"] for m in measured if m.get("accuracy")]
    if not accs:
        return {}
    out = {}
    for split in accs[0]:
        per = [a[split] for a in accs]
        top5 = [p.get("top5") for p in per]
        out[split] = {"top1": stat([p["top1"] for p in per]),
                      "top5": stat(top5) if any(v is not None for v in top5) else None,
                      "samples": per[0].get("samples")}
        for key in ("mean_rel_l2", "top1_agreement"):  # fidelity to the dense model (unlabeled data)
            if any(p.get(key) is not None for p in per):
                out[split][key] = stat([p.get(key) for p in per])
        names = list(dict.fromkeys(k for p in per for k in (p.get("metric") or {})))
        if names:  # the user's metric
            out[split]["metric"] = {k: stat([(p.get("metric") or {}).get(k) for p in per]) for k in names}
    return out


def _profiles(measured: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    names = list(dict.fromkeys(n for m in measured for n in m["profiles"]))
    for name in names:
        by_batch: dict[int, list[dict[str, Any]]] = {}
        for m in measured:
            res = m["profiles"].get(name)
            for rec in (res or {}).get("results", []):
                by_batch.setdefault(int(rec["batch_size"]), []).append(rec)
        recs = []
        for batch, rs in by_batch.items():
            first = rs[0]
            recs.append({
                "profile": name, "batch_size": batch, "backend": first["backend"], "precision": first.get("precision"),
                "provider": first.get("provider"), "provenance": first["provenance"],
                "latency_ms": {k: _mean([r["latency_ms"].get(k) for r in rs]) for k in LATENCY_KEYS if k in first["latency_ms"]},
                "latency_p50_ms": stat([r["latency_ms"]["p50"] for r in rs]),
                "throughput_per_s": _mean([r.get("throughput_per_s") for r in rs]),
                "peak_rss_bytes": _mean([r.get("peak_rss_bytes") for r in rs]),
                "gpu_memory_bytes": _mean([r.get("gpu_memory_bytes") for r in rs]),
                **_interleaved_speedup(measured, name, batch),
                "meets_latency_budget": first.get("meets_latency_budget") if len(rs) == 1 else
                (all(r.get("meets_latency_budget") for r in rs) if first.get("meets_latency_budget") is not None else None),
                "runs": first.get("runs"), "threads": first.get("threads"), "versions": first.get("versions", {}),
                "nodes": _nodes(measured, name),
                "measured_on": merge_measured_on([r.get("measured_on") for r in rs]),
                "notes": list(dict.fromkeys(n for r in rs for n in r.get("notes", []))),
                **({"remote": {k: v for k, v in first["remote"].items() if k not in ("workdir", "model_copied")}}
                   if first.get("remote") else {}),  # the device it was measured on, over SSH
            })
        out[name] = recs
    return out


def _nodes(measured: Sequence[Mapping[str, Any]], profile: str) -> list[dict[str, Any]]:
    """The machines (host, CPU, GPU) the seeds were measured on, each once: an executor may spread them."""
    nodes = [(m["profiles"].get(profile) or {}).get("node") for m in measured]
    return [dict(n) for n in {json.dumps(n, sort_keys=True): n for n in nodes if n}.values()]


def _interleaved_speedup(measured: Sequence[Mapping[str, Any]], profile: str, batch: int) -> dict[str, Any]:
    """Mean over seeds of the speedup timed interleaved with the dense model, when every seed has one."""
    vals = [(m.get("speedups") or {}).get(profile, {}).get(str(batch)) for m in measured]
    if vals and all(v is not None for v in vals):
        where = merge_measured_on([((m.get("speedups") or {}).get(profile) or {}).get("measured_on") for m in measured])
        return {"speedup_vs_dense": _mean(vals), "speedup_timing": "interleaved", "speedup_measured_on": where}
    return {"speedup_vs_dense": None, "speedup_timing": None, "speedup_measured_on": None}


def make_point(pid: str, method: str, kind: str, settings: dict[str, Any], measured: Sequence[Mapping[str, Any]],
               dense_fig: Mapping[str, Any], outdir: Path) -> dict[str, Any]:
    """One operating point from its seeds' measurements (``figures``, ``accuracy``, ``profiles``, ``path``...)."""
    fig = [m["figures"] for m in measured]
    params = _mean([f["params"] for f in fig])
    nonzero = _mean([f["nonzero_params"] for f in fig])
    macs = _mean([f["macs"] for f in fig]) if all(f["macs"] is not None for f in fig) else None
    nz_macs = _mean([f["nonzero_macs"] for f in fig]) if all(f["nonzero_macs"] is not None for f in fig) else None
    dense_macs = dense_fig.get("macs")
    runs = []
    for m in measured:
        runs.append({"seed": m.get("seed"), "model": _rel(m["path"], outdir),
                     "accuracy": {s: {"top1": a["top1"], "top5": a.get("top5"),
                                      **{k: a[k] for k in ("mean_rel_l2", "top1_agreement") if a.get(k) is not None},
                                      **{f"metric.{k}": v for k, v in (a.get("metric") or {}).items()}}
                                  for s, a in (m.get("accuracy") or {}).items()},
                     "prune": m.get("prune"), "train": m.get("train"),
                     "figures": {k: v for k, v in m["figures"].items() if k != "layers"}})
        if not (m.get("prune") or {}).get("layers") and m["figures"].get("layers") and kind != "dense":
            runs[-1]["prune"] = {**(m.get("prune") or {}), "layers": m["figures"]["layers"]}
    notes = list(dict.fromkeys(n for m in measured for n in ((m.get("prune") or {}).get("notes") or [])))
    return {
        "id": pid, "method": method, "kind": kind, "settings": settings,
        "seeds": [m.get("seed") for m in measured], "models": [_rel(m["path"], outdir) for m in measured],
        "params": params, "nonzero_params": nonzero, "sparsity": 1.0 - nonzero / params if params else 0.0,
        "compression_ratio": dense_fig["params"] / nonzero if nonzero else None,
        "macs": macs, "nonzero_macs": nz_macs,
        "theoretical_speedup": dense_macs / nz_macs if dense_macs and nz_macs else None,
        "macs_reduction": dense_macs / macs if dense_macs and macs else None,
        "file_bytes": _mean([f["file_bytes"] for f in fig]), "gzip_bytes": _mean([f["gzip_bytes"] for f in fig]),
        "accuracy": _accuracy(measured), "profiles": _profiles(measured), "runs": runs, "notes": notes,
    }


def attach_twin(point: dict[str, Any], measured: Sequence[Mapping[str, Any]], dense_fig: Mapping[str, Any],
                outdir: Path) -> dict[str, Any] | None:
    """``point["quantized"]``: the point's quantized twin (recipe ``quantize:``) as a point of its own,
    id ``<point>-int8`` (or ``-fp16``), with ``quantization``: how it was made, its fidelity to the
    float model, and per profile its speedup over its float model timed interleaved with it."""
    twins = [{**m["quantized"], "seed": m.get("seed")} for m in measured if m.get("quantized")]
    if not twins or len(twins) != len(measured):
        return None
    first = twins[0]["quantization"]
    suffix = "fp16" if first["format"] == "fp16" else "int8"
    how = {"format": first["format"], "per_channel": first.get("per_channel"),
           "method": (first.get("calibration") or {}).get("method")}
    twin = make_point(f"{point['id']}-{suffix}", point["method"], point["kind"], {**point["settings"], "quantize": how},
                      twins, dense_fig, outdir)
    summaries = [t["quantization"] for t in twins]
    fids = [s.get("fidelity") or {} for s in summaries]
    agree = [_mean([o.get("top1_agreement") for o in (f.get("outputs") or {}).values()]) for f in fids]
    notes = list(dict.fromkeys(n for s in summaries for n in s.get("notes", [])))
    faster: dict[str, bool | None] = {}
    for name, recs in twin["profiles"].items():
        for rec in recs:
            vals = [((t.get("speedups_vs_float") or {}).get(name) or {}).get(str(rec["batch_size"])) for t in twins]
            ok = bool(vals) and all(v is not None for v in vals)
            where = merge_measured_on([((t.get("speedups_vs_float") or {}).get(name) or {}).get("measured_on")
                                       for t in twins]) if ok else None
            rec.update(speedup_vs_float=_mean(vals) if ok else None, speedup_vs_float_timing="interleaved" if ok else None,
                       speedup_vs_float_measured_on=where)
        v = recs[0]["speedup_vs_float"] if recs else None
        faster[name] = None if v is None else v >= QUANT_FASTER
        if faster[name] is False:
            notes.append(f"not faster than its float model {point['id']} on {name} ({v:.2f}x p50 at batch "
                         f"{recs[0]['batch_size']}, timed interleaved with it): keep the float model there unless "
                         "size matters")
    twin["quantization"] = {
        **how, "why": first.get("why"), "calibration": first.get("calibration"), "quantized_ops": first.get("quantized_ops"),
        "float_point": point["id"], "float_file_bytes": point["file_bytes"],
        "size_ratio": _mean([s.get("size_ratio") for s in summaries]),
        "fidelity": {"reference": "the float model", "held_out": True,
                     "samples": fids[0].get("samples"), "mean_rel_l2": stat([f.get("mean_rel_l2") for f in fids]),
                     "top1_agreement": stat(agree) if any(a is not None for a in agree) else None},
        "faster": faster, "seconds": sum(s.get("seconds") or 0.0 for s in summaries)}
    twin["notes"] = notes
    point["quantized"] = twin
    return twin


def _rel(p: Any, outdir: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(outdir.resolve()))
    except ValueError:
        return str(p)


def _kind(stages: Sequence[Any]) -> str:
    kinds = {s.kind for s in stages}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def set_speedups(points: Sequence[dict[str, Any]], dense: Mapping[str, Any]) -> None:
    """Where no interleaved speedup was measured: dense p50 / point p50 from their separate profiles."""
    for p in points:
        for name, recs in p["profiles"].items():
            base = {r["batch_size"]: r["latency_ms"].get("p50") for r in dense["profiles"].get(name, [])}
            for r in recs:
                if r.get("speedup_vs_dense") is not None:
                    continue
                b = base.get(r["batch_size"])
                r["speedup_vs_dense"] = b / r["latency_ms"]["p50"] if b and r["latency_ms"].get("p50") else None
                r["speedup_timing"] = "separate" if r["speedup_vs_dense"] is not None else None


def guidance(points: Sequence[Mapping[str, Any]], dense: Mapping[str, Any], profiles: Sequence[Any]) -> list[str]:
    """Plain statements: which points did not get faster where, and why (B's speedup guidance)."""

    out: list[str] = []
    for prof in profiles:
        gpu_cc = prof.gpu.compute_capability if getattr(prof, "gpu", None) else None
        for kind in ("unstructured", "nm", "structured"):
            mine = [p for p in points if kind in {s.get("kind") for s in (p["settings"].get("stages") or [])}]
            if not mine:
                continue
            slow = []
            for p in mine:
                rec = (p["profiles"].get(prof.name) or [None])[0]
                if rec and rec.get("speedup_vs_dense") is not None and rec["speedup_vs_dense"] < 1.1:
                    slow.append(f"{p['id']} {rec['speedup_vs_dense']:.2f}x")
            if kind != "structured" and slow:
                out.append(f"On {prof.name}, the {kind} points do not get faster than the dense model (measured p50 speedup: "
                           f"{', '.join(slow)}); their gain is size (see gzip and nonzero params), not latency.")
            elif kind == "structured" and slow:
                out.append(f"On {prof.name}, some structured points gained less than 1.1x ({', '.join(slow)}): small or "
                           "memory-bound layers, or kept channel counts that are not multiples of 8 (ONNX Runtime's "
                           "CPU conv kernels work in blocks of 8/16; set round_to: 8 in the stage options); compare "
                           "with their MACs reduction.")
            try:
                notes = speedup_guidance(kind, prof.backend, gpu_cc, precision=prof.precision,
                                         sparse_weights=prof.sparse_weights)
            except Exception:  # noqa: BLE001 - guidance is advice; an unknown backend must not sink the report
                notes = []
            out.extend(f"{prof.name} ({kind}): {n}" for n in notes if kind != "structured" or not slow)
    return list(dict.fromkeys(out))


def quantized_guidance(twins: Sequence[Mapping[str, Any]]) -> list[str]:
    """One statement per profile: which quantized twins are not faster than their float models."""
    out = []
    names = list(dict.fromkeys(n for t in twins for n in (t.get("quantization") or {}).get("faster", {})))
    for name in names:
        slow = [f"{t['id']} {t['profiles'][name][0]['speedup_vs_float']:.2f}x" for t in twins
                if (t.get("quantization") or {}).get("faster", {}).get(name) is False]
        if slow:
            out.append(f"On {name}, quantizing did not make these models faster than their float models (p50, timed "
                       f"interleaved with each float model): {', '.join(slow)}; keep the float model there unless size "
                       "matters.")
    return out


def build_report(ctx, model_path: Path, dense: Mapping[str, Any], dense_ft: Sequence[Mapping[str, Any]], plan,
                 runs: Mapping[str, Mapping[str, Any]], sens: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    outdir = ctx.outdir
    recipe = ctx.recipe
    dfig = dense["figures"]
    dense_point = make_point("dense", "dense", "dense", {"target": None, "stages": [], "schedule": None},
                             [{**dense, "seed": None}], dfig, outdir)
    ft_point = None
    if dense_ft:
        ft_point = make_point("dense-finetuned", "dense-finetuned", "dense",
                              {"target": None, "stages": [], "schedule": None, "retrained": True}, dense_ft, dfig, outdir)
    points = []
    for pid in plan.point_ids:
        specs = plan.runs_of(pid)
        first = specs[0]
        measured = [{**runs[s.id], "seed": s.seed} for s in specs]
        settings = {k: v for k, v in first.config().items() if k not in ("seed", "method", "point")}
        points.append(make_point(pid, first.method, _kind(first.stages), settings, measured, dfig, outdir))
    twins = [attach_twin(p, m, dfig, outdir) for p, m in [(dense_point, [{**dense, "seed": None}])]
             + ([(ft_point, dense_ft)] if ft_point else [])
             + [(pt, [{**runs[s.id], "seed": s.seed} for s in plan.runs_of(pt["id"])]) for pt in points]]
    twins = [t for t in twins if t is not None]
    set_speedups(points + ([ft_point] if ft_point else []) + twins, dense_point)
    for r in dense_point["profiles"].values():
        for rec in r:
            rec["speedup_vs_dense"] = 1.0
    rt = recipe.retrain
    retraining = None
    if rt.epochs > 0 and ctx.data is not None:
        gradual = [(m.name, recipe.schedule_of(m).steps) for m in recipe.methods()
                   if recipe.schedule_of(m).kind != "one-shot" and recipe.schedule_of(m).steps > 1]
        split = None
        if gradual:
            split = ("Gradual methods split the budget over their pruning steps: " + ", ".join(
                f"{name} {n} steps x {max(1, round(rt.epochs / n))} epoch(s)" for name, n in gradual) +
                f" (one-shot methods: {rt.epochs} epoch(s) after pruning).")
        retraining = {"config": {k: v for k, v in rt.train_config_dict(0).items() if k != "seed"},
                      "distillation": rt.distillation, "finetune_dense": rt.finetune_dense, "schedule_split": split,
                      "checkpoint_selection": "best validation top-1 over the epochs (validation split only)",
                      "test_evaluation": "once per final model, after retraining, with ONNX Runtime on the written file"}
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "onnxprune", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": {"name": recipe.name, "description": recipe.description, "source": ctx.recipe_source,
                   "overrides": ctx.overrides,
                   "config": recipe.model_dump(mode="json")},
        "model": {"path": str(model_path), "sha256": file_sha256(model_path), "params": dfig["params"],
                  "nonzero_params": dfig["nonzero_params"], "macs": dfig["macs"], "file_bytes": dfig["file_bytes"],
                  "gzip_bytes": dfig["gzip_bytes"], "analysis": dense.get("analysis")},
        "data": ctx.data_desc,
        "retraining": retraining,
        "hw_profiles": [{"name": p.name, "backend": p.backend, "precision": p.precision,
                         "provenance": _provenance(dense_point, p.name, p.provenance), "source": p.source,
                         "batch_sizes": list(p.batch_sizes), "description": p.description,
                         **({"remote": p.remote} if getattr(p, "remote", None) else {})} for p in ctx.profiles],
        "dense": dense_point,
        "dense_finetuned": ft_point,
        "points": points,
        "pareto": {},
        "sensitivity": dict(sens) if sens else None,
        "guidance": guidance(points, dense_point, ctx.profiles) + quantized_guidance(twins),
        "plots": {},
        "notes": list(dict.fromkeys(ctx.notes)),
        "versions": {**ctx.worker_versions, **versions()},
        "steps": {**ctx.cache.counts(), "seconds": int(round(seconds))},
    }
    report["pareto"] = {p.name: latency_pareto(report, p.name) for p in ctx.profiles}
    return report


def _provenance(dense_point: Mapping[str, Any], name: str, declared: str) -> str:
    recs = dense_point["profiles"].get(name) or []
    return recs[0]["provenance"] if recs else declared
