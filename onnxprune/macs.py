"""Multiply-accumulate counts per node: one rule per op type.

Convention: one multiply-add = 1 MAC, counted for Conv, ConvTranspose, Gemm and MatMul only
(exact for groups, dilation, padding and stride, because they are read off the inferred output
shape). Elementwise, normalization and pooling ops are *not* counted; bias adds are not counted.
This matches the usual "GMACs" figures (torchvision ResNet-50 at 224x224: 4.09 G).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from .graph import GraphView, attr, build_view
from .shapes import is_static

MacRule = Callable[[onnx.NodeProto, GraphView], "int | None"]


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1


def _conv(node: onnx.NodeProto, v: GraphView) -> int | None:
    """Each output element needs (Cin/group) * prod(kernel) MACs; the weight is [Cout, Cin/g, *k]."""
    out, w = v.shape(node.output[0]), v.shape(node.input[1])
    if not (is_static(out) and is_static(w)):
        return None
    return _prod(out) * _prod(w[1:])


def _conv_transpose(node: onnx.NodeProto, v: GraphView) -> int | None:
    """Each *input* element scatters into (Cout/group) * prod(kernel) outputs; weight is [Cin, Cout/g, *k]."""
    inp, w = v.shape(node.input[0]), v.shape(node.input[1])
    if not (is_static(inp) and is_static(w)):
        return None
    return _prod(inp) * _prod(w[1:])


def _gemm(node: onnx.NodeProto, v: GraphView) -> int | None:
    """Y[M,N] = A[M,K] B[K,N]: M*N*K (transA/transB only change where K is read)."""
    a, out = v.shape(node.input[0]), v.shape(node.output[0])
    if not (is_static(a) and is_static(out)):
        return None
    k = a[0] if attr(node, "transA", 0) else a[1]
    return _prod(out) * int(k)


def _matmul(node: onnx.NodeProto, v: GraphView) -> int | None:
    """Batched matmul: every output element is a K-long dot product, K = A's last dim."""
    a, out = v.shape(node.input[0]), v.shape(node.output[0])
    if not (is_static(a) and is_static(out)) or not a:
        return None
    return _prod(out) * int(a[-1])


MAC_RULES: dict[str, MacRule] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


def node_macs(node: onnx.NodeProto, view: GraphView) -> int | None:
    """MACs of one node: 0 for ops that are not counted, None when shapes are not concrete."""
    rule = MAC_RULES.get(node.op_type)
    return 0 if rule is None else rule(node, view)


def macs_by_node(view: GraphView) -> dict[str, int | None]:
    """MACs of every node by name, after :func:`resolve_shapes_for_macs`."""
    resolved = resolve_shapes_for_macs(view)
    return {node.name: node_macs(node, resolved) for node in resolved.nodes}


def total_macs(view: GraphView) -> int | None:
    """Sum over the graph; None if any counted node has unknown shapes (pass --input-shape)."""
    per_node = macs_by_node(view)
    return None if any(m is None for m in per_node.values()) else sum(per_node.values())


def resolve_shapes_for_macs(view: GraphView) -> GraphView:
    """A view in which shapes computed at run time are static where the inputs are.

    Exporters compute some sizes with Shape->Gather->Div->Slice arithmetic (``torch.chunk``);
    ONNX shape inference loses the shape after such a Slice. With concrete input shapes, folding
    those chains on a copy makes them constants, so MACs become countable. The analysis keeps the
    unfolded graph: there the run-time arithmetic adapts to pruned channel counts by itself.
    """
    if all(node_macs(n, view) is not None for n in view.nodes):
        return view
    from .normalize import normalize

    return build_view(normalize(view.model))
