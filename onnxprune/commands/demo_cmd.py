"""``onnxprune demo``: the embedded default job, end to end, with nothing but the install."""
from __future__ import annotations

import time

import click
from rich.console import Console

from .common import emit_json, json_option
from .demo_model import run_demo
from .run_cmd import print_summary


@click.command("demo")
@click.option("-o", "--out", "outdir", default="demo_out", show_default=True, metavar="OUTDIR",
              help="Run directory (re-running reuses every finished step).")
@click.option("--quick", is_flag=True, help="Fewer epochs and timing runs: a smoke test, not numbers to quote.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a field of recipes/demo.yaml.")
@json_option
def demo_cmd(outdir: str, quick: bool, overrides: tuple[str, ...], as_json: bool) -> None:
    """Train a small CNN on scikit-learn's digits, export it to ONNX, prune it structured and unstructured
    at two operating points each, retrain, profile on the CPU profile and write the report."""

    con = Console(stderr=as_json)
    t0 = time.perf_counter()
    if not as_json:
        con.print(f"[bold]onnxprune demo[/bold]{' (quick)' if quick else ''}: training a small CNN on digits, then "
                  "running recipes/demo.yaml (structured vs unstructured, retrained, profiled on ci-cpu)")
    report = run_demo(outdir, quick=quick, progress=not as_json, overrides=overrides)
    if as_json:
        emit_json(report)
        return
    print_summary(report, outdir, con)
    con.print(f"done in {time.perf_counter() - t0:.0f} s")
