"""Fidelity check: the bridge against ONNX Runtime (CPU) on the same random inputs.

Run before any training (:func:`assert_bridge_faithful`): a bridge that computes something else than
the deployed graph would fine-tune the wrong function. Differences are measured relative to the
magnitude of the reference output (``|bridge - ort|.max() / |ort|.max()``), which is what float
reordering produces; an elementwise relative error is meaningless where outputs cross zero. A tensor
matches when ``max_abs_diff <= atol + rtol * max|ort|``; integer and bool tensors must match exactly.
When the outputs differ, every intermediate tensor is exposed as an extra ONNX Runtime output and
compared with the bridge's in topological order: the first node whose outputs differ is the culprit.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from ..errors import OnnxPruneError, ort_error_text
from ..model_io import PROTOBUF_LIMIT, proto_bytes
from ..prepare import resolve_input_shapes
from ..shapes import graph_inputs
from .module import BridgeRuntimeError, OnnxModule

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
             onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_}


def random_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for every graph input: standard normal floats, small non-negative integers
    (valid indices for any embedding), random bools. Symbolic dims: see ``resolve_input_shapes``."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in (input_shapes or {}).items():
        if name not in inputs:
            raise OnnxPruneError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        rank = len(inputs[name].type.tensor_type.shape.dim)
        if inputs[name].type.tensor_type.HasField("shape") and rank != len(dims):
            raise OnnxPruneError(f"--input-shape {name}: model input has rank {rank}, got {len(dims)} dims")
    shapes, _ = resolve_input_shapes(model, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in inputs.values():
        if inp.name not in shapes:
            raise OnnxPruneError(f"input {inp.name!r} has symbolic or unknown dimensions; "
                                 f"pass --input-shape {inp.name}=DIMS")
        elem = inp.type.tensor_type.elem_type
        if elem not in _NP_TYPES:
            raise OnnxPruneError(f"input {inp.name!r}: element type {onnx.TensorProto.DataType.Name(elem)} is not supported")
        dtype = _NP_TYPES[elem]
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.random(shape) < 0.5
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def ort_session(model: onnx.ModelProto, *, optimize: bool = True):
    """A CPU ONNX Runtime session over ``model`` (through a temporary file above 2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its error is raised with the reason: nothing extra on stderr
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if proto_bytes(model) > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="m.data")
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's errors are many types; the message is what matters
        raise OnnxPruneError(f"ONNX Runtime cannot load the model: {ort_error_text(exc)}") from exc


def compare(ours: Any, ref: np.ndarray, rtol: float, atol: float) -> dict[str, Any]:
    """Difference of one tensor against its reference (see the module docstring)."""
    a = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref)
    if a.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "ok": False,
                "why": f"shape {list(a.shape)} != {list(ref.shape)}"}
    if ref.dtype.kind in "biu" or a.dtype.kind in "biu" and ref.dtype.kind != "f":
        diff = float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max()) if a.size else 0.0
        return {"max_abs_diff": diff, "max_rel_diff": 0.0 if diff == 0 else float("inf"), "ok": diff == 0}
    if not a.size:
        return {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "ok": True}
    a64, r64 = a.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(r64)
    same_inf = np.isinf(a64) & (a64 == r64)
    err = np.where(both_nan | same_inf, 0.0, np.abs(a64 - r64))
    err = np.where(np.isnan(err), np.inf, err)
    finite = r64[np.isfinite(r64)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    diff = float(err.max())
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs_diff": diff, "max_rel_diff": rel, "ok": bool(diff <= atol + rtol * scale)}


def check_bridge(model: onnx.ModelProto | str | os.PathLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, *, train_bn: bool = False) -> dict[str, Any]:
    """Run the bridge and ONNX Runtime on the same random inputs and compare every output.

    Returns ``{"max_abs_diff", "max_rel_diff", "ok", "first_diverging_node", "first_diverging_op",
    "outputs": [{"name", "shape", "max_abs_diff", "max_rel_diff", "ok"}, ...], "inputs": {name: shape}}``;
    ``first_diverging_node`` is None when the outputs match. ``model`` may be a file path.
    """
    if not isinstance(model, onnx.ModelProto):
        model = load_for_check(model)
    module = OnnxModule(model, train_bn=train_bn).eval()
    feeds = random_inputs(model, input_shapes, seed)
    ref = dict(zip([o.name for o in model.graph.output], ort_session(model).run(None, feeds)))
    report: dict[str, Any] = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "ok": True, "first_diverging_node": None,
                              "first_diverging_op": None, "outputs": [],
                              "inputs": {k: list(v.shape) for k, v in feeds.items()}}
    try:
        with torch.no_grad():
            ours = module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    except BridgeRuntimeError as exc:
        report.update(ok=False, max_abs_diff=float("inf"), max_rel_diff=float("inf"), first_diverging_node=exc.node,
                      first_diverging_op=exc.op_type, error=str(exc))
        return report
    for name in module.output_names:
        c = compare(ours[name], ref[name], rtol, atol)
        report["outputs"].append({"name": name, "shape": list(np.shape(ref[name])), **c})
        report["max_abs_diff"] = max(report["max_abs_diff"], c["max_abs_diff"])
        report["max_rel_diff"] = max(report["max_rel_diff"], c["max_rel_diff"])
        report["ok"] = report["ok"] and c["ok"]
    if not report["ok"]:
        node = first_diverging_node(model, module, feeds, rtol, atol)
        if node is not None:
            report.update(first_diverging_node=node["node"], first_diverging_op=node["op"],
                          node_max_rel_diff=node["max_rel_diff"])
    return report


def first_diverging_node(model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray],
                         rtol: float = 1e-4, atol: float = 1e-5) -> dict[str, Any] | None:
    """The first node (topological order) whose outputs differ between the bridge and ONNX Runtime
    with every intermediate exposed: ``{"node", "op", "output", "max_abs_diff", "max_rel_diff"}``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for o in node.output:
            if o and o not in have:
                exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                have.add(o)
    names = [o.name for o in exposed.graph.output]
    try:
        ref = dict(zip(names, ort_session(exposed, optimize=False).run(None, dict(feeds))))
    except Exception:  # noqa: BLE001 - ONNX Runtime refused the exposed copy: no culprit can be named
        return None
    with torch.no_grad():
        ours = module.run({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}, keep_all=True)
    for n in module.nodes:
        for o in n.outputs:
            if o and o in ref and o in ours:
                c = compare(ours[o], ref[o], rtol, atol)
                if not c["ok"]:
                    return {"node": n.name, "op": n.op_type, "output": o, "max_abs_diff": c["max_abs_diff"],
                            "max_rel_diff": c["max_rel_diff"]}
    return None


def divergence_message(report: Mapping[str, Any]) -> str:
    """One line saying where and by how much the bridge differs from ONNX Runtime."""
    if report.get("error"):
        return report["error"]
    rel = report.get("node_max_rel_diff", report["max_rel_diff"])
    if report.get("first_diverging_node"):
        return (f"bridge output differs from ONNX Runtime at node {report['first_diverging_node']} "
                f"(op {report['first_diverging_op']}): max rel diff {rel:.3g}")
    return (f"bridge output differs from ONNX Runtime: max rel diff {report['max_rel_diff']:.3g} "
            "(accumulated; no single node differs beyond the tolerance)")


def assert_bridge_faithful(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                           rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """:func:`check_bridge`, raising :class:`OnnxPruneError` naming the first diverging node when the
    bridge and ONNX Runtime disagree. Call it before any training; returns the report when faithful."""
    report = check_bridge(model, input_shapes, rtol, atol, seed, **kwargs)
    if not report["ok"]:
        raise OnnxPruneError(divergence_message(report))
    return report


def load_for_check(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model file as ``finetune`` does (no normalization: the check covers the exact graph
    that is trained and written back)."""
    from ..model_io import load_model

    return load_model(Path(path))
