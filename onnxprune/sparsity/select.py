"""Which weights weight-level pruning acts on.

By default every constant floating-point weight of a Conv, ConvTranspose, Gemm or MatMul (inside
If/Loop/Scan subgraphs too: normalization makes their weights outer-scope initializers), first
layer and classifier included (as Global Magnitude Pruning does): Conv/ConvTranspose/Gemm input 1,
the constant operand of a MatMul. ``exclude_first`` drops the layers no other weight layer feeds,
``exclude_last`` those that feed no other weight layer (the classifier), ``ignore`` drops layers
whose node name or weight name matches a glob.

Each weight also carries its *reduction axis* (the input-channel axis summed over), along which
N:M groups are formed: Conv ``[Cout, Cin/g, k...]`` axis 1; ConvTranspose ``[Cin, Cout/g, k...]``
axis 0; Gemm B axis 0, or 1 with ``transB``; MatMul ``x @ W`` axis -2 of W, ``W @ x`` axis -1.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx

from ..core.graph import GraphView, attr, walk_nodes
from ..metrics.params import FLOAT_TYPES
from ..metrics.patterns import reduction_axis

#: Ops whose constant weight weight-level pruning acts on.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Prunable:
    """One prunable weight initializer and the node(s) reading it."""

    weight: str  # initializer name
    node: str  # first weight node reading it (reports, --ignore)
    op_type: str
    shape: tuple[int, ...]
    reduction_axis: int  # non-negative axis of the weight summed over by the op
    group: int = 1  # Conv/ConvTranspose ``group`` attribute
    nodes: list[str] = field(default_factory=list)  # every weight node reading it

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def reduction_size(self) -> int:
        """Length of one N:M run: the reduction dim (per conv group for ConvTranspose)."""
        d = self.shape[self.reduction_axis]
        return d // self.group if self.op_type == "ConvTranspose" else d


def weight_input(node: onnx.NodeProto, view: GraphView) -> int | None:
    """Index of the constant weight input of a weight node, or None (not a weight op, weight not constant)."""
    if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
        return None
    candidates = [1] if node.op_type != "MatMul" else [1, 0]
    consts = [i for i in (0, 1) if _is_float_const(view, node.input[i])]
    if node.op_type == "MatMul" and len(consts) == 2:
        return None  # constant x constant: not a layer
    for i in candidates:
        if i in consts:
            return i
    return None


def prunable_weights(view: GraphView, *, exclude_first: bool = False, exclude_last: bool = False,
                     ignore: Iterable[str] = ()) -> list[Prunable]:
    """The prunable weights of a (normalized) model in graph order, narrowed by the flags."""
    return select_weights(view, exclude_first=exclude_first, exclude_last=exclude_last, ignore=ignore)[0]


def select_weights(view: GraphView, *, exclude_first: bool = False, exclude_last: bool = False,
                   ignore: Iterable[str] = ()) -> tuple[list[Prunable], list[dict[str, str]]]:
    """``(prunable, excluded)``: the weights pruning acts on, and those the flags took out with the reason.

    A weight read by several nodes is one entry; it is excluded when any reader is."""
    patterns = [p for p in ignore if p]
    first, last = _first_and_last(view)
    by_weight: dict[str, Prunable] = {}
    excluded: dict[str, str] = {}
    for node in walk_nodes(view.model.graph):  # If/Loop/Scan bodies too: normalize hoisted their weights
        idx = weight_input(node, view)
        if idx is None:
            continue
        name = node.input[idx]
        shape = tuple(int(d) for d in view.const(name).shape)
        why = None
        if exclude_first and node.name in first:
            why = "first layer (--exclude-first)"
        elif exclude_last and node.name in last:
            why = "last layer (--exclude-last)"
        else:
            hit = next((p for p in patterns if fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(name, p)), None)
            if hit is not None:
                why = f"matches --ignore {hit}"
        if why and name not in excluded:
            excluded[name] = why
        if name in by_weight:
            by_weight[name].nodes.append(node.name)
            continue
        by_weight[name] = Prunable(weight=name, node=node.name, op_type=node.op_type, shape=shape,
                                   reduction_axis=reduction_axis(node, idx, shape),
                                   group=int(attr(node, "group", 1)) if node.op_type.startswith("Conv") else 1,
                                   nodes=[node.name])
    kept = [p for n, p in by_weight.items() if n not in excluded and p.size > 0]
    dropped = [{"node": by_weight[n].node, "weight": n, "reason": why} for n, why in excluded.items()]
    return kept, dropped


def _is_float_const(view: GraphView, name: str) -> bool:
    t = view.initializers.get(name)
    return t is not None and t.data_type in FLOAT_TYPES


def _first_and_last(view: GraphView) -> tuple[set[str], set[str]]:
    """Weight nodes no other weight node feeds (first) and that feed no other weight node (last)."""
    nodes = view.nodes
    is_weight = {n.name: weight_input(n, view) is not None for n in nodes}
    below: set[str] = set()  # tensors downstream of some weight node
    first: set[str] = set()
    for n in nodes:
        fed = any(i in below for i in n.input if i)
        if is_weight[n.name] and not fed:
            first.add(n.name)
        if fed or is_weight[n.name]:
            below.update(o for o in n.output if o)
    above: set[str] = set()  # tensors upstream of some weight node
    last: set[str] = set()
    for n in reversed(nodes):
        feeds = any(o in above for o in n.output if o)
        if is_weight[n.name] and not feeds:
            last.add(n.name)
        if feeds or is_weight[n.name]:
            above.update(i for i in n.input if i and not view.is_const(i))
    return first, last
