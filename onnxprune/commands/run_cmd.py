"""``onnxprune run``, ``onnxprune report`` and ``onnxprune compare-runs``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import click
from rich.console import Console
from rich.table import Table

from .common import emit_json, json_option, remote_options
from ..report.plots import accuracy_split, all_points, with_twins
from ..report.render import fmt_bytes, fmt_num, fmt_stat, fmt_x, render_run_dir
from ..recipes import shipped_recipes
from ..pipeline.run import run_recipe
from ..report.compare import compare_runs


def wide(con: Console | None = None) -> Console:
    """A console that does not squeeze tables into 80 columns when writing to a pipe or log file."""
    con = con or Console()
    if not con.is_terminal and con.width < 160:
        con.width = 160
    return con


def print_summary(report: Mapping[str, Any], outdir: str | Path, con: Console | None = None) -> None:
    """A short table of the results and where the report is."""

    con = wide(con)
    split = accuracy_split(report)
    profiles = [p["name"] for p in report["hw_profiles"]]
    table = Table(title=f"{report['recipe']['name']}: results", show_lines=False)
    cols = ["point", "params", "compression", "MACs", "gzip"] + ([f"{split} top-1"] if split else [])
    for prof in profiles:
        cols += [f"p50 ms {prof}", "speedup"]
    for c in cols:
        table.add_column(c, justify="left" if c == "point" else "right", no_wrap=c == "point")
    front = {pid for ids in report.get("pareto", {}).values() for pid in ids}
    for p in with_twins(all_points(report)):  # a quantized twin under its float point
        row = [p["id"] + (" *" if p["id"] in front else ""), fmt_num(p["params"]), fmt_x(p["compression_ratio"]),
               fmt_num(p["macs"]), fmt_bytes(p["gzip_bytes"])]
        if split:
            row.append(fmt_stat((p["accuracy"].get(split) or {}).get("top1")))
        for prof in profiles:
            recs = p["profiles"].get(prof) or []
            row += [f"{recs[0]['latency_ms']['p50']:.3f}" if recs else "n/a", fmt_x(recs[0].get("speedup_vs_dense")) if recs else "n/a"]
        table.add_row(*row)
    con.print(table)
    if front:
        con.print("[dim]* on the accuracy-vs-latency Pareto front of a profile[/dim]")
    for g in report.get("guidance", []):
        if g.startswith("On "):  # the measured statements; the backend explanations are in the report
            con.print(f"[yellow]note:[/yellow] {g}")
    for n in report.get("notes", []):
        con.print(f"[yellow]note:[/yellow] {n}")
    out = Path(outdir)
    steps = report.get("steps", {})
    con.print(f"report: [bold]{out / 'report.html'}[/bold] (also {out / 'report.md'}, {out / 'report.json'}; "
              f"models in {out / 'models'}); {steps.get('executed', 0)} step(s) run, {steps.get('skipped', 0)} reused")


def _shipped_epilog() -> str:
    return "Shipped recipes: " + ", ".join(shipped_recipes()) + "."


@click.command("run", epilog=_shipped_epilog())
@click.argument("recipe", metavar="RECIPE")
@click.argument("model", type=click.Path(path_type=str), metavar="MODEL")
@click.option("-o", "--out", "outdir", default="out", show_default=True, metavar="OUTDIR",
              help="Run directory: models/, plots/, report.json/.md/.html and state.json (resumable).")
@click.option("--data", "data_spec", default=None, metavar="SPEC", help="Dataset spec (overrides the recipe's data).")
@click.option("--hw", "hw", multiple=True, metavar="PROFILE",
              help="Hardware profile name or YAML path (repeatable; replaces the recipe's hw list).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, YAML value, dotted path (repeatable): --set retrain.epochs=3 --set sweep.seeds=[0,1]")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where the operating points run: here, one after another (local), or as Ray tasks (ray; needs "
                   "onnxprune[ray]). Default: the recipe's executor, else local.")
@click.option("--ray-address", "ray_address", default=None, metavar="ADDR",
              help="Ray cluster to run on (HOST:6379, ray://HOST:10001 or auto; implies --executor ray). "
                   "Default: RAY_ADDRESS, else a Ray instance started on this machine.")
@remote_options
@json_option
def run_cmd(recipe: str, model: str, outdir: str, data_spec: str | None, hw: tuple[str, ...],
            overrides: tuple[str, ...], executor: str | None, ray_address: str | None, remote: str | None,
            ssh_options: tuple[str, ...], as_json: bool) -> None:
    """Run RECIPE (a shipped name such as demo, or a YAML path) on MODEL and write the report.

    Re-running with the same OUTDIR skips every step that already finished with the same inputs.
    """

    report = run_recipe(recipe, model, outdir, data=data_spec, hw=hw, overrides=overrides, progress=not as_json,
                        executor=executor, ray_address=ray_address, remote=remote, ssh_options=ssh_options)
    if as_json:
        emit_json(report)
        return
    print_summary(report, outdir)


@click.command("report")
@click.argument("outdir", type=click.Path(path_type=str), metavar="OUTDIR")
@json_option
def report_cmd(outdir: str, as_json: bool) -> None:
    """Re-render report.md, report.html and the plots of OUTDIR from its report.json."""

    res = render_run_dir(outdir)
    if as_json:
        emit_json(res)
        return
    Console().print(f"wrote {res['markdown']}, {res['html']} and {len(res['plots'])} plot(s)")


@click.command("compare-runs")
@click.argument("dir_a", type=click.Path(path_type=str), metavar="DIR1")
@click.argument("dir_b", type=click.Path(path_type=str), metavar="DIR2")
@json_option
def compare_runs_cmd(dir_a: str, dir_b: str, as_json: bool) -> None:
    """Put two run directories side by side (points matched by id; B - A differences)."""

    res = compare_runs(dir_a, dir_b)
    if as_json:
        emit_json(res)
        return
    con = wide()
    con.print(f"A = {dir_a} ({res['recipe_a']})   B = {dir_b} ({res['recipe_b']})")
    table = Table()
    cols = ["point", "params A", "params B", "compression A", "compression B", "top-1 A", "top-1 B", "Δ top-1"]
    for prof in res["profiles"]:
        cols += [f"p50 A {prof}", f"p50 B {prof}"]
    for c in cols:
        table.add_column(c, justify="left" if c == "point" else "right", no_wrap=c == "point")

    def pct(v):
        return "n/a" if v is None else f"{v:.2%}"

    for r in res["rows"]:
        a, b = r["a"] or {}, r["b"] or {}
        d = r.get("delta") or {}
        row = [r["id"], fmt_num(a.get("params")), fmt_num(b.get("params")), fmt_x(a.get("compression_ratio")),
               fmt_x(b.get("compression_ratio")), pct(a.get("top1")), pct(b.get("top1")),
               "n/a" if d.get("top1") is None else f"{d['top1'] * 100:+.2f} pt"]
        for prof in res["profiles"]:
            for side in (a, b):
                v = (side.get("latency_p50_ms") or {}).get(prof)
                row.append("n/a" if v is None else f"{v:.3f}")
        table.add_row(*row)
    con.print(table)
    for n in res["notes"]:
        con.print(f"[yellow]note:[/yellow] {n}")
