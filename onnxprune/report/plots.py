"""Report plots (matplotlib, Agg backend: no display needed), drawn from ``report.json`` data alone.

Every function takes the report mapping (or a part of it) and a path, writes one PNG and returns the
path, or returns None when there is nothing to draw (e.g. no accuracy without data).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .schema import pareto_front
from ..core.errors import UnavailableError
import numpy as np

_MARKERS = "osD^v<>ph*"


def _plt():
    try:
        import matplotlib  # lazy: matplotlib ([report] extra)
    except ImportError as exc:  # pragma: no cover - matplotlib is in the report extra

        raise UnavailableError("plots need matplotlib: pip install 'onnxprune[report]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # lazy: matplotlib ([report] extra)

    return plt


def accuracy_split(report: Mapping[str, Any]) -> str | None:
    """The split the plots show: test when measured, else val."""
    for split in ("test", "val"):
        if split in report["dense"].get("accuracy", {}):
            return split
    return None


def _acc(point: Mapping[str, Any], split: str) -> tuple[float | None, float | None]:
    a = point.get("accuracy", {}).get(split)
    if not a:
        return None, None
    return a["top1"]["mean"], a["top1"]["std"]


def _first(point: Mapping[str, Any], profile: str) -> Mapping[str, Any] | None:
    recs = point.get("profiles", {}).get(profile) or []
    return recs[0] if recs else None


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _by_method(report: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in report["points"]:
        out.setdefault(p["method"], []).append(p)
    return out


def all_points(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Dense control, dense fine-tuned (if any), then the pruned points."""
    return [report["dense"], *([report["dense_finetuned"]] if report.get("dense_finetuned") else []), *report["points"]]


def with_twins(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``points``, each followed by its quantized twin when the run had a ``quantize:`` stage."""
    return [q for p in points for q in ([p, p["quantized"]] if p.get("quantized") else [p])]


#: Interleaved timings of the same compute still differ by a few percent from run to run: a point
#: measured less than this much faster than the dense control, and no more accurate, is not on the front.
SPEEDUP_NOISE = 0.03


def point_latency(report: Mapping[str, Any], point: Mapping[str, Any], profile: str) -> float | None:
    """p50 latency (ms) of ``point`` on ``profile`` (first batch size) as the report ranks and plots it:
    the dense control's p50 divided by the point's speedup timed *interleaved* with the dense model.

    Two separate profiles of the same model differ by more than a small gain (machine drift), so a
    point's own p50 is never set against the dense one's; a point without an interleaved speedup
    has no latency here (None)."""
    dense = _first(report["dense"], profile)
    if dense is None:
        return None
    if point["id"] == report["dense"]["id"]:
        return dense["latency_ms"]["p50"]
    rec = _first(point, profile)
    if rec is None or rec.get("speedup_timing") != "interleaved" or not rec.get("speedup_vs_dense"):
        return None
    return dense["latency_ms"]["p50"] / rec["speedup_vs_dense"]


def latency_pareto(report: Mapping[str, Any], profile: str) -> list[str]:
    """Ids on the accuracy-vs-latency Pareto front of ``profile`` (latency: :func:`point_latency`)."""
    split = accuracy_split(report)
    if split is None:
        return []
    pts = with_twins(all_points(report))  # the dense control first; quantized twins beside their float points
    xy = [(point_latency(report, p, profile), _acc(p, split)[0]) for p in pts]
    return [pts[i]["id"] for i in pareto_front(xy, reference=0, rel_tol=SPEEDUP_NOISE)]


def plot_accuracy_vs_latency(report: Mapping[str, Any], profile: str, path: str | os.PathLike) -> Path | None:
    """Top-1 vs measured latency on ``profile`` (dense p50 / interleaved speedup, :func:`point_latency`);
    the Pareto front is drawn and its points ringed."""
    split = accuracy_split(report)
    if split is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    front = set(latency_pareto(report, profile))
    groups = [("dense", [report["dense"]] + ([report["dense_finetuned"]] if report.get("dense_finetuned") else []))]
    groups += list(_by_method(report).items())
    twins = [p["quantized"] for p in all_points(report) if p.get("quantized")]
    if twins:
        groups.append(("quantized (" + ", ".join(sorted({t["id"].rsplit("-", 1)[-1] for t in twins})) + ")", twins))
    drawn = False
    front_xy = []
    for k, (method, pts) in enumerate(groups):
        xs, ys, es = [], [], []
        for p in pts:
            lat = point_latency(report, p, profile)
            acc, std = _acc(p, split)
            if lat is None or acc is None:
                continue
            xs.append(lat)
            ys.append(acc)
            es.append(std or 0.0)
            if p["id"] in front:
                front_xy.append((xs[-1], acc))
        if xs:
            drawn = True
            color = "black" if method == "dense" else None
            ax.errorbar(xs, ys, yerr=es, fmt=_MARKERS[k % len(_MARKERS)], capsize=3, label=method, color=color)
    if not drawn:
        plt.close(fig)
        return None
    if front_xy:
        front_xy.sort()
        ax.plot([x for x, _ in front_xy], [y for _, y in front_xy], "--", color="tab:red", lw=1, label="Pareto front")
        ax.scatter([x for x, _ in front_xy], [y for _, y in front_xy], s=160, facecolors="none", edgecolors="tab:red")
    ax.set_xlabel(f"latency (ms) on {profile}: dense p50 / speedup timed interleaved with dense")
    ax.set_ylabel(f"{split} top-1 accuracy")
    ax.set_title(f"Accuracy vs measured latency ({profile})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _accuracy_vs(report: Mapping[str, Any], key: str, xlabel: str, title: str, path: str | os.PathLike,
                 log: bool = False) -> Path | None:
    split = accuracy_split(report)
    if split is None or not report["points"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    drawn = False
    for k, (method, pts) in enumerate(_by_method(report).items()):
        rows = sorted((p[key], *_acc(p, split)) for p in pts if p.get(key) is not None and _acc(p, split)[0] is not None)
        if rows:
            drawn = True
            ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] or 0.0 for r in rows],
                        fmt=_MARKERS[k % len(_MARKERS)] + "-", capsize=3, label=method)
    dense_acc = _acc(report["dense"], split)[0]
    if dense_acc is not None:
        ax.axhline(dense_acc, color="black", ls=":", lw=1, label="dense")
    if not drawn:
        plt.close(fig)
        return None
    if log:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{split} top-1 accuracy (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_compression(report: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    return _accuracy_vs(report, "compression_ratio", "compression ratio (dense params / nonzero params)",
                        "Accuracy vs compression", path, log=True)


def plot_accuracy_vs_macs(report: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    return _accuracy_vs(report, "nonzero_macs", "MACs of nonzero weights (dense kernels still execute zeros)",
                        "Accuracy vs MACs", path, log=True)


def plot_sensitivity(sens: Mapping[str, Any], path: str | os.PathLike, max_lines: int = 12) -> Path | None:
    """Validation accuracy drop vs pruning ratio, one line per group/layer (the most sensitive first)."""
    rows = sens.get("rows") or []
    if not rows:
        return None
    plt = _plt()
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("drop") is not None:
            label = str(r["group"]) if r.get("name") in (None, r["group"]) else f"{r['group']} {r['name']}"
            by.setdefault(label, []).append((r["ratio"], r["drop"]))
    if not by:
        return None
    ranked = sorted(by.items(), key=lambda kv: -max(d for _, d in kv[1]))[:max_lines]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, pts in ranked:
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=name)
    if sens.get("max_drop") is not None:
        ax.axhline(sens["max_drop"], color="black", ls=":", lw=1, label="allowed drop")
    ax.set_xlabel(f"fraction pruned ({sens.get('kind', 'structured')}, {sens.get('criterion', '')}, no retraining)")
    ax.set_ylabel("validation top-1 drop")
    ax.set_title("Sensitivity per group" + (f" (top {max_lines} of {len(by)})" if len(by) > max_lines else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_per_layer(report: Mapping[str, Any], path: str | os.PathLike, max_layers: int = 40) -> Path | None:
    """Per layer kept fraction (channels for structured points, nonzero weights for the others)."""
    series = []
    for p in report["points"]:
        run = next((r for r in p.get("runs", []) if (r.get("prune") or {}).get("layers")), None)
        if run:
            series.append((p["id"], run["prune"]["layers"]))
    if not series:
        return None
    names: list[str] = []
    for _, layers in series:
        for l in layers:
            if l["name"] not in names:
                names.append(l["name"])
    names = names[:max_layers]
    plt = _plt()

    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(names) * max(1, len(series)) ** 0.5), 4.6))
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for k, (pid, layers) in enumerate(series):
        kept = {l["name"]: l["kept"] for l in layers}
        ax.bar(x + k * width, [kept.get(n, np.nan) for n in names], width, label=pid)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([_short(n) for n in names], rotation=70, ha="right", fontsize=6)
    ax.set_ylabel("kept fraction (channels or nonzero weights)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Per layer: what each point kept")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _short(name: str, n: int = 24) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def write_all(report: Mapping[str, Any], outdir: str | os.PathLike) -> dict[str, str]:
    """Draw every plot the report has data for under ``outdir/plots``; {name: relative path}."""
    outdir = Path(outdir)
    plots: dict[str, str] = {}

    def add(name: str, p: Path | None) -> None:
        if p is not None:
            plots[name] = str(p.relative_to(outdir))

    for prof in _profiles(report):
        add(f"accuracy_vs_latency_{prof}", plot_accuracy_vs_latency(report, prof, outdir / "plots" / f"accuracy_vs_latency_{prof}.png"))
    add("accuracy_vs_compression", plot_accuracy_vs_compression(report, outdir / "plots" / "accuracy_vs_compression.png"))
    add("accuracy_vs_macs", plot_accuracy_vs_macs(report, outdir / "plots" / "accuracy_vs_macs.png"))
    if report.get("sensitivity"):
        add("sensitivity", plot_sensitivity(report["sensitivity"], outdir / "plots" / "sensitivity.png"))
    add("per_layer", plot_per_layer(report, outdir / "plots" / "per_layer.png"))
    return plots


def _profiles(report: Mapping[str, Any]) -> Sequence[str]:
    return [p["name"] for p in report.get("hw_profiles", [])]
