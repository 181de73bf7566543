"""``onnxprune inspect``: what is in a model, in numbers (params, MACs, sparsity, shapes).

Returns plain data (the ``--json`` shape) so pipelines can call it without the CLI.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Mapping

import numpy as np
import onnx

from ..core.graph import opset_of, subgraph_reads, attr
from ..core.quantized import quantization_kind
from .macs import MAC_RULES, macs_by_node, unknown_macs_reason
from ..core.model_io import file_bytes, proto_bytes
from .params import count_params, parameter_names
from ..core.prepare import Prepared, prepare
from ..core.shapes import format_shape, graph_inputs
from .patterns import nm_status, reduction_axis

#: Ops whose main weight (input 1) is what pruning acts on.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

MACS_CONVENTION = ("1 multiply-add = 1 MAC; counted for Conv, ConvTranspose, Gemm and MatMul only (and their "
                   "integer forms in quantized models: QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger ...); "
                   "elementwise, normalization and pooling ops are not counted; If counts its larger branch, "
                   "Loop its body times the trip count, Scan its body times the scan length")


def _dtype_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _io(vis) -> list[dict[str, Any]]:
    """Inputs/outputs as declared in the file (symbolic dims stay symbolic)."""
    return [{"name": v.name, "dtype": _dtype_name(v.type.tensor_type.elem_type),
             "shape": format_shape(_declared_shape(v))} for v in vis]


def _declared_shape(v: onnx.ValueInfoProto):
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


def inspect_prepared(p: Prepared) -> dict[str, Any]:
    """Inspection figures of an already prepared model."""
    view = p.view
    params, nonzero = count_params(view)
    param_set = set(parameter_names(view))
    nodes, total_macs, macs_complete = [], 0, True
    per_node_macs = macs_by_node(view)
    for node in view.nodes:
        m = per_node_macs.get(node.name, 0)  # nodes folded away to constants cost no MACs
        if m is None:
            macs_complete = False
        else:
            total_macs += m
        reads = list(node.input) + sorted(subgraph_reads(node))  # If/Loop/Scan: the weights of their bodies
        node_params = sum(view.const_size(i) for i in dict.fromkeys(reads) if i in param_set)
        entry: dict[str, Any] = {
            "name": node.name, "op_type": node.op_type, "macs": m, "params": node_params,
            "output_shape": format_shape(view.shape(node.output[0])) if node.output else None,
        }
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in param_set:
            w = view.const(node.input[1], cache=False)
            entry["weight"] = node.input[1]
            entry["sparsity"] = float(1.0 - np.count_nonzero(w) / max(w.size, 1))
            entry["nm"] = _nm_status(node, w)
        nodes.append(entry)
    original_inputs = [i for i in p.model.graph.input if i.name not in view.initializers]
    return {
        "model": str(p.path) if p.path else None,
        "file_bytes": file_bytes(p.path) if p.path else proto_bytes(p.original),
        "opset": opset_of(p.original),
        "ir_version": int(p.original.ir_version),
        "producer": f"{p.original.producer_name} {p.original.producer_version}".strip(),
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": float(1 - nonzero / params) if params else 0.0,
        "macs": total_macs if macs_complete else None,
        "macs_unknown_reason": None if macs_complete else macs_unknown_reason(p, per_node_macs),
        "macs_convention": MACS_CONVENTION,
        "inputs": _io(original_inputs),
        "outputs": _io(p.model.graph.output),
        "op_histogram": dict(sorted(Counter(n.op_type for n in view.nodes).items())),
        "quantization": quantization_kind(p.model),
        "nodes": nodes,
        "notes": list(p.notes),
    }


def macs_unknown_reason(p: Prepared, per_node_macs: Mapping[str, int | None]) -> str:
    """Why MACs are ``n/a``, and how to get them: the ``--input-shape`` to pass for inputs whose dims
    stay symbolic (their names in place of the unknown sizes), else the first uncountable node."""
    hints = []
    for inp in graph_inputs(p.model):
        if inp.name in p.concrete_shapes:
            continue
        shape = _declared_shape(inp)
        dims = ["N" if shape is None else ("1" if i == 0 and not isinstance(d, int) else
                                          str(d) if isinstance(d, int) else f"<{d or f'dim{i}'}>")
                for i, d in enumerate(shape or [None])]
        hints.append(f"{inp.name}=" + "x".join(dims))
    if hints:
        return "symbolic dims: pass " + " ".join(f"--input-shape {h}" for h in hints)
    node = next((n for n in p.view.nodes if per_node_macs.get(n.name, 0) is None), None)
    return "unknown" if node is None else unknown_macs_reason(node, p.view)


def _nm_status(node: onnx.NodeProto, w: np.ndarray) -> dict[str, bool]:
    """``{"2:4": pattern holds, "eligible": reduction dim divisible by 4}`` for a weight node."""

    if w.ndim == 0:
        return {"2:4": False, "eligible": False}
    group = int(attr(node, "group", 1)) if node.op_type.startswith("Conv") else 1
    return nm_status(node.op_type, w, reduction_axis(node, 1, tuple(w.shape)), group)


def inspect_model(source: str | os.PathLike | onnx.ModelProto,
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Params, MACs, sizes, I/O and per-node figures of an ONNX model (the ``inspect --json`` object)."""
    return inspect_prepared(prepare(source, input_shapes))


__all__ = ["inspect_model", "inspect_prepared", "MAC_RULES", "WEIGHT_OPS"]
