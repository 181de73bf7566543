"""Turn a real-world ONNX file into one canonical graph for the analyses that follow.

Exporters disagree on how weights are stored (initializers, ``Constant`` nodes, constant
subgraphs such as ``ConstantOfShape``/``Cast``/``Reshape`` of constants, weights listed as graph
inputs in old IR versions) and sprinkle no-op nodes (``Identity``, inference ``Dropout``). The
pruner needs weights as initializers and edges without no-ops. Every step here preserves the
model's outputs exactly; the tests check that with ONNX Runtime on every test model.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import attr, build_view, subgraph_reads, subgraphs
from .shapes import infer_shapes, infer_value_shapes, is_static, symbolize_negative_dims
from .model_io import sparse_to_dense
from onnx.reference import ReferenceEvaluator

#: Ops never folded even when all inputs are constant: non-deterministic, control flow, or
#: quantization structure that later tools expect to see.
NO_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}
#: Folding must not blow a small constant up into a huge one (e.g. ``Expand`` to a big tensor).
MAX_FOLDED_ELEMENTS = 1 << 26


def normalize(model: onnx.ModelProto, *, fold_bn: bool = False, inplace: bool = False) -> onnx.ModelProto:
    """Return a normalized copy of ``model``: weights as initializers, no-ops removed, shapes inferred.

    ``fold_bn`` folds a BatchNormalization into the Conv feeding it (off by default: batch-norm
    scales are an importance criterion and a channel-coupled op the pruner uses). ``inplace``
    normalizes ``model`` itself, for callers that own it: a copy doubles the weights in memory.
    """
    m = model
    if not inplace:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    _name_nodes(m)
    symbolize_negative_dims(m)
    _densify_sparse_initializers(m)
    _drop_initializer_inputs(m)
    hoist_subgraph_weights(m)
    for _ in range(8):  # each pass may expose new constants (Shape of a now-static tensor ...)
        changed = _constants_to_initializers(m)
        changed |= fold_constants(m)
        if not changed:
            break
    _remove_noops(m)
    unshare_channel_vectors(m)
    if fold_bn:
        fold_batchnorm(m)
    remove_dead(m)
    return infer_shapes(m, inplace=True)


def _name_nodes(m: onnx.ModelProto) -> None:
    """Give every node a unique name: reports, ``--ignore`` globs and diffs all key on node names."""
    seen: set[str] = set()
    for i, node in enumerate(m.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _densify_sparse_initializers(m: onnx.ModelProto) -> None:
    """Sparse initializers (``--sparse-storage`` output) are weights like any other for analysis."""

    for sp in m.graph.sparse_initializer:
        m.graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sp), sp.values.name))
    del m.graph.sparse_initializer[:]


def _drop_initializer_inputs(m: onnx.ModelProto) -> None:
    """IR<4 exporters (Caffe2, old PyTorch) list every weight as a graph input; they are constants."""
    inits = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    if len(keep) != len(m.graph.input):
        del m.graph.input[:]
        m.graph.input.extend(keep)
        m.ir_version = max(m.ir_version, 4)  # IR 4 is the first that allows initializers outside inputs


def hoist_subgraph_weights(m: onnx.ModelProto) -> int:
    """(In place.) Initializers and ``Constant`` nodes of If/Loop/Scan subgraphs become initializers
    of the main graph, read from the subgraph as outer-scope values (same outputs): weight-level
    pruning, parameter counts and constant lookups then see them like any other weight. A name
    defined more than once in the model (sibling branches may reuse one) or that is a subgraph
    output stays where it is. Returns how many moved."""
    defined = Counter(_defined_names(m.graph))
    moved = 0

    def hoist(g: onnx.GraphProto) -> None:
        nonlocal moved
        stays = {o.name for o in g.output} | {n for n, c in defined.items() if c > 1}
        keep_inits = [t for t in g.initializer if t.name in stays]
        m.graph.initializer.extend(t for t in g.initializer if t.name not in stays)
        moved += len(g.initializer) - len(keep_inits)
        if len(keep_inits) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep_inits)
        keep_nodes = []
        for node in g.node:
            vals = None
            if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1
                    and node.output[0] not in stays):
                vals = _eval_node(node, [], m.opset_import)
            if vals is None:
                keep_nodes.append(node)
                continue
            m.graph.initializer.append(numpy_helper.from_array(vals[0], node.output[0]))
            moved += 1
        if len(keep_nodes) != len(g.node):
            del g.node[:]
            g.node.extend(keep_nodes)
        for node in g.node:
            for sub in subgraphs(node):
                hoist(sub)

    for node in m.graph.node:
        for sub in subgraphs(node):
            hoist(sub)
    return moved


def _defined_names(g: onnx.GraphProto):
    """Every name ``g`` and its subgraphs define (inputs, initializers, node outputs), repeats kept."""
    yield from (i.name for i in g.input)
    yield from (t.name for t in g.initializer)
    for node in g.node:
        yield from (o for o in node.output if o)
        for sub in subgraphs(node):
            yield from _defined_names(sub)


def _eval_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opsets) -> list[np.ndarray] | None:
    """Evaluate one node on constant inputs with ONNX's reference implementation; None if it can't."""

    names = [n if n else "" for n in node.input]
    feeds = {n: v for n, v in zip(names, inputs) if n}
    graph = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
    )
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = onnx.IR_VERSION
    try:
        outs = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference cannot run simply stays unfolded
        return None
    return [np.asarray(o) for o in outs]


def _replace_by_initializers(m: onnx.ModelProto, evaluate) -> bool:
    """(In place; True if anything changed.) Every node for which ``evaluate(node, inits)`` returns
    values is replaced by initializers holding them; later nodes see them at once (chains fold in one pass)."""
    inits = {i.name: i for i in m.graph.initializer}
    keep, changed = [], False
    for node in m.graph.node:
        outs = evaluate(node, inits)
        if outs is None:
            keep.append(node)
            continue
        for name, val in zip(node.output, outs):
            if name:
                t = numpy_helper.from_array(val, name)
                m.graph.initializer.append(t)
                inits[name] = t
        changed = True
    if changed:
        del m.graph.node[:]
        m.graph.node.extend(keep)
    return changed


def _constants_to_initializers(m: onnx.ModelProto) -> bool:
    """Constant nodes become initializers whatever their size (they are weights, e.g. Caffe2/TF exports)."""
    def evaluate(node, _inits):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _eval_node(node, [], m.opset_import)
        return None
    return _replace_by_initializers(m, evaluate)


def fold_constants(m: onnx.ModelProto) -> bool:
    """(In place; True if anything changed.) Replace nodes whose inputs are all constant (or whose input shape is static, for Shape/Size)."""
    # shapes are only read for Shape/Size nodes: inferred only when the graph has one
    shapes = infer_value_shapes(m) if any(n.op_type in ("Shape", "Size") for n in m.graph.node) else {}
    graph_outputs = {o.name for o in m.graph.output}

    def evaluate(node, inits):
        if (node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD or set(node.output) & graph_outputs
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            return None
        outs = None
        if node.op_type in ("Shape", "Size") and is_static(shapes.get(node.input[0])):
            shape = shapes[node.input[0]]
            if int(np.prod(shape)) <= MAX_FOLDED_ELEMENTS:  # only the shape matters; values are dummies
                outs = _eval_node(node, [np.zeros(shape, dtype=np.float32)], m.opset_import)
        elif node.input and all((not i) or i in inits for i in node.input):
            ins = [numpy_helper.to_array(inits[i]) if i else None for i in node.input]
            outs = _eval_node(node, ins, m.opset_import)
        return outs if outs is not None and all(o.size <= MAX_FOLDED_ELEMENTS for o in outs) else None
    return _replace_by_initializers(m, evaluate)


def _is_noop(node: onnx.NodeProto) -> bool:
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        # inference Dropout: no mask consumer and not forced into training mode
        training = len(node.input) > 2 and node.input[2]
        return not training and (len(node.output) < 2 or not node.output[1]) and not attr(node, "is_test", 1) == 0
    return False


def _remove_noops(m: onnx.ModelProto) -> None:
    """Bypass Identity and inference Dropout (unless they feed a graph output, whose name must stay)."""
    graph_outputs = {o.name for o in m.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if _is_noop(node) and node.output[0] not in graph_outputs:
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)


#: Inputs (by position) that hold quantization parameters: one scale/zero-point may serve many
#: tensors on purpose (a shared quantization grid), so they stay shared.
_QUANT_PARAM_INPUTS = {"QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2}}


def _is_channel_vector(t: onnx.TensorProto) -> bool:
    """A float tensor with more than one element along at most one axis (a bias, a norm weight)."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return t.data_type in floats and sum(d > 1 for d in t.dims) == 1


def unshare_channel_vectors(m: onnx.ModelProto) -> int:
    """(In place.) Give every node its own copy (``NAME__NODENAME``) of a float channel vector that
    several nodes read. The dynamo exporter stores identical initializers once, so all LayerNorm
    weights (ones) and zero biases of unrelated layers become one tensor, and the channel analysis
    would couple every layer through it. Quantization scales and zero-points stay shared. Returns
    how many copies were made."""
    inits = {t.name: t for t in m.graph.initializer}
    keep = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in m.graph.node:
        quant = _QUANT_PARAM_INPUTS.get(node.op_type, set()) if node.domain in ("", "ai.onnx") else set()
        for k, name in enumerate(node.input):
            if name in inits and name not in keep:
                readers.setdefault(name, []).append((node, -1 if k in quant else k))
    taken = set(inits) | {o for n in m.graph.node for o in n.output}
    made = 0
    for name, uses in readers.items():
        if len({id(n) for n, _ in uses}) < 2 or any(k < 0 for _, k in uses) or not _is_channel_vector(inits[name]):
            continue
        copies: dict[int, str] = {}
        for node, k in uses:
            if id(node) not in copies:
                new = f"{name}__{node.name}"
                while new in taken:
                    new += "_"
                taken.add(new)
                t = onnx.TensorProto()
                t.CopyFrom(inits[name])
                t.name = new
                m.graph.initializer.append(t)
                copies[id(node)] = new
                made += 1
            node.input[k] = copies[id(node)]
    return made


def remove_dead(m: onnx.ModelProto) -> None:
    """(In place.) Drop nodes and initializers nothing reaches the outputs through."""
    needed = {o.name for o in m.graph.output}
    keep = []
    for node in reversed(list(m.graph.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= subgraph_reads(node)  # outer-scope names read inside subgraphs, at any depth
    keep.reverse()
    if len(keep) != len(m.graph.node):  # (rebuilding copies every message: only when something goes)
        del m.graph.node[:]
        m.graph.node.extend(keep)
    if any(i.name not in needed for i in m.graph.initializer):
        inits = [i for i in m.graph.initializer if i.name in needed]
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)


def fold_batchnorm(m: onnx.ModelProto) -> int:
    """Fold inference BatchNormalization into the Conv before it (in place). Returns how many were folded."""
    view = build_view(m, infer=False)
    graph_outputs = {o.name for o in m.graph.output}
    removed, folded = set(), 0
    for bn in m.graph.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        conv = view.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(view.consumers.get(conv.output[0], [])) != 1:
            continue
        if conv.output[0] in graph_outputs or not all(view.is_const(n) for n in list(bn.input[1:]) + [conv.input[1]]):
            continue
        if len(conv.input) > 2 and conv.input[2] and not view.is_const(conv.input[2]):
            continue
        gamma, beta, mean, var = (view.const(n).astype(np.float64) for n in bn.input[1:5])
        eps = attr(bn, "epsilon", 1e-5)
        w = view.const(conv.input[1])
        b = view.const(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        scale = gamma / np.sqrt(var + eps)
        w_new = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b_new = ((b - mean) * scale + beta).astype(w.dtype)
        w_name, b_name = conv.input[1] + "_bnfold", f"{conv.name}_bias_bnfold"
        m.graph.initializer.extend([numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)])
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        removed.add(bn.name)
        folded += 1
    if removed:
        keep = [n for n in m.graph.node if n.name not in removed]
        del m.graph.node[:]
        m.graph.node.extend(keep)
        remove_dead(m)
    return folded
