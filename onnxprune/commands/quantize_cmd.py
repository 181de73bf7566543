"""``onnxprune quantize MODEL -o OUT --calibrate SPEC``: INT8 or FP16 through ONNX Runtime's quantizer,
checked against the float model and, with ``--hw``, timed against it."""
from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from ..datasets.output_kind import parse_output_kinds
from ..profiling.api import compare_models, load_profiles
from ..quantization import FORMATS, quantize_model
from .common import emit_json, human, json_option, model_argument


@click.command("quantize")
@model_argument
@click.option("-o", "--output", required=True, metavar="OUT", help="Where to write the quantized model (never the input).")
@click.option("--calibrate", "calibrate", default=None, metavar="SPEC",
              help="Unlabeled calibration inputs (any data spec; labels unused; the train split by default). "
                   "Needed for int8; for fp16 only used to check fidelity.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="qdq (QuantizeLinear/DequantizeLinear around float ops), qoperator (fused integer ops) or fp16. "
                   "Default: chosen by --hw (fp16 for CUDA profiles, QDQ for TensorRT and CPU).")
@click.option("--hw", default=None, metavar="PROFILE",
              help="Target hardware profile: picks the format and placement, and the quantized model is timed "
                   "interleaved with the float model on it.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration data.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--check-samples", type=click.IntRange(min=0), default=64, show_default=True,
              help="Further samples, not used to calibrate, on which the quantized outputs are compared with the float model's.")
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME=KIND",
              help="What an output is (scores, probs, embedding, value; repeatable): scores/probs get top1_agreement "
                   "against the float model, an embedding mean_cosine and nn_agreement. Inferred from the graph otherwise.")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="With --hw: time the float and quantized models interleaved on the profile.")
@json_option
def quantize_cmd(model: str, output: str, calibrate: str | None, fmt: str | None, hw: str | None, per_channel: bool,
                 calibration_method: str, calibration_samples: int, check_samples: int, output_kind: tuple[str, ...],
                 measure: bool, as_json: bool) -> None:
    """Quantize MODEL (static INT8 QDQ by default, through onnxruntime.quantization) and report its size,
    its fidelity to the float model on held-out samples and, with --hw, whether it is actually faster."""
    profile = load_profiles(hw)[0] if hw else None
    res = quantize_model(model, output, calibrate, fmt=fmt, backend=profile.backend if profile else None,
                         per_channel=per_channel, method=calibration_method, samples=calibration_samples,
                         check_samples=check_samples, output_kinds=parse_output_kinds(output_kind))
    if profile is not None and measure:
        cmp = compare_models(model, output, profile)
        first = cmp["comparisons"][0]
        res["latency"] = {"profile": cmp["profile"], "provider": cmp["provider"], "batch_size": first["batch_size"],
                          "float_p50_ms": first["a"]["latency_ms"]["p50"],
                          "quantized_p50_ms": first["b"]["latency_ms"]["p50"],
                          "speedup_p50": first["ratios"]["speedup_p50"], "timing": "interleaved",
                          **({"measured_on": cmp["measured_on"]} if "measured_on" in cmp else {})}
        if first["ratios"]["speedup_p50"] < 1.03:
            res["notes"].append(f"not faster on {cmp['profile']} ({first['ratios']['speedup_p50']:.2f}x, timed "
                                "interleaved with the float model): keep the float model there unless size matters")
    if as_json:
        emit_json(res)
        return
    _print(res)


def _print(res: dict[str, Any]) -> None:
    con = Console()
    con.print(f"[bold]{res['output']}[/bold]: {res['format']} ({res['why']})")
    ops = ", ".join(f"{k} x{v}" for k, v in res["quantized_ops"].items()) or "none"
    con.print(f"size {human(res['file_bytes'], 'B')} (float {human(res['input_file_bytes'], 'B')}, "
              f"{res['size_ratio']:.2f}x); quantized ops: {ops}")
    cal = res.get("calibration")
    if cal:
        con.print(f"calibrated on {cal['samples']} samples ({cal['method']}); checked on {cal['check_samples']} others")
    fid = res.get("fidelity")
    if fid:
        for name, f in fid["outputs"].items():
            agree = f"  top-1 agreement {f['top1_agreement']:.2%}" if f.get("top1_agreement") is not None else ""
            con.print(f"  {name}: rel_l2 {f['rel_l2']:.4g}  cosine {f['cosine']:.6f}{agree}  (vs the float model)")
    lat = res.get("latency")
    if lat:
        con.print(f"latency p50 on {lat['profile']} (batch {lat['batch_size']}, {lat['provider']}): float "
                  f"{lat['float_p50_ms']:.3f} ms, quantized {lat['quantized_p50_ms']:.3f} ms: "
                  f"{lat['speedup_p50']:.2f}x (interleaved)")
    for n in res["notes"]:
        con.print(f"note: {n}")
