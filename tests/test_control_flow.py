"""If/Loop/Scan: MACs and params of their subgraphs are counted (or ``n/a`` with the reason),
weight-level pruning reaches weights inside them, and structured pruning leaves the channels that
enter a subgraph whole, saying why."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from cli_util import run_cli

X = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _w(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def control_flow_model(trip_from_input: bool = False, shared: bool = False) -> onnx.ModelProto:
    """conv0 -> If (then: Conv with its own initializer; else: Conv on an outer-scope weight, held
    as a Constant node when ``shared`` is off) -> GAP -> Loop (3 x MatMul on an outer weight) -> Gemm.
    ``shared``: the else branch reuses conv1's weight (a top-level Conv that structured pruning sees)."""
    then_g = h.make_graph([h.make_node("Conv", ["a", "w_then"], ["t_out"], pads=[1, 1, 1, 1], name="then_conv")],
                          "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, None)], [nh.from_array(_w(8, 8, 3, 3), "w_then")])
    else_nodes = [h.make_node("Conv", ["a", "w1" if shared else "w_else"], ["e_out"], pads=[1, 1, 1, 1], name="else_conv")]
    if not shared:
        else_nodes.insert(0, h.make_node("Constant", [], ["w_else"], value=nh.from_array(_w(8, 8, 3, 2)[..., :1].repeat(3, -1)), name="k"))
    else_g = h.make_graph(else_nodes, "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)])
    body = h.make_graph([h.make_node("MatMul", ["s_in", "w_loop"], ["s_mm"], name="loop_mm"),
                         h.make_node("Relu", ["s_mm"], ["s_out"], name="loop_relu"),
                         h.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")], "body",
                        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                         h.make_tensor_value_info("s_in", T.FLOAT, [1, 8])],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("s_out", T.FLOAT, [1, 8])])
    nodes = [h.make_node("Conv", ["x", "w0"], ["a0"], pads=[1, 1, 1, 1], name="conv0"),
             h.make_node("Conv", ["a0", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             h.make_node("ReduceSum", ["x"], ["xs"], keepdims=0, name="rs"),
             h.make_node("Greater", ["xs", "zero"], ["c"], name="gt"),
             h.make_node("If", ["c"], ["b"], then_branch=then_g, else_branch=else_g, name="if"),
             h.make_node("GlobalAveragePool", ["b"], ["p"], name="gap"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"),
             h.make_node("Loop", ["trip", "", "f"], ["lo"], body=body, name="loop"),
             h.make_node("Gemm", ["lo", "wfc"], ["y"], name="fc")]
    inputs = [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])]
    inits = [nh.from_array(_w(8, 3, 3, 3), "w0"), nh.from_array(_w(8, 8, 3, 3) * 0.1, "w1"),
             nh.from_array(_w(8, 8), "w_loop"), nh.from_array(np.array(0, np.float32), "zero"), nh.from_array(_w(8, 4), "wfc")]
    if trip_from_input:
        inputs.append(h.make_tensor_value_info("trip", T.INT64, []))
    else:
        inits.append(nh.from_array(np.array(3, np.int64), "trip"))
    g = h.make_graph(nodes, "cf", inputs, [h.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def scan_model() -> onnx.ModelProto:
    """Scan over 5 rows of x [5, 4]: state += row @ W (W [4, 6] an outer-scope initializer)."""
    body = h.make_graph([h.make_node("MatMul", ["row", "w"], ["mm"], name="scan_mm"),
                         h.make_node("Add", ["st", "mm"], ["st_out"], name="scan_add")], "body",
                        [h.make_tensor_value_info("st", T.FLOAT, [1, 6]), h.make_tensor_value_info("row", T.FLOAT, [1, 4])],
                        [h.make_tensor_value_info("st_out", T.FLOAT, [1, 6])])
    g = h.make_graph([h.make_node("Scan", ["s0", "x"], ["y"], body=body, num_scan_inputs=1, name="scan")], "scan",
                     [h.make_tensor_value_info("x", T.FLOAT, [5, 1, 4])], [h.make_tensor_value_info("y", T.FLOAT, [1, 6])],
                     [nh.from_array(np.zeros((1, 6), np.float32), "s0"), nh.from_array(_w(4, 6), "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _save(m, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(m, p)
    return p


def _inspect(path, *extra):
    code, out, err = run_cli("inspect", path, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_macs_and_params_inside_subgraphs(tmp_path):
    info = _inspect(_save(control_flow_model(), tmp_path))
    conv = 8 * 8 * 8
    assert info["macs"] == conv * 27 + conv * 72 + max(conv * 72, conv * 72) + 3 * 64 + 32
    assert info["params"] == 216 + 576 + 576 + 576 + 64 + 1 + 32  # then/else weights counted once each
    by_name = {n["name"]: n for n in info["nodes"]}
    assert by_name["if"]["macs"] == conv * 72 and by_name["if"]["params"] == 1152
    assert by_name["loop"]["macs"] == 3 * 64 and by_name["loop"]["params"] == 64


def test_scan_macs(tmp_path):
    info = _inspect(_save(scan_model(), tmp_path))
    assert info["macs"] == 5 * 24 and info["params"] == 24 + 6


def test_run_time_trip_count_is_na_with_reason(tmp_path):
    path = _save(control_flow_model(trip_from_input=True), tmp_path)
    info = _inspect(path)
    assert info["macs"] is None
    assert info["macs_unknown_reason"] == "the trip count of Loop loop is known only at run time"
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "MACs n/a (the trip count of Loop loop is known only at run time)" in out


@pytest.mark.parametrize("mode", [["--unstructured", "--sparsity", "0.5", "--scope", "layer"], ["--nm", "2:4"]])
def test_weight_pruning_reaches_subgraphs(tmp_path, mode):
    src = _save(control_flow_model(), tmp_path)
    out = tmp_path / "out.onnx"
    code, text, err = run_cli("prune", src, "-o", out, *mode, "--json")
    assert code == 0, err
    layers = {l["node"]: l for l in json.loads(text)["layers"]}
    assert {"then_conv", "else_conv", "loop_mm"} <= set(layers)
    for name in ("then_conv", "else_conv", "loop_mm"):
        assert layers[name]["sparsity"] == pytest.approx(0.5, abs=0.1)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: nh.to_array(t) for t in m.graph.initializer}
    assert np.mean(inits["w_then"] == 0) == pytest.approx(0.5, abs=0.1)  # (hoisted from the branch)
    ort.InferenceSession(str(out)).run(None, {"x": X})


def test_structured_leaves_channels_entering_subgraphs_whole(tmp_path):
    """conv1's output enters the If (outer-scope read); conv0's channels are cut in conv1's weight,
    which the else branch also reads: both groups stay whole, with the reason."""
    src = _save(control_flow_model(shared=True), tmp_path)
    code, out, err = run_cli("analyze", src, "--json")
    assert code == 0, err
    reasons = {tuple(g["nodes"]): g["reason"] for g in json.loads(out)["groups"]}
    assert reasons[("conv1",)] == "flows into unsupported op If (node if)"
    assert reasons[("conv0", "conv1")] == "'w1' is also read inside the If subgraph of node if"
    dst = tmp_path / "out.onnx"
    code, text, err = run_cli("prune", src, "-o", dst, "--structured", "--ratio", "0.5", "--json")
    assert code == 0, err
    s = json.loads(text)
    assert not s["groups"] and len(s["unprunable"]) == 3
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    for x in (X, -X):  # both branches run
        ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
        np.testing.assert_allclose(ort.InferenceSession(str(dst)).run(None, {"x": x})[0], ref, rtol=1e-5)


def test_normalize_hoists_subgraph_weights_exactly():
    from onnxprune.core.graph import subgraphs
    from onnxprune.core.normalize import normalize

    m = control_flow_model()
    n = normalize(m)
    inner = [g for node in n.graph.node for g in subgraphs(node)]
    assert inner and not any(g.initializer for g in inner)
    assert not any(node.op_type == "Constant" for g in inner for node in g.node)
    assert {"w_then", "w_else"} <= {t.name for t in n.graph.initializer}
    for x in (X, -X):
        ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(ort.InferenceSession(n.SerializeToString()).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-4)


def test_torch_scripted_if_export(tmp_path):
    """A real PyTorch export with data-dependent control flow (torch.jit.script -> If whose
    branches read the convs' weights from the outer scope)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.b, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.c0(x))
            if bool(x.sum() > 0):
                y = self.a(y)
            else:
                y = self.b(y)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "branchy.onnx"
    torch.onnx.export(torch.jit.script(Branchy().eval()), (torch.randn(1, 3, 8, 8),), str(path), opset_version=17,
                      dynamo=False, input_names=["x"])
    info = _inspect(path)
    assert info["macs"] == 8 * 64 * 27 + 8 * 64 * 72 + 32  # c0, the larger branch (a), fc
    if_node = next(n for n in info["nodes"] if n["op_type"] == "If")
    assert if_node["params"] == (8 * 72 + 8) + (8 * 8 + 8)  # both branches' weights and biases
    out = tmp_path / "sparse.onnx"
    code, text, err = run_cli("prune", path, "-o", out, "--unstructured", "--sparsity", "0.5", "--scope", "layer", "--json")
    assert code == 0, err
    layers = {l["node"]: l["sparsity"] for l in json.loads(text)["layers"]}
    assert layers["/a/Conv"] == pytest.approx(0.5, abs=0.02) and layers["/b/Conv"] == pytest.approx(0.5, abs=0.02)
    for x in (X, -X):
        ort.InferenceSession(str(out)).run(None, {"x": x})
    code, text, err = run_cli("prune", path, "-o", tmp_path / "st.onnx", "--structured", "--ratio", "0.5", "--json")
    assert code == 0, err
    assert any("If" in g["reason"] and "/c0/Conv" in g["nodes"] for g in json.loads(text)["unprunable"])
