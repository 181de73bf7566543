"""Multiply-accumulate counts per node: one rule per op type.

Convention: one multiply-add = 1 MAC, counted for Conv, ConvTranspose, Gemm and MatMul only
(exact for groups, dilation, padding and stride, because they are read off the inferred output
shape), and for their integer forms in quantized models like the float op they replace
(QLinearConv, ConvInteger; QLinearMatMul, MatMulInteger, ONNX Runtime's QGemm, DynamicQuantizeMatMul,
MatMulIntegerToFloat: an int8 multiply-add is still one MAC), inside If (the larger branch), Loop (body times the constant trip count) and Scan (body
times the scan length) subgraphs too. Elementwise, normalization and pooling ops are *not* counted; bias adds are not counted.
This matches the usual "GMACs" figures (torchvision ResNet-50 at 224x224: 4.09 G).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx

from onnx import helper

from ..core.errors import OnnxPruneError
from ..core.graph import GraphView, attr, build_view, opset_of, subgraph_reads, subgraphs
from ..core.shapes import is_static, symbolic_value_shapes
from ..core.normalize import normalize

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
    a, b, out = v.shape(node.input[0]), v.shape(node.input[1]), v.shape(node.output[0])
    if is_static(a) and len(a) == 2:
        k = a[0] if attr(node, "transA", 0) else a[1]
    elif is_static(b) and len(b) == 2:  # A's shape lost (after a Loop ...): K from B
        k = b[1] if attr(node, "transB", 0) else b[0]
    else:
        return None
    return _prod(out) * int(k) if is_static(out) else None


def _matmul(node: onnx.NodeProto, v: GraphView) -> int | None:
    """Batched matmul: every output element is a K-long dot product, K = A's last dim."""
    a, out = v.shape(node.input[0]), v.shape(node.output[0])
    if not (is_static(a) and is_static(out)) or not a:
        return None
    return _prod(out) * int(a[-1])


def _if(node: onnx.NodeProto, v: GraphView) -> int | None:
    """One branch runs per call: the larger one (an upper bound when they differ)."""
    counts = [_body_macs(g, v, []) for g in subgraphs(node)]
    return None if any(c is None for c in counts) else max(counts, default=0)


def _loop(node: onnx.NodeProto, v: GraphView) -> int | None:
    """The body times the trip count M (a constant input; an early exit through the condition is
    not predicted, so this is an upper bound then). Body inputs: iteration, condition, carried."""
    trip = _loop_trips(node, v)
    if trip is None:
        return None
    carried = [(n, v.shape(n), v.dtypes.get(n)) for n in node.input[2:]]
    body = _body_macs(attr(node, "body"), v, [((), onnx.TensorProto.INT64), ((), onnx.TensorProto.BOOL)]
                      + [(s, t) for _, s, t in carried])
    return None if body is None else trip * body


def _scan(node: onnx.NodeProto, v: GraphView) -> int | None:
    """The body once per slice along the scan axis of the scan inputs (states keep their shape)."""
    if opset_of(v.model) < 9:  # Scan-8: a sequence_lens input first and a batch axis; not counted
        return None
    n_scan = int(attr(node, "num_scan_inputs"))
    states, scans = list(node.input[: len(node.input) - n_scan]), list(node.input[len(node.input) - n_scan:])
    axes = list(attr(node, "scan_input_axes", [0] * n_scan))
    shapes = [v.shape(n) for n in scans]
    if not scans or not all(is_static(s) for s in shapes):
        return None
    ax = [a % len(s) for a, s in zip(axes, shapes)]
    trip = shapes[0][ax[0]]
    inputs = [(v.shape(n), v.dtypes.get(n)) for n in states]
    inputs += [(s[:a] + s[a + 1:], v.dtypes.get(n)) for n, s, a in zip(scans, shapes, ax)]
    body = _body_macs(attr(node, "body"), v, inputs)
    return None if body is None else int(trip) * body


def _weight_at(rule: MacRule, index: int) -> MacRule:
    """``rule`` for an integer op whose weight is input ``index`` (QLinearConv: x, x_scale,
    x_zero_point, w, ...): counted on a copy of the node with the float op's input layout."""
    def counted(node: onnx.NodeProto, v: GraphView) -> int | None:
        if len(node.input) <= index:
            return None
        plain = onnx.NodeProto()
        plain.CopyFrom(node)
        del plain.input[:]
        plain.input.extend([node.input[0], node.input[index]])
        return rule(plain, v)
    counted.__doc__ = f"Like {rule.__name__} with the weight read from input {index}."
    return counted


def _qgemm(node: onnx.NodeProto, v: GraphView) -> int | None:
    """ONNX Runtime's QGemm (A, a_scale, a_zero_point, B, ...): M*N*K read off A and B, since ONNX
    shape inference does not know the contrib op's output."""
    a, b = v.shape(node.input[0]), v.shape(node.input[3]) if len(node.input) > 3 else None
    if not (is_static(a) and is_static(b)) or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
    n = b[0] if attr(node, "transB", 0) else b[1]
    return int(m) * int(n) * int(k)


def _fused_attention(node: onnx.NodeProto, v: GraphView) -> int | None:
    """com.microsoft Attention: the packed projection ``[B, S, D] @ [D, 3q]`` plus the two attention
    products, ``Q K^T`` and ``attn V``, each ``B * S * L * q`` (``L``: keys, ``S`` plus a cache's
    past length). Other ops named Attention count 0, as any uncounted op."""
    if node.domain != "com.microsoft":
        return 0
    x, w = v.shape(node.input[0]), v.shape(node.input[1])
    if not (is_static(x) and is_static(w)) or len(x) != 3 or len(w) != 2:
        return None
    (b, s, d), cols = x, w[1]
    sizes = attr(node, "qkv_hidden_sizes", None)
    q, vdim = (int(sizes[0]), int(sizes[2])) if sizes else (cols // 3, cols // 3)
    past = v.shape(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if past is not None and not is_static(past):
        return None
    keys = s + (past[3] if past is not None and len(past) == 5 else 0)
    return int(b * s * d * cols + b * s * keys * q + b * s * keys * vdim)


MAC_RULES: dict[str, MacRule] = {
    "Attention": _fused_attention,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "If": _if,
    "Loop": _loop,
    "Scan": _scan,
    # integer ops of quantized models: counted like the float op they replace
    "ConvInteger": _conv,
    "QLinearConv": _weight_at(_conv, 3),
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "DynamicQuantizeMatMul": _matmul,
    "MatMulIntegerToFloat": _matmul,
    "QGemm": _qgemm,
}


def node_macs(node: onnx.NodeProto, view: GraphView) -> int | None:
    """MACs of one node: 0 for ops that are not counted, None when shapes are not concrete."""
    rule = MAC_RULES.get(node.op_type)
    return 0 if rule is None else rule(node, view)


def unknown_macs_reason(node: onnx.NodeProto, view: GraphView) -> str:
    """Why :func:`node_macs` is None for ``node`` (one line)."""
    if node.op_type == "Loop" and _loop_trips(node, view) is None:
        return f"the trip count of Loop {node.name} is known only at run time"
    if node.op_type in ("If", "Loop", "Scan"):
        return f"shapes inside the {node.op_type} {node.name} subgraph are not static"
    contrib = _unknown_shape_source(node, view)
    if contrib is not None:
        return (f"the input shapes of {node.op_type} {node.name} are unknown: ONNX shape inference does not know "
                f"the {contrib.domain} op {contrib.op_type} ({contrib.name}) before it")
    return f"the shapes of {node.op_type} {node.name} are not static (computed at run time or after control flow)"


def _unknown_shape_source(node: onnx.NodeProto, view: GraphView, budget: int = 32) -> onnx.NodeProto | None:
    """The custom-domain op (com.microsoft QLinearGlobalAveragePool ...) whose output shape ONNX
    could not infer and that left ``node``'s input shapes unknown, walking up unknown shapes."""
    stack, seen = [node], set()
    while stack and len(seen) < budget:
        n = stack.pop()
        for i in n.input:
            if not i or i in seen or i in view.initializers or is_static(view.shape(i)):
                continue
            seen.add(i)
            p = view.producer.get(i)
            if p is not None and p.domain not in ("", "ai.onnx"):
                return p
            if p is not None:
                stack.append(p)
    return None


def _loop_trips(node: onnx.NodeProto, v: GraphView) -> int | None:
    m = v.const(node.input[0]) if node.input and node.input[0] else None
    return None if m is None or m.size != 1 else int(m.reshape(-1)[0])


def _body_macs(g: onnx.GraphProto, outer: GraphView, inputs: list[tuple]) -> int | None:
    """MACs of one run of subgraph ``g`` (``inputs``: ``(shape, elem_type)`` of its declared inputs,
    in order; None keeps what ``g`` declares), outer-scope values typed as in ``outer``."""
    sub = onnx.ModelProto()
    sub.ir_version = outer.model.ir_version
    sub.opset_import.extend(outer.model.opset_import)
    sub.graph.name = g.name
    sub.graph.node.extend(g.node)
    sub.graph.output.extend(g.output)
    sub.graph.initializer.extend(g.initializer)
    for vi, (shape, dtype) in zip(g.input, list(inputs) + [(None, None)] * (len(g.input) - len(inputs))):
        new = sub.graph.input.add()
        new.CopyFrom(vi)
        if shape is not None and dtype:
            new.CopyFrom(helper.make_tensor_value_info(vi.name, dtype, list(shape)))
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for name in sorted(({i for n in g.node for i in n.input if i} | set().union(*[subgraph_reads(n) for n in g.node]))
                       - defined):
        t = outer.initializers.get(name)
        if t is not None and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            sub.graph.initializer.append(t)  # values matter to shape inference (Reshape targets ...)
        elif name in outer.dtypes:
            shape = outer.shape(name)
            sub.graph.input.append(helper.make_tensor_value_info(name, outer.dtypes[name],
                                                                 None if shape is None else list(shape)))
    try:
        view = build_view(sub, inplace=True)
    except OnnxPruneError:
        return None
    counts = [node_macs(n, view) for n in view.nodes]
    return None if any(c is None for c in counts) else sum(counts)


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
    folded = build_view(normalize(view.model))
    if all(node_macs(n, folded) is not None for n in folded.nodes) or not any(
            n.domain == "com.microsoft" for n in folded.nodes):
        return folded
    # ONNX Runtime's contrib ops (fused Attention, EmbedLayerNormalization ...): ONNX shape inference
    # does not know their outputs, ONNX Runtime's symbolic shape inference does
    sym = symbolic_value_shapes(folded.model) or {}
    shapes = dict(folded.shapes)
    shapes.update({k: v for k, v in sym.items() if is_static(v) and not is_static(shapes.get(k))})
    return dataclasses.replace(folded, shapes=shapes)
