"""Which kind of quantization a model already carries, read from its ops.

Pruning treats the kinds differently: a QDQ model (float ops between ``QuantizeLinear`` /
``DequantizeLinear`` pairs) keeps its float graph and can be pruned through the DequantizeLinear
of each weight; a QOperator model (``QLinearConv``, ``QLinearMatMul`` ...) or a dynamically
quantized one (``ConvInteger``, ``MatMulInteger``, ``DynamicQuantizeLinear``,
``com.microsoft.DynamicQuantizeLSTM``) computes in integer ops whose weights, scales and zero points
are fused into each node, and is refused with the way out: prune the float model, then quantize.
"""
from __future__ import annotations

from collections import Counter

import onnx

from .errors import OnnxPruneError

#: integer-arithmetic ops: the model computes in int8/uint8 with fused scales
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                 "QGemm", "QAttention", "QOrderedMatMul"}
#: dynamic quantization: activations quantized at run time, integer matmuls/convs
DYNAMIC_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
               "DynamicQuantizeLSTM", "MatMulIntegerToFloat"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _ops(model: onnx.ModelProto) -> Counter:
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(model.graph)
    return counts


def quantization_kind(model: onnx.ModelProto) -> dict | None:
    """``None`` for a float model, else ``{"kind": "qoperator"|"dynamic"|"qdq", "ops": {op: count},
    "label": "quantized (QDQ, int8)"}``; QOperator and dynamic win over QDQ when mixed."""
    ops = _ops(model)
    for kind, members, label in (("qoperator", QOPERATOR_OPS, "QOperator"), ("dynamic", DYNAMIC_OPS, "dynamic"),
                                 ("qdq", QDQ_OPS, "QDQ")):
        found = {op: ops[op] for op in sorted(members) if ops[op]}
        if found:
            return {"kind": kind, "ops": found, "label": f"quantized ({label}, {_bits(model)})"}
    return None


#: integer element types of quantized tensors -> the precision they name (signedness aside: uint8
#: activations with int8 weights are "int8")
_PRECISION = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4,
              onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16}


def _bits(model: onnx.ModelProto) -> str:
    """int8 / int4 / int4/int8 ... from the bit widths of the zero-point or quantized weight tensors."""
    widths = sorted({_PRECISION[t.data_type] for t in model.graph.initializer if t.data_type in _PRECISION})
    return "/".join(f"int{w}" for w in widths) if widths else "int8"


def refuse_integer_ops(model: onnx.ModelProto, what: str) -> None:
    """Raise one clear line when ``model`` computes with integer ops that pruning cannot rewrite."""
    q = quantization_kind(model)
    if q and q["kind"] in ("qoperator", "dynamic"):
        ops = ", ".join(f"{k} x{v}" for k, v in q["ops"].items())
        raise OnnxPruneError(f"{what}: the model is {q['label']} ({ops}); integer ops fuse weights, scales and zero "
                             "points and cannot be pruned: prune the float model, then run onnxprune quantize")
