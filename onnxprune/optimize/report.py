"""``OUTDIR/report.{json,md,html}`` and the Pareto plot of an optimize run.

The Markdown/HTML renderers are the run report's (:mod:`onnxprune.report.render`: blocks in, text
out); only the blocks are built here. The plot needs matplotlib (imported only when drawing): without
it the report says so and has no plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..core.model_io import write_text_atomic
from ..pipeline.cache import json_default
from ..report.schema import pareto_front
from ..report.plots import _plt
from ..report.render import to_html, to_markdown

PLOT = "pareto.png"


def pareto_plot(report: Mapping[str, Any], outdir: Path) -> str | None:
    """Speedup vs the bound's quality figure, one point per candidate, the front joined; None
    when matplotlib is not installed."""
    try:
        plt = _plt()
    except Exception:  # noqa: BLE001 - matplotlib missing: the report says so
        return None

    cands = report["candidates"]
    key = _quality_key(report)
    xs = [c["speed"]["speedup"] for c in cands]
    ys = [_quality_of(c, key) for c in cands]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c, x, y in zip(cands, xs, ys):
        star = c["verdict"].startswith("chosen")
        ax.scatter([x], [y], marker="*" if star else "o", s=140 if star else 40,
                   color="tab:green" if c["within_bound"] else "tab:red", zorder=3)
        ax.annotate(c["id"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(-x, y) for x, y in zip(xs, ys)])  # fastest = smallest -x
    if len(front) > 1:
        pts = sorted((xs[i], ys[i]) for i in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", lw=1, zorder=2)
    b = report["bound"]
    if b["kind"] == "min_fidelity":
        ax.axhline(b["value"], color="tab:orange", ls="--", lw=1, label=f"bound: fidelity >= {b['value']:g}")
    elif report["dense"]["quality"].get("task") is not None:
        d = report["dense"]["quality"]["task"]
        ax.axhline(d, color="grey", ls=":", lw=1, label="dense")
        floor = d - b["value"] / 100 * (abs(d) if b.get("metric") else 1.0)
        ax.axhline(floor, color="tab:orange", ls="--", lw=1, label=f"bound: drop <= {b['value']:g}")
    g = report["goal"]
    if g["kind"] == "speedup":
        ax.axvline(g["value"], color="tab:blue", ls="--", lw=1, label=f"goal {g['value']:g}x")
    ax.set_xlabel(f"speedup over dense (p50, interleaved, {report['profile']}, batch {report['batch_size']})")
    ax.set_ylabel(f"{key} on the val split")
    ax.legend(fontsize=8)
    ax.set_title("optimize candidates (green: within the bound)")
    path = outdir / PLOT
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return PLOT


def _quality_key(report: Mapping[str, Any]) -> str:
    return "fidelity" if report["bound"]["kind"] == "min_fidelity" else (report["dense"]["quality"].get("task_name") or "task")


def _quality_of(c: Mapping[str, Any], key: str) -> float | None:
    q = c["quality"]
    return q.get("fidelity") if key == "fidelity" else q.get("task")


def _f(x: Any, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def blocks(report: Mapping[str, Any]) -> list[tuple]:
    chosen = report.get("chosen")
    out: list[tuple] = [("h", 1, f"onnxprune optimize: {Path(report['model']).name}")]
    status = "reached" if report["reached"] else "NOT reached"
    out.append(("p", f"Goal `{report['goal_text']}` on profile `{report['profile']}` (batch {report['batch_size']}), "
                     f"bound `{report['bound_text']}` on the val split: **{status}**. {report['message']}"))
    out.append(("list", [f"budget: max {report['budget']['max_epochs']} epoch(s) of distillation, time budget "
                         + (f"{report['budget']['time_budget_min']:g} min" if report['budget']['time_budget_min'] else "none"),
                         f"dense model on val: {_quality_line(report['dense']['quality'])}",
                         f"speed: {report['measured_on']}",
                         f"time spent: {report['seconds']:.1f} s ({report['cache']['executed']} candidate step(s) run, "
                         f"{report['cache']['skipped']} answered from the run cache)"]))
    key = _quality_key(report)
    rows = []
    for c in report["candidates"]:
        rows.append([c["id"], c["path"], f"{c['speed']['speedup']:.2f}x", f"{c['speed']['p50_ms']:.3f}",
                     _f(_quality_of(c, key)), _f(c.get("drop"), ".2f"), f"{c.get('seconds', 0):.1f}"
                     + (" (cached)" if c.get("cached") else ""), c["verdict"]])
    out += [("h", 2, "Candidates"),
            ("table", ["id", "path", "speedup", "p50 ms", f"{key} (val)", "drop", "time s", "why"], rows)]
    if report.get("plot"):
        out.append(("img", "speedup vs quality of every candidate", report["plot"]))
    else:
        out.append(("p", "(no Pareto plot: matplotlib is not installed; pip install 'onnxprune[report]')"))
    if chosen:
        t = report.get("test") or {}
        out += [("h", 2, "Chosen model"),
                ("list", [f"`model.onnx` = candidate `{chosen}`",
                          f"test split (reported once, never used to choose): {_quality_line(t.get('chosen') or {})}"
                          + (f"; dense {_quality_line(t['dense'])}" if t.get("dense") else ""),
                          "reproduce with `onnxprune run recipe.yaml MODEL -o DIR` (see the notes)"])]
    if report.get("notes"):
        out += [("h", 2, "Notes"), ("list", list(report["notes"]))]
    return out


def _quality_line(q: Mapping[str, Any]) -> str:
    parts = []
    if q.get("task") is not None:
        parts.append(f"{q.get('task_name')} {q['task']:.4f}")
    if q.get("fidelity") is not None:
        parts.append(f"fidelity {q['fidelity']:.4f}")
    return ", ".join(parts) or "n/a"


def write(report: dict[str, Any], outdir: Path) -> None:
    """report.json, report.md, report.html (the plot first: the HTML embeds it)."""

    report["plot"] = pareto_plot(report, outdir)
    write_text_atomic(outdir / "report.json", json.dumps(report, indent=1, default=json_default))
    bl = blocks(report)
    write_text_atomic(outdir / "report.md", to_markdown(bl))
    write_text_atomic(outdir / "report.html", to_html(bl, outdir))
