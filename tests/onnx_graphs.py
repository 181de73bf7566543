"""Hand-built ONNX graphs reproducing exporter quirks PyTorch doesn't emit (Constant-node weights,
ConstantOfShape weights, opset 9 Sum/LRN/Dropout, dynamic dims, weights listed as graph inputs)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

def _w(*shape, seed=0):
    """Deterministic weights: the same builder always returns the same model."""
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=10):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if ir:
        m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def constant_node_weights() -> onnx.ModelProto:
    """Weights as Constant nodes (TensorFlow/tf2onnx, some Paddle exports)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_w(4, 3, 3, 3))),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(_w(4))),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Constant", [], ["alpha"], value_float=0.5),
        helper.make_node("Mul", ["c", "alpha"], ["y"], name="scale"),
    ]
    return _model(nodes, [x], [y])


def constant_subgraph_weights() -> onnx.ModelProto:
    """Weights produced by constant subgraphs: ConstantOfShape, Cast, Reshape, Unsqueeze, Identity."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    inits = [
        numpy_helper.from_array(np.array([4, 3, 3, 3], dtype=np.int64), "wshape"),
        numpy_helper.from_array(_w(108).astype(np.float64), "wflat64"),
        numpy_helper.from_array(np.array([4], dtype=np.int64), "bshape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "ax0"),
        numpy_helper.from_array(_w(4), "gamma"),
    ]
    nodes = [
        helper.make_node("Cast", ["wflat64"], ["wflat"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["wflat", "wshape"], ["w"]),
        helper.make_node("Identity", ["w"], ["w_id"]),
        helper.make_node("ConstantOfShape", ["bshape"], ["b"], value=numpy_helper.from_array(np.array([0.25], dtype=np.float32))),
        helper.make_node("Conv", ["x", "w_id", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Unsqueeze", ["gamma", "ax0"], ["g1"]),
        helper.make_node("Reshape", ["gamma", "bshape"], ["g2"]),
        helper.make_node("Identity", ["c"], ["c_id"]),
        helper.make_node("Relu", ["c_id"], ["y"]),
    ]
    return _model(nodes, [x], [y], inits)


def opset9_legacy() -> onnx.ModelProto:
    """Caffe2-style opset 9: weights listed as graph inputs (IR 3), Sum, LRN, inference Dropout."""
    w1, w2 = _w(4, 3, 3, 3), _w(4, 3, 1, 1)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    ins = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8]),
           helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 3, 3, 3]),
           helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 3, 1, 1])]
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4, 8, 8])
    nodes = [
        helper.make_node("Conv", ["data", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Conv", ["data", "w2"], ["b"], name="conv2"),
        helper.make_node("Sum", ["a", "b", "a"], ["s"], name="sum"),
        helper.make_node("LRN", ["s"], ["l"], size=3, name="lrn"),
        helper.make_node("Dropout", ["l"], ["d"], ratio=0.5, name="drop"),
        helper.make_node("Relu", ["d"], ["prob"], name="relu"),
    ]
    return _model(nodes, ins, [out], inits, opset=9, ir=3)


def dynamic_dims() -> onnx.ModelProto:
    """Symbolic batch, height and width; a Shape->Gather->Reshape chain that needs runtime shapes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])
    inits = [numpy_helper.from_array(_w(6, 3, 3, 3), "w"), numpy_helper.from_array(_w(6, 5), "fc"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "i0"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "m1")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Shape", ["p"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0, name="gather"),
        helper.make_node("Concat", ["n", "m1"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["p", "target"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
    ]
    return _model(nodes, [x], [y], inits)
