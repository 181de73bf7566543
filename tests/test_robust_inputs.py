"""Models from the wild that every command must read unmodified: negative ``dim_value`` (older
Paddle exports declare the batch as -1), ``--input-shape`` in every prune mode, and the MACs hint
for symbolic dims."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_graphs
from cli_util import run_cli


def paddle_style(path):
    """Conv -> Relu -> GAP -> Shape (folded once dims are known) -> Reshape -> MatMul, batch declared -1."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("fc", (8, 10)))]
    inits.append(numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shp"))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Shape", ["p"], ["ps"], name="shape"),
             helper.make_node("Reshape", ["p", "shp"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


@pytest.fixture
def neg(tmp_path):
    return paddle_style(tmp_path / "neg.onnx")


def test_negative_dim_inspect_analyze(neg):
    before = neg.read_bytes()
    code, out, err = run_cli("inspect", neg, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["macs"] == 8 * 8 * 8 * 27 + 80  # batch taken as 1
    assert isinstance(info["inputs"][0]["shape"][0], str)  # read as symbolic, not -1
    code, out, err = run_cli("inspect", neg, "--json", "--input-shape", "x=2x3x8x8")
    assert code == 0 and json.loads(out)["macs"] == 2 * (8 * 8 * 8 * 27 + 80), err
    code, out, err = run_cli("analyze", neg, "--json")
    assert code == 0 and json.loads(out)["prunable_groups"] == 1, err
    assert neg.read_bytes() == before


@pytest.mark.parametrize("mode", [["--structured", "--ratio", "0.5"], ["--unstructured", "--sparsity", "0.5"],
                                  ["--nm", "2:4"]])
def test_negative_dim_prune(neg, tmp_path, mode):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("prune", neg, "-o", out, *mode)
    assert code == 0, err
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    y = ort.InferenceSession(str(out)).run(None, {"x": np.ones((2, 3, 8, 8), np.float32)})[0]
    assert y.shape == (2, 10)


@pytest.mark.parametrize("mode", [["--unstructured", "--sparsity", "0.5"], ["--nm", "2:4"]])
def test_input_shape_accepted_by_weight_pruning(neg, tmp_path, mode):
    out = tmp_path / "out.onnx"
    code, text, err = run_cli("prune", neg, "-o", out, *mode, "--input-shape", "x=4x3x8x8", "--json")
    assert code == 0, err
    s = json.loads(text)
    assert s["input_shapes"] == {"x": [4, 3, 8, 8]}
    code, _, err = run_cli("prune", neg, "-o", tmp_path / "o2.onnx", *mode, "--input-shape", "nope=1x3x8x8")
    assert code == 1 and "nope" in err and not (tmp_path / "o2.onnx").exists()


def test_macs_hint_for_symbolic_dims(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx_graphs.dynamic_dims(), path)
    code, out, _ = run_cli("inspect", path, "--json")
    info = json.loads(out)
    assert info["macs"] is None
    assert info["macs_unknown_reason"] == "symbolic dims: pass --input-shape x=1x3x<H>x<W>"
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "MACs n/a (symbolic dims: pass --input-shape x=1x3x<H>x<W>)" in out
    code, out, _ = run_cli("inspect", path, "--json", "--input-shape", "x=1x3x8x8")
    info = json.loads(out)
    assert info["macs"] and info["macs_unknown_reason"] is None
