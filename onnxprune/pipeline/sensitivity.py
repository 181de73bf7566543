"""Sensitivity analysis: prune one group (structured) or one layer (unstructured) at a time at several
ratios, WITHOUT retraining, and measure validation accuracy (and, optionally, latency per profile).

Writes ``OUTDIR/sensitivity.csv``; the report draws the curves. The largest ratio per group whose
accuracy drop stays within ``max_drop`` gives per-layer ratios that a stage with
``per_layer: sensitivity`` prunes with (:func:`prune_per_layer`).

Structured groups are keyed ``g<id>`` (ids of the channel analysis of the dense model, stable for a
given file) and shown with their first node's name; unstructured layers are keyed by node name.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..recipes.schema import Sensitivity
from .per_layer import StructuredGroups, escape, prune_per_layer
from ..datasets import evaluate_onnx
from ..profiling.provenance import merge_measured_on
from ..sparsity.prune import prune_unstructured
from . import steps

CSV_COLUMNS = ("group", "name", "channels", "ratio", "kept", "top1", "drop")


# ------------------------------------------------------------------------------------- structured pieces

# ----------------------------------------------------------------------------------------------- analysis

def run_sensitivity(source: str | os.PathLike, data, cfg: Sensitivity, *, profiles: Sequence[Any] = (),
                    evaluate: Callable[[Any], float] | None = None, progress: Callable[[str], None] | None = None,
                    batch_size: int = 256) -> dict[str, Any]:
    """Rows ``{group, name, channels, ratio, kept, top1, drop, latency_ms {profile: p50}}`` and per-layer ratios."""

    def val_top1(model) -> float:
        return float(evaluate_onnx(model, data, "val", batch_size)["top1"]) if evaluate is None else evaluate(model)

    criterion = cfg.criterion or ("l1" if cfg.kind == "structured" else "magnitude")
    base = val_top1(str(source))
    rows: list[dict[str, Any]] = []
    units = _units(source, cfg, criterion)
    where: dict[str, list] = {}  # profile -> measured_on of each latency probe
    for key, name, size, prune_at in units:
        for r in cfg.ratios:
            if progress:
                progress(f"sensitivity {name} @ {r:g}")
            model, kept = prune_at(r)
            top1 = val_top1(model)
            row = {"group": key, "name": name, "channels": size, "ratio": r, "kept": kept, "top1": top1, "drop": base - top1}
            if cfg.latency and profiles:
                row["latency_ms"] = _latency(model, profiles, where)
            rows.append(row)
    per_layer = derive_ratios(rows, cfg.max_drop)
    out = {"kind": cfg.kind, "criterion": criterion, "ratios": list(cfg.ratios), "max_drop": cfg.max_drop,
           "baseline_top1": base, "rows": rows, "per_layer_ratios": per_layer}
    if where:
        out["measured_on"] = {name: merge_measured_on(recs) for name, recs in where.items()}
    return out


def _units(source, cfg: Sensitivity, criterion: str) -> list[tuple[str, str, int, Callable[[float], tuple[Any, int]]]]:
    """(key, display name, size, prune_at(ratio) -> (model, kept)) per group or layer, largest first."""
    if cfg.kind == "structured":
        st = StructuredGroups(source, criterion)
        groups = sorted(st.groups, key=lambda g: -g.size)[: cfg.max_layers or None]

        def at(g):
            def prune_at(r: float):
                model, plan = st.prune({g.id: r})
                return model, int(len(plan[g.id]))
            return prune_at

        return [(st.key(g), st.name(g), g.size, at(g)) for g in groups]

    probe = prune_unstructured(source, sparsity=0.0)
    layers = sorted(probe.summary["layers"], key=lambda l: -l["size"])[: cfg.max_layers or None]
    all_nodes = [l["node"] for l in probe.summary["layers"]]

    def at_layer(layer):
        def prune_at(r: float):
            res = prune_unstructured(source, sparsity=r, scope="layer", criterion=criterion,
                                     ignore=[escape(n) for n in all_nodes if n != layer["node"]])
            mine = next(l for l in res.summary["layers"] if l["node"] == layer["node"])
            return res.model, int(mine["nonzero"])
        return prune_at

    return [(l["node"], l["node"], l["size"], at_layer(l)) for l in layers]


def _latency(model, profiles: Sequence[Any], where: dict[str, list] | None = None) -> dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="onnxprune-sens-") as tmp:
        path = Path(tmp) / "probe.onnx"
        steps.save(model, path)
        for p in profiles:
            rec = steps.profile(path, p, memory=False)["results"][0]
            out[p.name] = float(rec["latency_ms"]["p50"])
            if where is not None:
                where.setdefault(p.name, []).append(rec.get("measured_on"))
    return out


def derive_ratios(rows: Sequence[Mapping[str, Any]], max_drop: float) -> dict[str, float]:
    """Per group: the largest ratio whose drop is within ``max_drop`` with every smaller ratio also
    within it (0 when even the smallest costs more)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by.setdefault(str(r["group"]), []).append((float(r["ratio"]), float(r["drop"])))
    out = {}
    for g, pts in by.items():
        best = 0.0
        for ratio, drop in sorted(pts):
            if drop > max_drop:
                break
            best = ratio
        out[g] = best
    return out


def to_csv(result: Mapping[str, Any]) -> str:
    profiles = sorted({p for r in result["rows"] for p in (r.get("latency_ms") or {})})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*CSV_COLUMNS, *[f"latency_p50_ms_{p}" for p in profiles]])
    for r in result["rows"]:
        w.writerow([r[c] for c in CSV_COLUMNS] + [(r.get("latency_ms") or {}).get(p, "") for p in profiles])
    return buf.getvalue()


# --------------------------------------------------------------------------------------- per-layer pruning

__all__ = ["run_sensitivity", "derive_ratios", "to_csv", "prune_per_layer"]
