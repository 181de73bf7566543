"""Quantized inputs (issue 23.3): a QDQ model prunes with ``prune --structured`` through its
DequantizeLinear weights; QOperator and dynamically quantized models are refused with the way out;
``inspect`` labels quantized models and counts the MACs of integer ops.

The QDQ models are a CNN trained on digits for a few seconds, quantized by ONNX Runtime's own
``quantize_static`` (QDQ, per channel and per tensor). Proofs: the zeroed-channel oracle (the
removed channels' int8 consumer weights zeroed in the original give exactly the pruned outputs),
and ``prune(QDQ model)`` against ``quantize(prune(float model))`` with the same channels kept.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from arch_zoo import random_plan, zero_removed_inputs
from calib_models import train_digits_cnn
from cli_util import run_cli
from conftest import run_ort
from onnxprune.channels.analyze import analyze_channels
from onnxprune.channels.quantized import dequantize, quantized_weights
from onnxprune.channels.rewrite import apply_plan
from onnxprune.core.prepare import prepare
from onnxprune.core.quantized import quantization_kind
from onnxprune.metrics.inspection import inspect_model
from onnxprune.structured.prune import prune_structured

pytest.importorskip("torch")
quant = pytest.importorskip("onnxruntime.quantization")


class _Reader(quant.CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._it = iter([{"x": x[i:i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self._it, None)


def _quantize(src, dst, calib: np.ndarray, per_channel: bool, ranges_of: onnx.ModelProto | None = None):
    """ONNX Runtime's static QDQ quantization; ``ranges_of``: a QDQ model whose activation scales and
    zero points are reused (``TensorQuantOverrides``) instead of calibrating them afresh."""
    extra = {"TensorQuantOverrides": _activation_ranges(ranges_of)} if ranges_of is not None else {}
    quant.quantize_static(str(src), str(dst), _Reader(calib), quant_format=quant.QuantFormat.QDQ,
                          per_channel=per_channel, activation_type=quant.QuantType.QUInt8,
                          weight_type=quant.QuantType.QInt8, extra_options=extra)
    return dst


def _activation_ranges(qdq: onnx.ModelProto) -> dict:
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    return {n.input[0].removesuffix("_QuantizeLinear_Input"): [{"scale": inits[n.input[1]],
                                                                 "zero_point": inits[n.input[2]]}]
            for n in qdq.graph.node if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory, one_torch_thread):
    """The float CNN (BN folded, as quantizers see it), its QDQ copies and the data."""
    d = tmp_path_factory.mktemp("qdq")
    model, x_train, x_test, y_test = train_digits_cnn(epochs=3, fold_bn=True)
    fp = d / "float.onnx"
    onnx.save(model, fp)
    calib = x_train[:256]
    return {"dir": d, "float": fp, "calib": calib, "x": x_test, "y": y_test,
            "qdq": {pc: _quantize(fp, d / f"qdq_{pc}.onnx", calib, pc) for pc in (True, False)}}


def _weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, float]]:
    """(float weight, largest quantization step) of the Conv/Gemm nodes in order (a QDQ model's
    weights dequantized; step 0 in a float model)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qw = quantized_weights(model.graph)
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            q = qw.get(n.input[1])
            out.append((inits[n.input[1]], 0.0) if q is None else
                       (dequantize(inits[q.x], inits[q.scale], inits.get(q.zero_point), q.axis),
                        float(inits[q.scale].max())))
    return out


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _with_weights_of(float_path, qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model with its Conv/Gemm weights as the QDQ model holds them (dequantized): the
    criterion then reads identical values on both sides, so both prunings keep the same channels
    (on the raw float weights, channels whose L1 norms differ by less than the rounding may swap)."""
    m = onnx.load(float_path)
    inits = {t.name: t for t in m.graph.initializer}
    names = [n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    for name, (w, _) in zip(names, _weights(qdq_model), strict=True):
        inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
    return m


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qdq_prune_matches_the_float_model_pruned_then_quantized(digits_models, per_channel, ratio):
    qdq = digits_models["qdq"][per_channel]
    d, tag, calib = digits_models["dir"], f"{per_channel}_{ratio}", digits_models["calib"]
    fp = d / f"float_{tag}.onnx"
    onnx.save(_with_weights_of(digits_models["float"], onnx.load(qdq)), fp)
    res_q = prune_structured(qdq, ratio=ratio)
    res_f = prune_structured(fp, ratio=ratio)
    assert res_q.summary["macs_after"] == res_f.summary["macs_after"] < res_q.summary["macs_before"]
    pf = d / f"pruned_float_{tag}.onnx"
    onnx.save(res_f.model, pf)

    # the same channels were kept: the pruned QDQ weights dequantize to the pruned float weights
    wq, wf = _weights(res_q.model), _weights(res_f.model)
    assert [w.shape for w, _ in wq] == [w.shape for w, _ in wf]
    for (a, _), (b, _) in zip(wq, wf):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    x = digits_models["x"]
    ours = run_ort(res_q.model, {"x": x})[0]  # the pruned QDQ model runs in ONNX Runtime
    # quantize(prune(float)) with the activation ranges the QDQ model was calibrated with: the same
    # model up to rounding (within about one step of the output's quantization)
    same_ranges = run_ort(str(_quantize(pf, d / f"q_same_{tag}.onnx", calib, per_channel, onnx.load(qdq))), {"x": x})[0]
    step = float(numpy_helper.to_array(next(t for t in res_q.model.graph.initializer if t.name == "y_scale")))
    assert np.abs(ours - same_ranges).max() <= 1.5 * step and _rel_l2(ours, same_ranges) < 0.02
    # quantize(prune(float)) calibrated afresh: the pruned model's activations outgrow the dense
    # model's ranges (prune(QDQ) keeps those), yet the predictions agree
    fresh = run_ort(str(_quantize(pf, d / f"q_fresh_{tag}.onnx", calib, per_channel)), {"x": x})[0]
    agree = float((ours.argmax(1) == fresh.argmax(1)).mean())
    assert agree >= 0.95, agree


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_int8_weights_scales_and_int32_biases_are_sliced_together(digits_models, per_channel):
    before = onnx.load(digits_models["qdq"][per_channel])
    pruned = prune_structured(before, ratio=0.5).model
    assert quantization_kind(pruned)["kind"] == "qdq"
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    qw = quantized_weights(pruned.graph)
    act_scale = {n.output[0]: inits[n.input[1]] for n in pruned.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] not in inits}
    checked = shrunk = 0
    for n in pruned.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w, b = qw[n.input[1]], qw[n.input[2]]
        assert inits[w.x].dtype == np.int8 and inits[b.x].dtype == np.int32
        cout = inits[w.x].shape[0]
        shrunk += cout < old[w.x].shape[0]
        assert inits[b.x].shape == (cout,)
        if per_channel:
            assert inits[w.scale].shape == inits[w.zero_point].shape == (cout,)
        else:
            assert inits[w.scale].shape == () and inits[w.scale] == old[w.scale]  # per tensor: unchanged
        # bias quantization stays consistent: scale = input_scale * weight_scale, channel by channel
        np.testing.assert_allclose(inits[b.scale] * np.ones(cout), act_scale[n.input[0]] * inits[w.scale] * np.ones(cout),
                                   rtol=1e-6)
        checked += 1
    assert checked == 4 and shrunk == 3  # the classifier's outputs stay


def _int8_tensor(graph: onnx.GraphProto, tensor: str) -> str:
    """Where a QDQ weight's values live: its int8 initializer (symmetric: zero point 0, so a zeroed
    int8 slice dequantizes to exact zeros)."""
    q = quantized_weights(graph).get(tensor)
    if q is None:
        return tensor
    if q.zero_point:
        assert not numpy_helper.to_array({t.name: t for t in graph.initializer}[q.zero_point]).any()
    return q.x


def _zero_removed_int8_inputs(model: onnx.ModelProto, analysis, plan) -> onnx.ModelProto:
    return zero_removed_inputs(model, analysis, plan, stored_as=_int8_tensor)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qdq_zeroed_channel_oracle_is_exact(digits_models, per_channel):
    prep = prepare(str(digits_models["qdq"][per_channel]))
    an = analyze_channels(prep.view)
    assert len(an.prunable) == 3  # the three convs (the classifier reaches the output)
    x = digits_models["x"][:64]
    for seed in (0, 1):
        plan = random_plan(an, np.random.default_rng(seed))
        pruned = apply_plan(prep.model, an, plan)
        ref = run_ort(_zero_removed_int8_inputs(prep.model, an, plan), {"x": x})[0]
        np.testing.assert_allclose(run_ort(pruned, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


def _per_channel_activation_model() -> onnx.ModelProto:
    """Conv -> per-channel QuantizeLinear/DequantizeLinear pair (one shared scale, axis 1) -> Conv."""
    rng = np.random.default_rng(0)
    w1 = np.clip(np.round(rng.standard_normal((6, 3, 3, 3)) * 40), -127, 127).astype(np.int8)
    inits = {"w1_q": w1, "w1_s": np.full(6, 0.02, np.float32), "w1_z": np.zeros(6, np.int8),
             "a_s": rng.uniform(0.02, 0.05, 6).astype(np.float32), "a_z": np.full(6, 128, np.uint8),
             "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"], name="dq_w1", axis=0),
             helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c1", "a_s", "a_z"], ["c1_q"], name="q_a", axis=1),
             helper.make_node("DequantizeLinear", ["c1_q", "a_s", "a_z"], ["c1_dq"], name="dq_a", axis=1),
             helper.make_node("Conv", ["c1_dq", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "pc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_per_channel_activation_scales_are_sliced_once_for_the_pair():
    prep = prepare(_per_channel_activation_model())
    an = analyze_channels(prep.view)
    (g,) = an.prunable
    assert {(m.tensor, m.role) for m in g.members} >= {("w1", "out"), ("a_s", "param"), ("a_z", "param"),
                                                        ("w2", "in")}
    plan = {g.id: np.array([0, 2, 5])}
    pruned = apply_plan(prep.model, an, plan)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in prep.model.graph.initializer}
    assert inits["w1_q"].shape == (3, 3, 3, 3) and inits["w1_s"].shape == (3,)
    np.testing.assert_array_equal(inits["a_s"], orig["a_s"][[0, 2, 5]])
    np.testing.assert_array_equal(inits["a_z"], orig["a_z"][[0, 2, 5]])
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    zeroed = _zero_removed_int8_inputs(prep.model, an, plan)
    np.testing.assert_allclose(run_ort(pruned, {"x": x})[0], run_ort(zeroed, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_shared_int8_weight_stays_whole_with_the_reason():
    m = _per_channel_activation_model()
    m.graph.node.insert(1, helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1b"], name="dq_w1b", axis=0))
    m.graph.node.append(helper.make_node("Conv", ["x", "w1b"], ["y2"], name="conv_b", pads=[1, 1, 1, 1]))
    m.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 6, 6, 6]))
    an = analyze_channels(prepare(m).view)
    g = next(g for g in an.groups if any(mm.tensor == "w1" for mm in g.members))
    assert not g.prunable and "w1_q" in g.reason and "shared" in g.reason


def test_cli_prunes_a_qdq_model_and_inspect_labels_it(digits_models, tmp_path):
    src = digits_models["qdq"][True]
    before = src.read_bytes()
    out = tmp_path / "p.onnx"
    code, stdout, err = run_cli("prune", src, "-o", out, "--structured", "--ratio", "0.5", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["macs_after"] < res["macs_before"] and res["params_after"] < res["params_before"]
    assert src.read_bytes() == before
    code, text, err = run_cli("inspect", out)
    assert code == 0, err
    assert "quantized (QDQ, int8)" in text
    info = inspect_model(out)
    assert info["quantization"]["kind"] == "qdq" and info["macs"] == res["macs_after"]
    assert inspect_model(digits_models["float"])["quantization"] is None


@pytest.mark.parametrize("method", [["--unstructured", "--sparsity", "0.5"], ["--nm", "2:4"]])
def test_unstructured_and_nm_refuse_qdq_models_with_the_way_out(digits_models, tmp_path, method):
    out = tmp_path / "u.onnx"
    code, stdout, err = run_cli("prune", digits_models["qdq"][True], "-o", out, *method)
    assert code != 0 and not out.exists()
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert "quantized (QDQ, int8)" in line and "prune the float model, then run onnxprune quantize" in line


def test_a_latency_target_on_a_qdq_model_says_what_to_do_instead(digits_models, tmp_path):
    """The latency table times float layers alone; a QDQ model's layers read int8 weights."""
    out = tmp_path / "l.onnx"
    code, _, err = run_cli("prune", digits_models["qdq"][True], "-o", out, "--structured", "--target-speedup", "1.2",
                           "--hw", "ci-cpu")
    assert code != 0 and not out.exists() and "Traceback" not in err
    assert "quantized (QDQ, int8)" in err and "--target-macs" in err and "onnxprune quantize" in err


# ---------------------------------------------------------------- QOperator / dynamic (onnx.helper)

def _int8(rng, shape):
    return rng.integers(-100, 100, shape).astype(np.int8)


def _qoperator_model() -> onnx.ModelProto:
    """QuantizeLinear -> QLinearConv (8x3x3x3) -> QLinearMatMul ([1,8,8,8] @ [8,5]) -> DequantizeLinear."""
    rng = np.random.default_rng(0)
    f, u = lambda v: np.array(v, np.float32), lambda v: np.array(v, np.uint8)  # noqa: E731
    inits = {"xs": f(0.02), "xz": u(128), "w": _int8(rng, (8, 3, 3, 3)), "ws": f(0.01), "wz": np.array(0, np.int8),
             "ys": f(0.05), "yz": u(128), "b": _int8(rng, (8, 5)), "bs": f(0.01), "bz": np.array(0, np.int8),
             "zs": f(0.1), "zz": u(128)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["c"], name="qconv",
                              pads=[1, 1, 1, 1]),
             helper.make_node("QLinearMatMul", ["c", "ys", "yz", "b", "bs", "bz", "zs", "zz"], ["mm"], name="qmm"),
             helper.make_node("DequantizeLinear", ["mm", "zs", "zz"], ["y"], name="dq")]
    return _model(nodes, inits, [1, 3, 8, 8])


def _dynamic_model() -> onnx.ModelProto:
    """DynamicQuantizeLinear -> ConvInteger (8x3x3x3) -> Cast -> DynamicQuantizeLinear -> MatMulInteger ([.., 8] @ [8, 5])."""
    rng = np.random.default_rng(0)
    inits = {"w": _int8(rng, (8, 3, 3, 3)).astype(np.uint8), "b": _int8(rng, (8, 5)).astype(np.uint8)}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq1"),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["c"], name="iconv", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["cf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("DynamicQuantizeLinear", ["cf"], ["cq", "cs", "cz"], name="dq2"),
             helper.make_node("MatMulInteger", ["cq", "b", "cz"], ["y"], name="imm")]
    return _model(nodes, inits, [1, 3, 8, 8], out_type=TensorProto.INT32)


def _float_counterpart() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal((8, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["c", "b"], ["y"], name="mm")]
    return _model(nodes, inits, [1, 3, 8, 8])


def _model(nodes, inits, shape, out_type=TensorProto.FLOAT) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", out_type, [1, 8, 8, 5])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("build,kind", [(_qoperator_model, "QOperator"), (_dynamic_model, "dynamic")])
def test_integer_op_models_are_refused_by_structured_pruning(tmp_path, build, kind):
    src = tmp_path / "m.onnx"
    onnx.save(build(), src)
    run_ort(build(), {"x": np.zeros((1, 3, 8, 8), np.float32)})  # a valid model ONNX Runtime runs
    before = src.read_bytes()
    out = tmp_path / "p.onnx"
    for target in (["--ratio", "0.5"], ["--target-speedup", "1.2", "--hw", "ci-cpu"]):
        code, stdout, err = run_cli("prune", src, "-o", out, "--structured", *target)
        assert code != 0 and not out.exists() and src.read_bytes() == before
        line = err.strip()
        assert "\n" not in line and "Traceback" not in err
        assert f"quantized ({kind}, int8)" in line and "prune the float model, then run onnxprune quantize" in line


def test_dynamic_quantize_lstm_is_refused_before_anything_else(tmp_path):
    """com.microsoft DynamicQuantizeLSTM (a dynamically quantized CRNN): refused, not 'nothing to prune'."""
    rng = np.random.default_rng(0)
    inits = {"W": _int8(rng, (1, 4, 16)), "R": _int8(rng, (1, 4, 16)), "Ws": np.full(1, 0.01, np.float32),
             "Wz": np.zeros(1, np.int8), "Rs": np.full(1, 0.01, np.float32), "Rz": np.zeros(1, np.int8)}
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "", "", "", "", "", "Ws", "Wz", "Rs", "Rz"],
                            ["y"], name="lstm", domain="com.microsoft", hidden_size=4)
    g = helper.make_graph([node], "l", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 4])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    src = tmp_path / "lstm.onnx"
    onnx.save(m, src)
    code, _, err = run_cli("prune", src, "-o", tmp_path / "p.onnx", "--structured", "--ratio", "0.5")
    assert code != 0 and "quantized (dynamic, int8) (DynamicQuantizeLSTM x1)" in err
    assert "prune the float model, then run onnxprune quantize" in err


@pytest.mark.parametrize("build,kind", [(_qoperator_model, "qoperator"), (_dynamic_model, "dynamic")])
def test_inspect_counts_integer_ops_like_their_float_counterparts(tmp_path, build, kind):
    src = tmp_path / "m.onnx"
    onnx.save(build(), src)
    info = inspect_model(src)
    assert info["quantization"]["kind"] == kind
    float_info = inspect_model(_float_counterpart())
    assert info["macs"] == float_info["macs"] == 8 * 64 * 27 + 8 * 8 * 8 * 5
    counted = sorted(n["macs"] for n in info["nodes"] if n["macs"])
    assert counted == sorted(n["macs"] for n in float_info["nodes"] if n["macs"]) and len(counted) == 2
    assert info["params"] == float_info["params"]  # int8 weights count, scales and zero points do not
    code, text, err = run_cli("inspect", src)
    assert code == 0 and f"quantized ({'QOperator' if kind == 'qoperator' else 'dynamic'}, int8)" in text


def test_inspect_of_an_onnx_runtime_qoperator_model(digits_models, tmp_path):
    """ONNX Runtime's QOperator format: QLinearConv MACs equal the float convs'; the total is n/a
    where a com.microsoft op hides the shapes, and the reason names that op."""
    out = tmp_path / "qop.onnx"
    quant.quantize_static(str(digits_models["float"]), str(out), _Reader(digits_models["calib"]),
                          quant_format=quant.QuantFormat.QOperator, per_channel=True)
    info, ref = inspect_model(out), inspect_model(digits_models["float"])
    assert info["quantization"]["kind"] == "qoperator" and info["quantization"]["ops"]["QLinearConv"] == 3
    conv_macs = [n["macs"] for n in ref["nodes"] if n["op_type"] == "Conv"]
    assert [n["macs"] for n in info["nodes"] if n["op_type"] == "QLinearConv"] == conv_macs and all(conv_macs)
    if info["macs"] is None:
        assert "com.microsoft op" in info["macs_unknown_reason"]
    else:
        assert info["macs"] == ref["macs"]
