"""``onnxprune optimize MODEL -o OUTDIR --hw PROFILE --data SPEC`` with a goal, a bound and a budget.

The search itself is :mod:`onnxprune.optimize`; this module only reads the flags and prints. A goal
that is not reached within the bound ends with exit 1 and one line saying the best model found
(which is written to ``OUTDIR/model.onnx`` all the same).
"""
from __future__ import annotations

import click

from ..core.errors import OnnxPruneError
from .common import emit_json, json_option, model_argument
from ..datasets.output_kind import parse_output_kinds
from ..optimize import optimize
from .prune_cmd import _int, _number


@click.command("optimize")
@model_argument
@click.option("-o", "--output", "outdir", default=None, metavar="OUTDIR",
              help="Directory for model.onnx, report.{json,md,html}, recipe.yaml and the run cache (re-runs resume).")
@click.option("--hw", default=None, metavar="PROFILE", help="Hardware profile the goal is measured on (remote boards too).")
@click.option("--data", "data_spec", default=None, metavar="SPEC",
              help="Dataset spec (labels optional): train for calibration/distillation, val to choose, test reported once.")
@click.option("--target-speedup", default=None, metavar="X", help="Goal: dense p50 / optimized p50 >= X.")
@click.option("--target-latency", default=None, metavar="MS", help="Goal: optimized p50 <= MS milliseconds.")
@click.option("--max-drop", default=None, metavar="PCT",
              help="Bound: at most PCT points of top-1 lost on val (with --metric: PCT percent of its first figure).")
@click.option("--min-fidelity", default=None, metavar="X",
              help="Bound: top-1 agreement with the dense model (cosine for non-class outputs) >= X on val; no labels needed.")
@click.option("--metric", default=None, metavar="python:MODULE:FUNCTION",
              help="Task metric for --max-drop: FUNCTION(outputs, labels or None) -> {name: number}, higher is better.")
@click.option("--max-epochs", default="0", show_default=True, metavar="N",
              help="Budget of label-free distillation epochs (0 = no training).")
@click.option("--time-budget", default=None, metavar="MIN", help="Stop searching after MIN minutes.")
@click.option("--batch-size", default=None, metavar="N",
              help="Batch size timed (default: the profile's first batch size).")
@click.option("--quantize", is_flag=True,
              help="Also try INT8 quantization of the chosen model; kept only if measured faster and within the bound.")
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME=KIND",
              help="What an output is (scores, probs, embedding, value; repeatable): scores/probs are judged by top-1 "
                   "agreement with the dense model, an embedding by mean cosine, a value by cosine. Inferred otherwise.")
@click.option("--bisect-steps", default="4", show_default=True, metavar="N",
              help="Lower targets tried (bisection over the speedup) when the bound fails at the goal.")
@json_option
def optimize_cmd(model: str, outdir: str | None, hw: str | None, data_spec: str | None, target_speedup: str | None,
                 target_latency: str | None, max_drop: str | None, min_fidelity: str | None, metric: str | None,
                 max_epochs: str, time_budget: str | None, batch_size: str | None, quantize: bool,
                 output_kind: tuple[str, ...], bisect_steps: str, as_json: bool) -> None:
    """From MODEL, a speed goal on a hardware profile, a quality bound and a budget to the model to
    ship: latency-aware pruning + calibration first, distillation and lower targets only when the
    bound fails; every candidate measured and reported."""
    for value, flag in ((outdir, "-o OUTDIR"), (hw, "--hw PROFILE"), (data_spec, "--data SPEC")):
        if not value:
            raise OnnxPruneError(f"missing {flag}")

    def num(raw: str | None, flag: str) -> float | None:  # one line for a bad value (click's usage is three)
        return None if raw is None else _number(raw, flag)

    log = None if as_json else (lambda line: click.echo(line, err=True))
    report = optimize(model, outdir, hw=hw, data=data_spec, target_speedup=num(target_speedup, "--target-speedup"),
                      target_latency_ms=num(target_latency, "--target-latency"), max_drop=num(max_drop, "--max-drop"),
                      min_fidelity=num(min_fidelity, "--min-fidelity"), metric=metric,
                      max_epochs=_int(max_epochs, "--max-epochs", 0, minimum=0),
                      time_budget_min=num(time_budget, "--time-budget"),
                      batch_size=None if batch_size is None else _int(batch_size, "--batch-size", 1, minimum=1),
                      quantize=quantize, bisect_steps=_int(bisect_steps, "--bisect-steps", 4, minimum=0), log=log,
                      output_kinds=parse_output_kinds(output_kind))
    if as_json:
        emit_json(summary(report))
    elif report["reached"]:
        click.echo(report["message"])
        click.echo(f"written: {report['output']}, report.md/.html/.json, recipe.yaml in {outdir}")
    if not report["reached"]:
        click.echo(report["message"], err=True)
        raise click.exceptions.Exit(1)


def summary(report: dict) -> dict:
    """``--json``: the report without the per-candidate details."""
    keys = ("model", "output", "profile", "batch_size", "goal", "bound", "budget", "reached", "chosen", "speedup",
            "quality", "test", "measured_on", "message", "seconds", "cache", "notes")
    out = {k: report.get(k) for k in keys}
    out["candidates"] = [{k: c.get(k) for k in ("id", "path", "within_bound", "meets_goal", "verdict", "seconds", "cached")}
                         | {"speedup": c["speed"]["speedup"], "quality": c["quality"].get("task")
                            if report["bound"]["kind"] == "max_drop" else c["quality"].get("fidelity")}
                         for c in report["candidates"]]
    return out
