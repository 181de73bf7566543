"""A read-only index over an ONNX graph: who produces and consumes each tensor, constants as numpy.

Every analysis walks edges and looks up constant weights; this builds those maps once. It holds no
behaviour beyond lookups, so passes stay pure functions of (model -> result).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .shapes import Shape, infer_shapes, value_dtypes, value_shapes
from .errors import OnnxPruneError


@dataclass
class GraphView:
    """Lookup tables over ``model.graph`` (build with :func:`build_view`)."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    initializers: dict[str, onnx.TensorProto]
    shapes: dict[str, Shape]
    dtypes: dict[str, int]
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in self.initializers]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str, *, cache: bool = True) -> np.ndarray | None:
        """The initializer ``name`` as a numpy array, or None when it is not a constant.

        Cached, so passes that revisit weights decode them once; ``cache=False`` for a one-pass read
        (counting): decoding every weight into the cache would hold a second copy of the model.
        """
        if name not in self.initializers:
            return None
        arr = self._arrays.get(name)
        if arr is None:
            arr = numpy_helper.to_array(self.initializers[name])
            if cache:
                self._arrays[name] = arr
        return arr

    def forget_arrays(self) -> None:
        """Drop the decoded-array cache (the initializers stay): for callers done with the weights."""
        self._arrays.clear()

    def const_size(self, name: str) -> int:
        """Element count of the initializer ``name`` (from its dims: nothing decoded)."""
        n = 1
        for d in self.initializers[name].dims:
            n *= int(d)
        return n

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)


def build_view(model: onnx.ModelProto, *, infer: bool = True, inplace: bool = False) -> GraphView:
    """Index ``model``; with ``infer`` the shapes come from a fresh ONNX shape inference (written
    into ``model`` itself with ``inplace``, saving a copy of the weights)."""
    m = infer_shapes(model, inplace=inplace) if infer else model
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in m.graph.node:
        for o in node.output:
            if o:
                producer[o] = node
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    inits = {i.name: i for i in m.graph.initializer}
    return GraphView(model=m, producer=producer, consumers=consumers, initializers=inits,
                     shapes=value_shapes(m), dtypes=value_dtypes(m))


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def walk_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs, outer before inner (depth first)."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from walk_nodes(g)


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read by nodes inside ``node``'s subgraphs, at any depth (outer-scope
    reads among them)."""
    return {i for g in subgraphs(node) for n in walk_nodes(g) for i in n.input if i}


def sort_topologically(graph: onnx.GraphProto, label: str = "model") -> None:
    """(In place.) Put ``graph``'s nodes in topological order, as ONNX requires and ONNX Runtime does
    not (some exporters and hand edits write them unsorted). Raises :class:`OnnxPruneError` naming
    the node for an input nothing defines, and the nodes of a cycle."""

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} \
        | {t.values.name for t in graph.sparse_initializer} | set(producer)
    needs: list[set[int]] = []
    for n in nodes:
        for i in n.input:
            if i and i not in known:
                raise OnnxPruneError(f"{label}: fails the ONNX checker: input {i!r} of node {n.name or '?'} ({n.op_type}) is not produced by "
                                     "any node, initializer or graph input")
        reads = set(n.input) | subgraph_reads(n)  # outer-scope reads of subgraphs are dependencies too
        needs.append({producer[i] for i in reads if i in producer})
    if all(all(j < k for j in deps) for k, deps in enumerate(needs)):
        return  # already sorted (the usual case): nothing copied
    users: dict[int, list[int]] = {}
    for k, deps in enumerate(needs):
        for j in deps:
            users.setdefault(j, []).append(k)
    waiting = [len(d) for d in needs]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) < len(nodes):
        left = {k for k in range(len(nodes)) if waiting[k] > 0}
        while True:  # drop the nodes merely downstream of the cycle: name the ones on it
            sinks = {k for k in left if not any(u in left for u in users.get(k, []))}
            if not sinks:
                break
            left -= sinks
        stuck = [nodes[k].name or nodes[k].op_type for k in sorted(left)]
        raise OnnxPruneError(f"{label}: fails the ONNX checker: the graph has a cycle through node(s) {', '.join(stuck[:5])}"
                             f"{' ...' if len(stuck) > 5 else ''} (each needs its own output)")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """Attribute value of ``node`` (python value), or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for ``domain`` (default domain: "" or "ai.onnx")."""
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(o.version)
    return 1


def int_list_input_or_attr(view: GraphView, node: onnx.NodeProto, input_index: int, attr_name: str) -> list[int] | None:
    """Read an int list that newer opsets pass as an input and older ones as an attribute
    (Split ``split``, Squeeze/Unsqueeze/Reduce ``axes``, Slice ``starts``...). None when absent or not constant."""
    if len(node.input) > input_index and node.input[input_index]:
        arr = view.const(node.input[input_index])
        return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]
    val = attr(node, attr_name)
    return None if val is None else [int(v) for v in val]
