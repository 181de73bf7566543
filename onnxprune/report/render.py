"""``report.md`` and a self-contained ``report.html`` (plots embedded as base64 PNG) from report.json data.

Both are rendered from one list of blocks (headings, paragraphs, tables, lists, images), so they
always say the same thing. :func:`render_run_dir` re-draws the plots too (``onnxprune report``).
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..core.model_io import write_text_atomic
from .plots import accuracy_split, all_points, with_twins, write_all
from ..core.jsonio import json_default
from ..profiling.provenance import measured_on_line, merge_measured_on
from .schema import load_report, validate_report

Block = tuple  # ("h", level, text) | ("p", text) | ("list", [text]) | ("table", headers, rows) | ("img", title, path) | ("code", text)


# ----------------------------------------------------------------------------------------- formatting

def fmt_num(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".strip()
    return f"{n:.0f} {unit}".strip() if float(n).is_integer() else f"{n:.3g} {unit}".strip()


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def fmt_stat(s: Mapping[str, Any] | None, pct: bool = True) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    text = f"{s['mean'] * scale:.2f}"
    if s.get("n", 0) > 1:
        text += f" ± {s['std'] * scale:.2f}"
    return text + ("%" if pct else "")


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _target(p: Mapping[str, Any]) -> str:
    t = (p.get("settings") or {}).get("target")
    if not t:
        stages = (p.get("settings") or {}).get("stages") or []
        parts = []
        for s in stages:
            if s.get("kind") == "nm":
                parts.append(f"{s.get('n', 2)}:{s.get('m', 4)}")
            elif s.get("target"):
                parts.append(", ".join(f"{k} {v}" for k, v in s["target"].items()))
            elif s.get("per_layer"):
                parts.append("per-layer ratios")
        return "; ".join(parts) or "-"
    k, v = next(iter(t.items()))
    if k == "latency":
        return f"latency ≤ {v['budget_ms']} ms ({v.get('percentile', 'p50')}, {v['profile']})"
    return f"{k} {v}"


# --------------------------------------------------------------------------------------------- blocks

def blocks(report: Mapping[str, Any]) -> list[Block]:
    out: list[Block] = []
    rec = report["recipe"]
    out.append(("h", 1, f"onnxprune report: {rec.get('name', 'run')}"))
    if rec.get("description"):
        out.append(("p", rec["description"]))
    m = report["model"]
    data = report.get("data")
    out.append(("list", [
        f"model: `{m.get('path')}` ({fmt_num(m.get('params'))} params, {fmt_num(m.get('macs'))} MACs, "
        f"{fmt_bytes(m.get('file_bytes'))})",
        f"data: {data['spec']} ({', '.join(f'{k} {v}' for k, v in data.get('samples', {}).items())})" if data
        else "data: none (no accuracy measured; pass --data SPEC)",
        "hardware profiles: " + (", ".join(f"{p['name']} ({p['backend']}, {p.get('precision', 'fp32')}, {p['provenance']})"
                                           for p in report["hw_profiles"]) or "none"),
        f"created {report['created']} by onnxprune {report['tool'].get('version')}; "
        f"{report['steps'].get('executed', 0)} step(s) run, {report['steps'].get('skipped', 0)} taken from state.json",
    ]))
    out += _results(report)
    out += _quantized(report)
    out += _latency(report)
    if report.get("guidance"):
        out.append(("h", 2, "What gets faster, and what does not"))
        out.append(("list", list(report["guidance"])))
    if report.get("pareto"):
        out.append(("h", 2, "Pareto front (accuracy vs measured latency: dense p50 / interleaved speedup)"))
        out.append(("list", [f"{prof}: {' → '.join(ids) or 'n/a'}" for prof, ids in report["pareto"].items()]))
    if report.get("plots"):
        out.append(("h", 2, "Plots"))
        for name, rel in report["plots"].items():
            out.append(("img", name.replace("_", " "), rel))
    if report.get("sensitivity"):
        out += _sensitivity(report["sensitivity"])
    out += _method(report)
    if report.get("notes"):
        out.append(("h", 2, "Notes"))
        out.append(("list", list(report["notes"])))
    out.append(("h", 2, "Versions"))
    out.append(("code", json.dumps(report.get("versions", {}), indent=1, sort_keys=True)))
    return out


def _extra_accuracy_columns(report: Mapping[str, Any], splits: list[str]) -> list[tuple[str, str, str]]:
    """(title, split, key) of the fidelity and user-metric columns some point has."""
    cols = []
    pts = all_points(report)
    for s in splits:
        for key, title in (("mean_rel_l2", "rel_l2 vs dense"), ("top1_agreement", "top-1 agreement")):
            if any(((p["accuracy"].get(s) or {}).get(key) or {}).get("mean") is not None for p in pts):
                cols.append((f"{s} {title}", s, key))
        names = list(dict.fromkeys(k for p in pts for k in ((p["accuracy"].get(s) or {}).get("metric") or {})))
        cols += [(f"{s} {k}", s, f"metric.{k}") for k in names]
    return cols


def _extra_stat(point: Mapping[str, Any], split: str, key: str) -> str:
    acc = point["accuracy"].get(split) or {}
    stat = (acc.get("metric") or {}).get(key[7:]) if key.startswith("metric.") else acc.get(key)
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.4g}" + (f" ± {stat['std']:.2g}" if stat.get("n", 0) > 1 else "")


def _results(report: Mapping[str, Any]) -> list[Block]:
    split_names = [s for s in ("val", "test") if s in report["dense"].get("accuracy", {})]
    profiles = [p["name"] for p in report["hw_profiles"]]
    headers = ["point", "method", "target", "seeds", "params", "nonzero", "compression", "MACs", "theor. speedup",
               "file", "gzip"] + [f"{s} top-1" for s in split_names]
    extra = _extra_accuracy_columns(report, split_names)  # fidelity (unlabeled data), the user's metric
    headers += [title for title, _, _ in extra]
    for prof in profiles:
        headers += [f"p50 ms {prof}", f"speedup {prof}"]
    rows = []
    for p in with_twins(all_points(report)):
        row = [p["id"], p["method"], _target(p), str(len([s for s in p["seeds"] if s is not None]) or "-"),
               fmt_num(p["params"]), fmt_num(p["nonzero_params"]), fmt_x(p["compression_ratio"]), fmt_num(p["macs"]),
               fmt_x(p["theoretical_speedup"]), fmt_bytes(p["file_bytes"]), fmt_bytes(p["gzip_bytes"])]
        row += [fmt_stat((p["accuracy"].get(s) or {}).get("top1")) for s in split_names]
        row += [_extra_stat(p, s, key) for _, s, key in extra]
        for prof in profiles:
            recs = p["profiles"].get(prof) or []
            row += [f"{recs[0]['latency_ms']['p50']:.3f}" if recs else "n/a", fmt_x(recs[0].get("speedup_vs_dense")) if recs else "n/a"]
        rows.append(row)
    text = ("One row per operating point (seeds aggregated: mean ± std). compression = dense params / nonzero params; "
            "theor. speedup = dense MACs / MACs of nonzero weights (what a sparse kernel could skip); speedup = "
            "dense p50 / point p50 on the profile (first batch size), timed interleaved with the dense model (D P D P ...) "
            "so machine drift hits both.")
    if any(p.get("quantized") for p in all_points(report)):
        text += (" A row `<point>-int8` (or `-fp16`) is that point quantized (recipe `quantize:`): the same weights "
                 "and MACs in fewer bits, its own file, accuracy and latency.")
    return [("h", 2, "Results"), ("p", text), ("table", headers, rows)]


def _quantized(report: Mapping[str, Any]) -> list[Block]:
    """Each point's float and quantized rows side by side: size, quality, latency, memory, and whether
    quantizing made it faster (timed interleaved with its own float model)."""
    pairs = [(p, p["quantized"]) for p in all_points(report) if p.get("quantized")]
    if not pairs:
        return []
    split = accuracy_split(report)
    profiles = [p["name"] for p in report["hw_profiles"]]
    headers = ["point", "format", "profile", "file", f"{split or 'val'} top-1", "fidelity rel_l2", "p50 ms",
               "peak RSS", "speedup vs dense", "quantized vs float", "faster?"]
    rows = []
    for f, q in pairs:
        info = q.get("quantization") or {}
        for prof in profiles or [None]:
            for p, is_q in ((f, False), (q, True)):
                rec = (p["profiles"].get(prof) or [None])[0] if prof else None
                vs = rec.get("speedup_vs_float") if rec and is_q else None
                verdict = {True: "yes", False: "no: keep the float model unless size matters", None: "n/a"}[
                    (info.get("faster") or {}).get(prof)] if is_q else ""
                rows.append([p["id"], info.get("format", "?") if is_q else "float", prof or "-", fmt_bytes(p["file_bytes"]),
                             fmt_stat((p["accuracy"].get(split) or {}).get("top1")) if split else "n/a",
                             _fidelity(info) if is_q else "", f"{rec['latency_ms']['p50']:.3f}" if rec else "n/a",
                             fmt_bytes(rec.get("peak_rss_bytes")) if rec else "n/a",
                             fmt_x(rec.get("speedup_vs_dense")) if rec else "n/a", fmt_x(vs) if is_q else "", verdict])
    text = ("Each point above its quantized twin (recipe `quantize:`, through ONNX Runtime's quantizer, calibrated on "
            "unlabeled samples of the training split). quantized vs float = the float model's p50 / the quantized "
            "model's, both timed interleaved in one measurement on the profile (first batch size); below "
            "1.03x it counts as not faster. fidelity rel_l2: the quantized outputs against the float model's on "
            "training samples not used to calibrate. peak RSS is n/a where the recipe sets profiling.memory: false.")
    return [("h", 2, "Float and quantized, side by side"), ("p", text), ("table", headers, rows)]


def _fidelity(info: Mapping[str, Any]) -> str:
    stat = ((info.get("fidelity") or {}).get("mean_rel_l2")) or {}
    return "n/a" if stat.get("mean") is None else f"{stat['mean']:.3g}"


def _latency(report: Mapping[str, Any]) -> list[Block]:
    out: list[Block] = []
    for prof in report["hw_profiles"]:
        name = prof["name"]
        rows = []
        for p in with_twins(all_points(report)):
            for r in p["profiles"].get(name) or []:
                lat = r["latency_ms"]
                rows.append([p["id"], str(r["batch_size"]), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                             f"{r['throughput_per_s']:.1f}" if r.get("throughput_per_s") is not None else "n/a",
                             fmt_bytes(r.get("peak_rss_bytes")), fmt_x(r.get("speedup_vs_dense")),
                             r.get("provider") or "n/a", r["provenance"]])
        if rows:
            out.append(("h", 3, f"Latency on {name}"))
            if prof.get("description"):
                out.append(("p", prof["description"]))
            where = [r.get("measured_on") for p in with_twins(all_points(report)) for r in p["profiles"].get(name) or []]
            line = measured_on_line(merge_measured_on(where))
            out.append(("p", line[:1].upper() + line[1:]))
            out.append(("table", ["point", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput/s", "peak RSS",
                                  "speedup", "provider", "provenance"], rows))
    if out:
        out.insert(0, ("h", 2, "Measured latency and memory"))
    return out


def _sensitivity(sens: Mapping[str, Any]) -> list[Block]:
    out: list[Block] = [("h", 2, "Sensitivity analysis")]
    out.append(("p", f"Each group pruned alone ({sens.get('kind')}, criterion {sens.get('criterion')}) at ratios "
                     f"{', '.join(str(r) for r in sens.get('ratios', []))}, without retraining; validation top-1 of the "
                     f"dense model {fmt_stat({'mean': sens.get('baseline_top1'), 'n': 1})}. Full table: `{sens.get('csv')}`."))
    ratios = sens.get("per_layer_ratios") or {}
    if ratios:
        rows = [[str(g), f"{r:g}"] for g, r in ratios.items()]
        out.append(("p", f"Largest ratio per group whose accuracy drop is at most {sens.get('max_drop')}:"))
        out.append(("table", ["group", "ratio"], rows))
    return out


def _method(report: Mapping[str, Any]) -> list[Block]:
    out: list[Block] = [("h", 2, "Method and fairness")]
    items = ["Dense control: the input model evaluated and profiled as is, with the same data, splits and profiles."]
    rt = report.get("retraining")
    if rt:
        cfg = rt["config"]
        items.append(f"Every method got the same retraining budget and learning-rate schedule: {cfg.get('epochs')} epoch(s), "
                     f"{cfg.get('optimizer')} lr {cfg.get('lr')} ({cfg.get('schedule')}), batch {cfg.get('batch_size')}, "
                     f"weight decay {cfg.get('weight_decay')}, label smoothing {cfg.get('label_smoothing')}, "
                     f"distillation {'on' if rt.get('distillation') else 'off'}.")
        if rt.get("schedule_split"):
            items.append(rt["schedule_split"])
        items.append("Dense fine-tuned with the same budget: " + ("yes (row dense-finetuned)" if rt.get("finetune_dense")
                                                                   else "no (set retrain.finetune_dense: true for it)"))
        items.append(f"Checkpoint selection: {rt.get('checkpoint_selection')}. Test split: {rt.get('test_evaluation')}.")
    else:
        items.append("No retraining (retrain.epochs = 0): accuracies are right after pruning.")
    split = accuracy_split(report)
    if split:
        items.append(f"Plots and the Pareto front use {split} top-1 accuracy.")
    out.append(("list", items))
    if rt:
        out.append(("code", json.dumps(rt["config"], indent=1, sort_keys=True)))
    return out


# -------------------------------------------------------------------------------------------- renderers

def to_markdown(bl: list[Block]) -> str:
    lines: list[str] = []
    for b in bl:
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[1]}]({b[2]})", ""]
        elif kind == "code":
            lines += ["```", b[1], "```", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td:nth-child(2),td:nth-child(3){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}code,pre{background:#f6f6f6}pre{padding:.6em;overflow:auto;font-size:12px}
figure{margin:1em 0}figcaption{color:#555;font-size:13px}"""


def to_html(bl: list[Block], base: Path) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(next((b[2] for b in bl if b[0] == 'h'), 'onnxprune report'))}</title>",
             f"<style>{_CSS}</style></head><body>"]
    for b in bl:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            p = base / b[2]
            if p.is_file():
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt='{esc(b[1])}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{esc(b[1])}</figcaption></figure>")
            else:
                parts.append(f"<p>(plot {esc(b[2])} is missing)</p>")
        elif kind == "code":
            parts.append(f"<pre>{esc(b[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    out, code = [], False
    for i, piece in enumerate(text.split("`")):
        e = html.escape(piece)
        out.append(f"<code>{e}</code>" if code else e)
        code = not code
    return "".join(out)


def render(report: Mapping[str, Any], outdir: str | os.PathLike) -> dict[str, str]:
    """Write ``report.md`` and ``report.html`` for ``report`` (plots must already be in place)."""
    outdir = Path(outdir)
    bl = blocks(report)
    md = write_text_atomic(outdir / "report.md", to_markdown(bl))
    ht = write_text_atomic(outdir / "report.html", to_html(bl, outdir))
    return {"markdown": str(md), "html": str(ht)}


def write_report(report: dict[str, Any], outdir: str | os.PathLike) -> dict[str, Any]:
    """Validate ``report``, draw its plots, write report.json, report.md and report.html into ``outdir``."""
    outdir = Path(outdir)
    validate_report(report, "report")
    report["plots"] = write_all(report, outdir)
    path = write_text_atomic(outdir / "report.json", json.dumps(report, indent=2, default=json_default))
    return {"report": str(path), **render(report, outdir), "plots": report["plots"]}


def render_run_dir(outdir: str | os.PathLike) -> dict[str, Any]:
    """``onnxprune report OUTDIR``: validate report.json, re-draw the plots, re-write md and html."""
    return write_report(load_report(outdir), outdir)
