"""`onnxprune quantize`: ONNX Runtime's quantizer as a stage, checked against the float model; and
models that are already quantized are recognised (inspect) or refused with the way out."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from onnxprune.core.quantized import quantization_kind, refuse_integer_ops
from onnxprune.core.errors import OnnxPruneError
from onnxprune.quantization.static import plan_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's digits CNN, trained for a few epochs (seconds): quantization error shows on real weights."""
    pytest.importorskip("torch")
    from onnxprune.commands.demo_model import train_demo_model

    path = tmp_path_factory.mktemp("q") / "digits.onnx"
    train_demo_model(path, epochs=3, width=8)
    return path


def test_static_int8_qdq_keeps_the_trained_model_close_and_holds_samples_out(trained, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, err = run_cli("quantize", trained, "-o", out, "--calibrate", "digits", "--calibration-samples", "128",
                                "--check-samples", "64", "--output-kind", "output=scores", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["format"] == "qdq" and res["per_channel"] is True
    assert res["calibration"] == {"method": "minmax", "samples": 128, "check_samples": 64, "held_out": True}
    assert res["quantized_ops"]["QuantizeLinear"] > 0 and res["quantized_ops"]["DequantizeLinear"] > 0
    assert res["size_ratio"] < 0.8  # int8 weights (the width-8 CNN is small: names and scales weigh too)
    fid = res["fidelity"]["outputs"]["output"]
    assert fid["top1_agreement"] >= 0.95 and fid["cosine"] > 0.99
    assert quantization_kind(onnx.load(out))["kind"] == "qdq"
    q_inits = {t.name: t for t in onnx.load(out).graph.initializer}
    assert any(t.data_type == TensorProto.INT8 for t in q_inits.values())  # per-channel int8 weights


def test_tensorrt_placement_is_symmetric_int8_on_conv_and_gemm(trained, tmp_path):
    assert plan_for(None, "tensorrt")["op_types"] == ["Conv", "MatMul", "Gemm"]
    out = tmp_path / "trt.onnx"
    from onnxprune.quantization import quantize_model

    res = quantize_model(trained, out, "digits", backend="tensorrt", samples=64, check_samples=16)
    m = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    zero_points = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8
    weight_consumers = {c.op_type for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                        for c in m.graph.node if n.output[0] in c.input}
    assert weight_consumers == {"Conv", "Gemm"}  # int8 weights only where TensorRT runs int8 kernels
    assert "tensorrt" in res["why"]


def test_fp16_for_gpu_profiles_keeps_float32_io(trained, tmp_path):
    out = tmp_path / "h.onnx"
    code, stdout, err = run_cli("quantize", trained, "-o", out, "--format", "fp16", "--calibrate", "digits",
                                "--check-samples", "32", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    m = onnx.load(out)
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in m.graph.initializer)
    assert res["fidelity"]["outputs"]["output"]["cosine"] > 0.999 and res["fidelity"]["output_kinds"] == {"output": "value"}
    assert plan_for(None, "ort-cuda")["format"] == "fp16"


def test_timed_against_the_float_model_on_a_profile(trained, tmp_path):
    code, stdout, err = run_cli("quantize", trained, "-o", tmp_path / "q.onnx", "--calibrate", "digits",
                                "--calibration-samples", "32", "--check-samples", "16", "--hw", "ci-cpu", "--json")
    assert code == 0, err
    lat = json.loads(stdout)["latency"]
    assert lat["timing"] == "interleaved" and lat["provider"] == "CPUExecutionProvider"
    assert lat["speedup_p50"] == pytest.approx(lat["float_p50_ms"] / lat["quantized_p50_ms"])


def test_refusals_are_one_line(trained, tmp_path):
    code, _, err = run_cli("quantize", trained, "-o", tmp_path / "q.onnx")
    assert code == 1 and "needs calibration inputs" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("quantize", trained, "-o", trained, "--calibrate", "digits")
    assert code == 1 and len(err.strip().splitlines()) == 1
    q = tmp_path / "q.onnx"
    assert run_cli("quantize", trained, "-o", q, "--calibrate", "digits", "--calibration-samples", "16")[0] == 0
    code, _, err = run_cli("quantize", q, "-o", tmp_path / "qq.onnx", "--calibrate", "digits")
    assert code == 1 and "already quantized (QDQ" in err
    assert not (tmp_path / "qq.onnx").exists()


def _integer_model(op: str) -> onnx.ModelProto:
    """A dynamically quantized conv (ConvInteger) or a QOperator conv (QLinearConv), built by hand."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w")
    if op == "ConvInteger":
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("ConvInteger", ["xq", "w", "xz"], ["y"])]
        out_type = TensorProto.INT32
    else:
        consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
                  (("s", 0.1, np.float32), ("z", 0, np.int8), ("ws", 0.1, np.float32), ("wz", 0, np.int8))]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("QLinearConv", ["xq", "s", "z", "w", "ws", "wz", "s", "z"], ["y"])]
        out_type = TensorProto.INT8
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", out_type, [1, 4, 6, 6])],
                          [w] + ([] if op == "ConvInteger" else consts))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,kind", [("ConvInteger", "dynamic"), ("QLinearConv", "qoperator")])
def test_integer_models_are_recognised_and_refused_with_the_way_out(op, kind):
    model = _integer_model(op)
    q = quantization_kind(model)
    assert q["kind"] == kind and op in q["ops"] and q["label"].startswith("quantized (")
    with pytest.raises(OnnxPruneError, match="prune the float model, then run onnxprune quantize"):
        refuse_integer_ops(model, "prune")
    assert quantization_kind(_float_model()) is None


def _float_model() -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode", [["--unstructured", "--sparsity", "0.5"], ["--nm", "2:4"]])
def test_prune_refuses_an_integer_model_in_one_line(tmp_path, mode):
    path = tmp_path / "dyn.onnx"
    onnx.save(_integer_model("ConvInteger"), str(path))
    code, _, err = run_cli("prune", path, "-o", tmp_path / "out.onnx", *mode)
    assert code == 1 and "then run onnxprune quantize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
