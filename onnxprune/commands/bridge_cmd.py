"""``onnxprune bridge-check MODEL``: the ONNX->torch bridge against ONNX Runtime.

torch is imported inside the command, so this module (and ``onnxprune --help``) loads without it.
"""
from __future__ import annotations

import click

from ..core.errors import OnnxPruneError, UnavailableError, ort_error_text
from .common import emit_json, input_shape_option, json_option, model_argument
import onnxruntime

_SHOWN = {"ok": "ok", "borderline": "BORDERLINE", "diverges": "DIFFERS"}


@click.command("bridge-check")
@model_argument
@input_shape_option
@json_option
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Least tolerance, relative to the largest reference output value (the tolerance grows "
                   "to 10x the model's own float32 noise floor where that is larger).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True, help="Least absolute tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def bridge_check_cmd(model: str, input_shapes: dict, as_json: bool, rtol: float, atol: float, seed: int) -> None:
    """Run MODEL (the graph finetune trains) through the torch bridge and ONNX Runtime on the same
    random inputs; exit 1 naming the first diverging node if their outputs diverge.

    The tolerance fits the model's own float32 noise floor (ONNX Runtime with against without graph
    optimizations, and on inputs moved by one float32 rounding): within 10x the noise (or rtol) the
    bridge matches; up to 5x that tolerance it is borderline (a warning, exit 0); beyond, it diverges.
    """
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UnavailableError("bridge-check needs torch (pip install 'onnxprune[train]')") from exc
    from ..bridge.check import BORDERLINE_STATUS, borderline_message, check_bridge, divergence_message, load_for_check  # lazy: imports torch

    onnxruntime.set_default_logger_severity(4)  # its failures come back as exceptions: one error line, no log spam

    try:
        report = check_bridge(load_for_check(model), input_shapes, rtol=rtol, atol=atol, seed=seed)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        # the reference run itself fails: the model is broken (or ONNX Runtime lacks something), not the bridge
        raise OnnxPruneError(f"{model}: ONNX Runtime cannot run the model: {ort_error_text(exc)}") from exc
    if as_json:
        emit_json({k: report[k] for k in ("status", "ok", "max_abs_diff", "max_rel_diff", "noise_floor_rel",
                                          "tolerance_rel", "refuse_above_rel", "worst_output", "first_diverging_node",
                                          "first_diverging_op", "outputs", "inputs")})
    else:
        click.echo(f"{model}: inputs {report['inputs']}")
        for o in report["outputs"]:
            noise = o.get("noise_sources") or {}
            figures = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in noise.items() if v is not None)
            click.echo(f"  output {o['name']} {o['shape']}: max abs diff {o['max_abs_diff']:.3g}, "
                       f"max rel diff {o['max_rel_diff']:.3g}; noise floor {o.get('noise_floor', 0.0):.3g}"
                       f"{f' ({figures})' if figures else ''}, tolerance {o.get('tolerance', 0.0):.3g}: "
                       f"{_SHOWN[o['status']]}")
        if report["status"] == "ok":
            click.echo(f"bridge matches ONNX Runtime within the model's float32 noise "
                       f"(tolerance {report['tolerance_rel']:.3g} relative: 10x noise floor "
                       f"{report['noise_floor_rel']:.3g}, at least rtol {rtol:g})")
    if report["status"] == BORDERLINE_STATUS:
        click.echo(f"warning: {borderline_message(report)}", err=True)
    if not report["ok"]:
        raise OnnxPruneError(divergence_message(report))
