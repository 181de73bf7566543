"""The residual stream of a transformer graph: the tensors ``--distill-features`` matches.

Pruning heads or FFN columns changes what each block adds to the stream, never the stream's width,
so every block's output keeps the dense model's name and shape and can be matched one for one
(Minitron). A tensor is on the stream when it is a normalisation's input or output
(``LayerNormalization``, ``SkipLayerNormalization``, ``SimplifiedLayerNormalization``, or RMSNorm /
LayerNorm written out as ``Pow``/``ReduceMean``/``Sqrt``/``Div``/``Mul``), or the output of a residual
``Add`` (``x + f(x)``: neither operand a constant, one of them already on the stream). The features
are the norms' outputs and the residual ``Add`` outputs: post-LN blocks end in a norm, pre-LN
blocks in an ``Add``.
"""
from __future__ import annotations

import onnx

NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"}
#: the ops between ``ReduceMean(x^2)`` and the division of a written-out norm (eps, sqrt, 1/x)
_RMS_TAIL = {"Add", "Sqrt", "Reciprocal", "Div", "Cast"}


def constants(model: onnx.ModelProto) -> set[str]:
    """Names of initializers, ``Constant`` outputs and their ``Identity``/``Cast`` copies (exporters
    alias equal weights that way): an ``Add`` with one of them is a bias, not a residual."""
    out = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" or (n.op_type in ("Identity", "Cast") and n.input and n.input[0] in out):
            out.update(n.output)
    return out


def _written_out_norms(model: onnx.ModelProto, const: set[str]) -> list[tuple[str, str]]:
    """(input, output) of each RMSNorm / LayerNorm written out in elementwise ops:
    ``Pow(x or x - mean(x), 2) -> ReduceMean -> (+eps, Sqrt, 1/.) -> Div or Mul`` with ``x`` (possibly
    already scaled by a constant), then an optional ``* weight`` and ``+ bias``."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def squared(n: onnx.NodeProto) -> str | None:
        if n.op_type == "Pow" and len(n.input) == 2 and n.input[1] in const:
            return n.input[0]
        if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]:
            return n.input[0]
        return None

    def only_consumer(name: str, op: str) -> onnx.NodeProto | None:
        cs = consumers.get(name, [])
        if len(cs) == 1 and cs[0].op_type == op and len(cs[0].input) == 2 and any(i in const for i in cs[0].input):
            return cs[0]
        return None

    found = []
    for rm in nodes:
        if rm.op_type != "ReduceMean" or not rm.input or rm.input[0] not in producer:
            continue
        base = squared(producer[rm.input[0]])
        if base is None:
            continue
        x = base
        sub = producer.get(base)
        if sub is not None and sub.op_type == "Sub" and sub.input[1] in producer \
                and producer[sub.input[1]].op_type == "ReduceMean" and producer[sub.input[1]].input[0] == sub.input[0]:
            x = sub.input[0]  # LayerNorm: the centred input is squared
        scaled = {base} | {c.output[0] for c in consumers.get(base, []) if c.op_type == "Mul"
                           and any(i in const for i in c.input)}
        tail, frontier = {rm.output[0]}, [rm.output[0]]
        while frontier:  # what the mean of squares becomes before it meets x
            for c in consumers.get(frontier.pop(), []):
                if c.op_type in _RMS_TAIL and not set(c.input) & scaled and c.output[0] not in tail:
                    tail.add(c.output[0])
                    frontier.append(c.output[0])
        norm = next((c for t in sorted(tail) for c in consumers.get(t, []) if c.op_type in ("Mul", "Div")
                     and len(c.input) == 2 and set(c.input) & scaled and set(c.input) & tail), None)
        if norm is None:
            continue
        out = norm.output[0]
        for op in ("Mul", "Add"):  # weight, then bias
            nxt = only_consumer(out, op)
            if nxt is not None:
                out = nxt.output[0]
        found.append((x, out))
    return found


def residual_stream(model: onnx.ModelProto) -> list[str]:
    """Tensors on the residual stream worth matching (norm outputs, residual ``Add`` outputs), in
    graph order; graph outputs are left out (they are matched as outputs already)."""
    const = constants(model)
    stream: set[str] = set()
    features: set[str] = set()
    for n in model.graph.node:
        if n.op_type in NORM_OPS and n.input and n.output:
            skip = n.op_type.startswith("Skip")
            stream.update(i for i in n.input[:2 if skip else 1] if i)
            features.add(n.output[0])
            if skip and len(n.output) > 3 and n.output[3]:
                features.add(n.output[3])  # input + skip: the stream itself
    for x, out in _written_out_norms(model, const):
        stream.add(x)
        features.add(out)
    stream |= features
    for n in model.graph.node:  # graph order is topological: an Add's operands are known before it
        if n.op_type == "Add" and len(n.input) == 2 and not set(n.input) & const and set(n.input) & stream:
            stream.add(n.output[0])
            features.add(n.output[0])
    outputs = {o.name for o in model.graph.output}
    order = [o for n in model.graph.node for o in n.output]
    return [o for o in order if o in features and o not in outputs]
