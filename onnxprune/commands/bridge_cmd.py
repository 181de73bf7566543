"""``onnxprune bridge-check MODEL``: the ONNX->torch bridge against ONNX Runtime.

torch is imported inside the command, so this module (and ``onnxprune --help``) loads without it.
"""
from __future__ import annotations

import click

from ..errors import OnnxPruneError, UnavailableError, ort_error_text
from .common import emit_json, input_shape_option, json_option, model_argument


@click.command("bridge-check")
@model_argument
@input_shape_option
@json_option
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Tolerance relative to the largest reference output value.")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def bridge_check_cmd(model: str, input_shapes: dict, as_json: bool, rtol: float, atol: float, seed: int) -> None:
    """Run MODEL (the graph finetune trains) through the torch bridge and ONNX Runtime on the same
    random inputs; exit 1 naming the first diverging node if their outputs differ."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UnavailableError("bridge-check needs torch (pip install 'onnxprune[train]')") from exc
    from ..bridge.check import check_bridge, divergence_message, load_for_check
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # its failures come back as exceptions: one error line, no log spam

    try:
        report = check_bridge(load_for_check(model), input_shapes, rtol=rtol, atol=atol, seed=seed)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        # the reference run itself fails: the model is broken (or ONNX Runtime lacks something), not the bridge
        raise OnnxPruneError(f"{model}: ONNX Runtime cannot run the model: {ort_error_text(exc)}") from exc
    if as_json:
        emit_json({k: report[k] for k in ("max_abs_diff", "max_rel_diff", "ok", "first_diverging_node",
                                          "first_diverging_op", "outputs", "inputs")})
    else:
        click.echo(f"{model}: inputs {report['inputs']}")
        for o in report["outputs"]:
            click.echo(f"  output {o['name']} {o['shape']}: max abs diff {o['max_abs_diff']:.3g}, "
                       f"max rel diff {o['max_rel_diff']:.3g} {'ok' if o['ok'] else 'DIFFERS'}")
        if report["ok"]:
            click.echo(f"bridge matches ONNX Runtime (rtol {rtol:g}, atol {atol:g})")
    if not report["ok"]:
        raise OnnxPruneError(divergence_message(report))
