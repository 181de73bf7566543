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
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.errors import OnnxPruneError
from ..recipes.schema import Sensitivity, Stage
from ..core.pruning_result import PruneResult

CSV_COLUMNS = ("group", "name", "channels", "ratio", "kept", "top1", "drop")


# ------------------------------------------------------------------------------------- structured pieces

class _Structured:
    """The dense model analysed once: groups, scores, and a pruner for any per-group ratios."""

    def __init__(self, source, criterion: str, seed: int = 0, gradients=None):
        from ..channels.analyze import analyze_channels
        from ..core.prepare import prepare
        from ..structured.importance import ScoreInputs, score_groups

        self.prep = prepare(source)
        self.analysis = analyze_channels(self.prep.view)
        groups = list(self.analysis.prunable)
        self.scores, unavailable = score_groups(groups, criterion,
                                                ScoreInputs.from_view(self.prep.view, gradients=gradients, seed=seed))
        if groups and not self.scores:
            raise OnnxPruneError(f"criterion {criterion} cannot score any group: {next(iter(unavailable.values()))}")
        self.groups = [g for g in groups if g.id in self.scores]
        self.dropped: dict[int, str] = {}

    @staticmethod
    def key(g) -> str:
        return f"g{g.id}"

    @staticmethod
    def name(g) -> str:
        return (list(g.nodes) or [f"group {g.id}"])[0]

    def plan(self, ratios: Mapping[int, float]):
        from ..structured.allocate import Limits, final_count, select

        limits = Limits(max_ratio=0.99)
        plan = {}
        for g in self.groups:
            r = ratios.get(g.id, 0.0)
            width = g.size // g.blocks
            desired = g.blocks * math.floor(width * (1.0 - r) + 1e-9)
            plan[g.id] = select(self.scores[g.id], final_count(g.size, desired, g.blocks, limits), g.blocks)
        return plan

    def prune(self, ratios: Mapping[int, float]):
        """The pruned model and its plan; groups whose rewrite fails validation are kept whole
        (recorded in ``self.dropped`` with the reason) instead of failing the run."""
        import numpy as np

        from ..structured.fallback import prune_dropping_broken
        from ..structured.prune import validated_builder

        plan = self.plan(ratios)
        sizes = {g.id: g.size for g in self.groups}
        model, dropped = prune_dropping_broken(validated_builder(self.prep, self.analysis), plan,
                                               [gid for gid, kept in plan.items() if len(kept) < sizes[gid]])
        for gid in dropped:
            plan[gid] = np.arange(sizes[gid])
        self.dropped.update(dropped)
        return model, plan


# ----------------------------------------------------------------------------------------------- analysis

def run_sensitivity(source: str | os.PathLike, data, cfg: Sensitivity, *, profiles: Sequence[Any] = (),
                    evaluate: Callable[[Any], float] | None = None, progress: Callable[[str], None] | None = None,
                    batch_size: int = 256) -> dict[str, Any]:
    """Rows ``{group, name, channels, ratio, kept, top1, drop, latency_ms {profile: p50}}`` and per-layer ratios."""
    from ..datasets import evaluate_onnx

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
        from ..profiling.provenance import merge_measured_on

        out["measured_on"] = {name: merge_measured_on(recs) for name, recs in where.items()}
    return out


def _units(source, cfg: Sensitivity, criterion: str) -> list[tuple[str, str, int, Callable[[float], tuple[Any, int]]]]:
    """(key, display name, size, prune_at(ratio) -> (model, kept)) per group or layer, largest first."""
    if cfg.kind == "structured":
        st = _Structured(source, criterion)
        groups = sorted(st.groups, key=lambda g: -g.size)[: cfg.max_layers or None]

        def at(g):
            def prune_at(r: float):
                model, plan = st.prune({g.id: r})
                return model, int(len(plan[g.id]))
            return prune_at

        return [(st.key(g), st.name(g), g.size, at(g)) for g in groups]
    from ..sparsity.prune import prune_unstructured

    probe = prune_unstructured(source, sparsity=0.0)
    layers = sorted(probe.summary["layers"], key=lambda l: -l["size"])[: cfg.max_layers or None]
    all_nodes = [l["node"] for l in probe.summary["layers"]]

    def at_layer(layer):
        def prune_at(r: float):
            res = prune_unstructured(source, sparsity=r, scope="layer", criterion=criterion,
                                     ignore=[_escape(n) for n in all_nodes if n != layer["node"]])
            mine = next(l for l in res.summary["layers"] if l["node"] == layer["node"])
            return res.model, int(mine["nonzero"])
        return prune_at

    return [(l["node"], l["node"], l["size"], at_layer(l)) for l in layers]


def _escape(name: str) -> str:
    """A node name as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _latency(model, profiles: Sequence[Any], where: dict[str, list] | None = None) -> dict[str, float]:
    from . import steps

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

def prune_per_layer(source, stage: Stage, ratios: Mapping[str, float], *, seed: int = 0, gradients=None) -> PruneResult:
    """Prune with one ratio per group (structured: keys ``g<id>`` or node-name patterns) or per layer
    (unstructured: node names or patterns); unnamed groups/layers are left whole."""
    import fnmatch

    if stage.kind == "structured":
        st = _Structured(source, stage.criterion, seed=seed, gradients=gradients)
        chosen: dict[int, float] = {}
        for g in st.groups:
            if st.key(g) in ratios:
                chosen[g.id] = float(ratios[st.key(g)])
                continue
            for pat, r in ratios.items():
                if any(fnmatch.fnmatchcase(n, pat) for n in g.nodes):
                    chosen[g.id] = float(r)
                    break
        model, plan = st.prune(chosen)
        from ..metrics.inspection import inspect_model

        before, after = inspect_model(st.prep.model), inspect_model(model)
        summary = {"method": "structured", "criterion": stage.criterion, "scope": "per-layer", "per_layer": dict(ratios),
                   "params_before": before["params"], "params_after": after["params"],
                   "macs_before": before["macs"], "macs_after": after["macs"],
                   "macs_reduction": before["macs"] / after["macs"] if before["macs"] and after["macs"] else None,
                   "groups": [{"id": g.id, "nodes": list(g.nodes), "kept": int(len(plan[g.id])), "total": g.size}
                              for g in st.groups if g.id not in st.dropped],
                   "dropped_groups": [{"id": g.id, "nodes": list(g.nodes), "reason": st.dropped[g.id]}
                                      for g in st.groups if g.id in st.dropped],
                   "notes": [f"{len(st.dropped)} group(s) left whole because pruning them breaks the model "
                             "(see 'dropped_groups')"] if st.dropped else []}
        return PruneResult(model=model, summary=summary)
    from ..sparsity.prune import prune_unstructured

    current: Any = source
    res = None
    names = [l["node"] for l in prune_unstructured(source, sparsity=0.0).summary["layers"]]
    for node in names:
        r = ratios.get(node)
        if r is None:
            r = next((v for pat, v in ratios.items() if fnmatch.fnmatchcase(node, pat)), None)
        if not r:
            continue
        res = prune_unstructured(current, sparsity=float(r), scope="layer", criterion=stage.criterion, seed=seed,
                                 ignore=[_escape(n) for n in names if n != node], gradients=gradients)
        current = res.model
    if res is None:
        res = prune_unstructured(source, sparsity=0.0)
    res.summary["per_layer"] = dict(ratios)
    return res


__all__ = ["run_sensitivity", "derive_ratios", "to_csv", "prune_per_layer"]
