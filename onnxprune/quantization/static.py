"""``onnxprune quantize``: static INT8 (QDQ or QOperator) or FP16, chosen for the target profile.

* ``qdq`` (default): ``QuantizeLinear``/``DequantizeLinear`` pairs around float ops, per-channel
  int8 weights, activations calibrated on unlabeled inputs. ONNX Runtime CPU fuses them into integer
  kernels (uint8 activations, int8 weights); a TensorRT profile gets symmetric int8 activations and
  weights, and Q/DQ only on Conv/MatMul/Gemm inputs: the explicit-quantization placement TensorRT
  builds int8 engines from.
* ``qoperator``: fused integer ops (``QLinearConv`` ...), for runtimes without QDQ fusion.
* ``fp16``: float16 weights and compute with float32 inputs/outputs kept, for GPU profiles (no
  calibration).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16

from ..calibration.data import calibration_inputs
from ..core.quantized import quantization_kind
from ..core.runtime import fixed_batch
from ..datasets.fidelity import evaluate_fidelity, mean_rel_l2
from ..core.errors import OnnxPruneError, ort_error_text
from ..core.model_io import PROTOBUF_LIMIT, atomic_path, file_bytes, load_model, proto_bytes, refuse_overwrite_input, save_model

FORMATS = ("qdq", "qoperator", "fp16")
METHODS = ("minmax", "entropy", "percentile")
#: backends whose profiles want float16 instead of int8
FP16_BACKENDS = {"ort-cuda", "torch-cuda"}


def plan_for(fmt: str | None, backend: str | None) -> dict[str, Any]:
    """The quantization settings for ``fmt`` (None: chosen by the profile's ``backend``), and why."""
    if fmt is None:
        if backend in FP16_BACKENDS:
            fmt, why = "fp16", f"{backend} profile: float16 on the GPU (int8 needs TensorRT there)"
        elif backend == "tensorrt":
            fmt, why = "qdq", "tensorrt profile: QDQ, symmetric int8, Q/DQ on Conv/MatMul/Gemm (explicit quantization)"
        else:
            fmt, why = "qdq", "ONNX Runtime CPU: QDQ, uint8 activations and per-channel int8 weights (fused U8S8 kernels)"
    else:
        why = f"--format {fmt}"
    if fmt not in FORMATS:
        raise OnnxPruneError(f"unknown quantization format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    trt = backend == "tensorrt"
    return {"format": fmt, "why": why, "symmetric_activations": trt, "activation_type": "int8" if trt else "uint8",
            "weight_type": "int8", "op_types": ["Conv", "MatMul", "Gemm"] if trt else None}


class _Reader:
    """ONNX Runtime's CalibrationDataReader over in-memory arrays, one sample per call."""

    def __init__(self, inputs: Mapping[str, np.ndarray], batch: int) -> None:
        n = len(next(iter(inputs.values())))
        self._batches = iter([{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, n, batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - the minmax/entropy collectors do not rewind
        raise NotImplementedError


def quantize_model(model_path: "str | os.PathLike", output: "str | os.PathLike", calibration: Any = None, *,
                   fmt: str | None = None, backend: str | None = None, per_channel: bool = True,
                   method: str = "minmax", samples: int = 256, check_samples: int = 64, seed: int = 0,
                   output_kinds: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Quantize ``model_path`` into ``output`` and check it against the float model.

    ``calibration``: a data spec or arrays (labels unused); ``samples`` of them calibrate, and up to
    ``check_samples`` *other* ones measure fidelity to the float model, by each output's kind
    (``output_kinds``, else inferred: :mod:`onnxprune.datasets.output_kind`). Returns the JSON summary.
    """
    t0 = time.perf_counter()
    src, out = Path(model_path), Path(output)
    refuse_overwrite_input(src, out)
    model = load_model(src)
    if proto_bytes(model) > PROTOBUF_LIMIT:
        raise OnnxPruneError(f"{src}: over 2 GB; onnxprune quantize handles models up to protobuf's 2 GB limit")
    already = quantization_kind(model)
    if already:
        raise OnnxPruneError(f"{src}: the model is already {already['label']}; quantize the float model")
    if method not in METHODS:
        raise OnnxPruneError(f"unknown calibration method {method!r} (expected one of: {', '.join(METHODS)})")
    plan = plan_for(fmt, backend)
    check_inputs = None
    summary: dict[str, Any] = {"input": str(src), "output": str(out), **{k: plan[k] for k in ("format", "why")},
                               "per_channel": per_channel if plan["format"] != "fp16" else None, "notes": []}
    if plan["format"] == "fp16":
        if calibration is not None:
            summary["notes"].append("fp16 needs no calibration: --calibrate is used only to check fidelity")
        quantized = _to_fp16(model)
        if calibration is not None:
            check_inputs = calibration_inputs(calibration, model, check_samples, seed=seed)
        save_model(quantized, out)
    else:
        if calibration is None:
            raise OnnxPruneError("static int8 quantization needs calibration inputs: --calibrate SPEC "
                                 "(a few hundred unlabeled samples)")
        inputs = calibration_inputs(calibration, model, samples + check_samples, seed=seed)
        n = len(next(iter(inputs.values())))
        n_check = min(check_samples, max(n - 1, 0) // 2) if n > 1 else 0
        calib = {k: v[: n - n_check] for k, v in inputs.items()}
        check_inputs = {k: v[n - n_check:] for k, v in inputs.items()} if n_check else None
        summary["calibration"] = {"method": method, "samples": n - n_check,
                                  "check_samples": n_check, "held_out": True}
        if not n_check:
            summary["notes"].append("too few samples to hold any out: fidelity not measured")
        _quantize_static(src, out, calib, plan, per_channel, method, batch=fixed_batch(model) or 1)
    summary["file_bytes"], summary["input_file_bytes"] = file_bytes(out), file_bytes(src)
    summary["size_ratio"] = summary["file_bytes"] / max(summary["input_file_bytes"], 1)
    q = quantization_kind(load_model(out, check=False))
    summary["quantized_ops"] = q["ops"] if q else {}
    if check_inputs is not None and len(next(iter(check_inputs.values()))):
        fid, _ = evaluate_fidelity(out, src, check_inputs, output_kinds=output_kinds)
        summary["fidelity"] = {**fid, "mean_rel_l2": mean_rel_l2(fid["outputs"]), "reference": "the float model",
                               "held_out": True}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    return convert_float_to_float16(model, keep_io_types=True)


def _quantize_static(src: Path, out: Path, calib: Mapping[str, np.ndarray], plan: dict[str, Any], per_channel: bool,
                     method: str, batch: int) -> None:
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as part:
        prep = Path(tmp) / "prep.onnx"
        try:
            # shape inference + ORT's graph optimizations first, as ONNX Runtime recommends before static quantization
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimization; quantize the model as it is
            prep = src
        try:
            quantize_static(str(prep), str(part), _Reader(calib, batch),
                            quant_format=QuantFormat.QDQ if plan["format"] == "qdq" else QuantFormat.QOperator,
                            op_types_to_quantize=plan["op_types"], per_channel=per_channel,
                            activation_type=types[plan["activation_type"]], weight_type=types[plan["weight_type"]],
                            calibrate_method=methods[method],
                            extra_options={"ActivationSymmetric": plan["symmetric_activations"], "WeightSymmetric": True})
        except OnnxPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizer raises assorted types
            raise OnnxPruneError(f"{src}: ONNX Runtime's quantizer failed: {ort_error_text(exc)}") from None
