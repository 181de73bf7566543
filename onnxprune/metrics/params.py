"""Parameter counting with PyTorch's convention, so figures match what users know.

Parameters are the floating-point initializers, *excluding* BatchNormalization running mean and
variance (buffers in PyTorch, not learned) and integer tensors (shapes, indices). Shared
initializers count once. In a quantized (QDQ) model the integer weights that a DequantizeLinear
reads count instead, and the quantization scales and zero points do not (they are not learned).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..core.graph import GraphView

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def buffer_names(view: GraphView) -> set[str]:
    """Initializers that are statistics, not parameters (BatchNormalization mean/var)."""
    out: set[str] = set()
    for node in view.nodes:
        if node.op_type == "BatchNormalization":
            out.update(n for n in node.input[3:5] if n)
    return out


#: op -> (inputs that are (integer) weights or biases, inputs that are scales / zero points)
QUANTIZED_WEIGHTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "QuantizeLinear": ((), (1, 2)),
    "DequantizeLinear": ((0,), (1, 2)),
    "QLinearConv": ((3, 8), (1, 2, 4, 5, 6, 7)),
    "QLinearMatMul": ((3,), (1, 2, 4, 5, 6, 7)),
    "QGemm": ((3, 6), (1, 2, 4, 5, 7, 8)),
    "ConvInteger": ((1,), (2, 3)),
    "MatMulInteger": ((1,), (2, 3)),
    "DynamicQuantizeMatMul": ((1, 4), (2, 3)),
    "MatMulIntegerToFloat": ((1, 6), (2, 3, 4, 5)),
    "DynamicQuantizeLSTM": ((1, 2, 3, 7), (8, 9, 10, 11)),
}


def parameter_names(view: GraphView) -> list[str]:
    """Names of the initializers that count as parameters."""
    skip = buffer_names(view)
    weights: set[str] = set()
    for node in view.nodes:
        w, q = QUANTIZED_WEIGHTS.get(node.op_type, ((), ()))
        weights.update(node.input[i] for i in w if i < len(node.input))
        skip.update(node.input[i] for i in q if i < len(node.input))
    return [n for n, t in view.initializers.items() if (t.data_type in FLOAT_TYPES or n in weights) and n not in skip]


def count_params(view: GraphView) -> tuple[int, int]:
    """(params, nonzero params) over :func:`parameter_names`."""
    total = nonzero = 0
    for name in parameter_names(view):
        arr = view.const(name, cache=False)
        total += int(arr.size)
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def node_param_names(node: onnx.NodeProto, view: GraphView, params: set[str]) -> list[str]:
    """The parameter initializers a node reads."""
    return [i for i in node.input if i in params]
