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


def parameter_names(view: GraphView) -> list[str]:
    """Names of the initializers that count as parameters."""
    skip = buffer_names(view)
    quantized: set[str] = set()
    for node in view.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            skip.update(node.input[1:3])
            if node.op_type == "DequantizeLinear":
                quantized.add(node.input[0])
    return [n for n, t in view.initializers.items()
            if (t.data_type in FLOAT_TYPES or n in quantized) and n not in skip]


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
