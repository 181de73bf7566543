"""Fidelity check: the bridge against ONNX Runtime (CPU) on the same random inputs.

Run before any training (:func:`assert_bridge_faithful`): a bridge that computes something else than
the deployed graph would fine-tune the wrong function. Differences are measured relative to the
magnitude of the reference output (``|bridge - ort|.max() / |ort|.max()``), which is what float
reordering produces; an elementwise relative error is meaningless where outputs cross zero.

The tolerance fits the model's own float32 noise, not a fixed figure: a deep (or calibrated, or
sharp-headed) net legitimately differs between two correct float32 implementations by far more than
1e-4 of its output. Per output, the *noise floor* is the larger of (a) ONNX Runtime with all graph
optimizations against none (fusions such as Conv+BatchNormalization reorder and re-round the same
arithmetic) and (b) ONNX Runtime on inputs moved by one float32 rounding (2**-23 relative), which
measures how much this model amplifies a rounding. The tolerance is ``max(atol + rtol * max|ort|,
NOISE_OK * noise)``: within it the bridge matches; up to ``BORDERLINE`` times it is *borderline*
(:func:`assert_bridge_faithful` warns and proceeds); beyond, it diverges and is refused. Integer and
bool tensors must match exactly (borderline when ONNX Runtime's own two runs disagree on them).
When the bridge diverges, every intermediate tensor is exposed as an extra ONNX Runtime output and
compared with the bridge's in topological order, each with its own input-rounding noise: the first
node beyond its refusal bound is the culprit.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from ..core.errors import OnnxPruneError
from ..core.model_io import load_model
from ..core.prepare import resolve_input_shapes
from ..core.shapes import graph_inputs
from .module import BridgeRuntimeError, OnnxModule
from ..core.runtime import open_session, session_options

_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
             onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_}

#: a difference within this many times the model's own float32 noise floor matches
NOISE_OK = 10.0
#: a difference up to this many times the tolerance is borderline (warned about, not refused)
BORDERLINE = 5.0
#: relative size of the input rounding whose effect on the outputs is the second noise source
INPUT_ROUNDING = 2.0 ** -23
OK, BORDERLINE_STATUS, DIVERGES = "ok", "borderline", "diverges"


class BridgeToleranceWarning(UserWarning):
    """The bridge differs from ONNX Runtime by more than the model's float32 noise, not enough to refuse."""


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
    """A CPU ONNX Runtime session over ``model`` (through a temporary file above 2 GB); quiet: a
    failure is raised with the reason, nothing extra on stderr."""
    return open_session(model, options=session_options(optimize=optimize, quiet=True), what="the model")


def _errors(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |a - ref|, max |ref| over its finite values) of two same-shape float arrays; NaN against
    NaN and equal infinities count as equal."""
    a64, r64 = a.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(r64)
    same_inf = np.isinf(a64) & (a64 == r64)
    err = np.where(both_nan | same_inf, 0.0, np.abs(a64 - r64))
    err = np.where(np.isnan(err), np.inf, err)
    finite = r64[np.isfinite(r64)]
    return (float(err.max()) if err.size else 0.0), (float(np.abs(finite).max()) if finite.size else 0.0)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def compare(ours: Any, ref: np.ndarray, rtol: float, atol: float, noise: float = 0.0) -> dict[str, Any]:
    """Difference of one tensor against its reference (see the module docstring). ``noise``: the
    tensor's float32 noise floor (absolute); ``ok`` means within the tolerance, ``status`` is
    ``ok``, ``borderline`` or ``diverges``."""
    a, ref = _numpy(ours), np.asarray(ref)
    if a.shape != ref.shape:
        return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf"), "ok": False, "status": DIVERGES,
                "why": f"shape {list(a.shape)} != {list(ref.shape)}"}
    if ref.dtype.kind in "biu" or a.dtype.kind in "biu" and ref.dtype.kind != "f":
        diff = float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max()) if a.size else 0.0
        status = OK if diff == 0 else BORDERLINE_STATUS if noise > 0 else DIVERGES
        return {"max_abs_diff": diff, "max_rel_diff": 0.0 if diff == 0 else float("inf"), "ok": diff == 0,
                "status": status, "scale": 0.0, "tolerance": 0.0, "refuse_above": 0.0}
    diff, scale = _errors(a, ref) if a.size else (0.0, 0.0)
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    tolerance = max(atol + rtol * scale, NOISE_OK * noise)
    refuse_above = BORDERLINE * tolerance
    status = OK if diff <= tolerance else BORDERLINE_STATUS if diff <= refuse_above else DIVERGES
    return {"max_abs_diff": diff, "max_rel_diff": rel, "ok": status == OK, "status": status, "scale": scale,
            "tolerance": tolerance, "refuse_above": refuse_above}


def nudged(feeds: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """``feeds`` with every float value moved by one float32 rounding (relative ``INPUT_ROUNDING``,
    random sign); other inputs unchanged."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for k, v in feeds.items():
        v = np.asarray(v)
        if v.dtype.kind == "f":
            sign = rng.choice(np.array([-1.0, 1.0]), size=v.shape)
            v = (v.astype(np.float64) * (1.0 + sign * INPUT_ROUNDING)).astype(v.dtype)
        out[k] = v
    return out


def _noise(a: Any, b: Any) -> float:
    """Max difference of two runs of one tensor (float: absolute; integer: any mismatch)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not a.size:
        return 0.0
    if a.dtype.kind == "f":
        return _errors(a, b)[0]
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def noise_floor(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                session=None, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Per graph output, the model's own float32 noise (see the module docstring): ``{name:
    {"ort_optimizations", "input_rounding"}}``, absolute; None where ONNX Runtime could not run it."""
    names = list(ref)
    out: dict[str, dict[str, float | None]] = {n: {"ort_optimizations": None, "input_rounding": None} for n in names}
    try:
        plain = ort_session(model, optimize=False).run(None, dict(feeds))
        for n, v in zip(names, plain):
            out[n]["ort_optimizations"] = _noise(v, ref[n])
    except Exception:  # noqa: BLE001 - no optimization-free run: the other source still measures
        pass
    try:
        moved = (session or ort_session(model)).run(None, nudged(feeds, seed))
        for n, v in zip(names, moved):
            out[n]["input_rounding"] = _noise(v, ref[n])
    except Exception:  # noqa: BLE001
        pass
    return out


def check_bridge(model: onnx.ModelProto | str | os.PathLike, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, *, train_bn: bool = False) -> dict[str, Any]:
    """Run the bridge and ONNX Runtime on the same random inputs and compare every output with a
    tolerance fitted to the model's float32 noise (module docstring); ``rtol``/``atol`` are its floor.

    Returns ``{"status": "ok"|"borderline"|"diverges", "ok" (not diverging), "max_abs_diff",
    "max_rel_diff", "noise_floor_rel", "tolerance_rel", "refuse_above_rel", "worst_output",
    "first_diverging_node", "first_diverging_op", "outputs": [...], "inputs": {name: shape}}``; the
    ``*_rel`` figures are those of the worst output (largest difference over tolerance), relative to
    its largest reference value. Each output: ``{"name", "shape", "max_abs_diff", "max_rel_diff",
    "scale", "noise_floor", "noise_sources": {"ort_optimizations", "input_rounding"}, "tolerance",
    "refuse_above", "status", "ok"}`` (absolute figures). ``model`` may be a file path.
    """
    if not isinstance(model, onnx.ModelProto):
        model = load_for_check(model)
    module = OnnxModule(model, train_bn=train_bn).eval()
    feeds = random_inputs(model, input_shapes, seed)
    session = ort_session(model)
    ref = dict(zip([o.name for o in model.graph.output], session.run(None, feeds)))
    report: dict[str, Any] = {"status": OK, "ok": True, "max_abs_diff": 0.0, "max_rel_diff": 0.0,
                              "noise_floor_rel": 0.0, "tolerance_rel": None, "refuse_above_rel": None,
                              "worst_output": None, "first_diverging_node": None, "first_diverging_op": None,
                              "outputs": [], "inputs": {k: list(v.shape) for k, v in feeds.items()}}
    try:
        with torch.no_grad():
            ours = module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    except BridgeRuntimeError as exc:
        report.update(status=DIVERGES, ok=False, max_abs_diff=float("inf"), max_rel_diff=float("inf"),
                      first_diverging_node=exc.node, first_diverging_op=exc.op_type, error=str(exc))
        return report
    noise = noise_floor(model, feeds, ref, session, seed)
    rank = {OK: 0, BORDERLINE_STATUS: 1, DIVERGES: 2}
    worst = -1.0
    for name in module.output_names:
        sources = noise[name]
        floor = max([v for v in sources.values() if v is not None], default=0.0)
        c = compare(ours[name], ref[name], rtol, atol, floor)
        entry = {"name": name, "shape": list(np.shape(ref[name])), **c, "noise_floor": floor, "noise_sources": sources}
        entry["ok"] = c["status"] != DIVERGES
        report["outputs"].append(entry)
        report["max_abs_diff"] = max(report["max_abs_diff"], c["max_abs_diff"])
        report["max_rel_diff"] = max(report["max_rel_diff"], c["max_rel_diff"])
        if rank[c["status"]] > rank[report["status"]]:
            report["status"] = c["status"]
        tol = c.get("tolerance") or 0.0
        ratio = c["max_abs_diff"] / tol if tol > 0 else (0.0 if c["max_abs_diff"] == 0 else float("inf"))
        if ratio > worst:
            worst = ratio
            scale = c.get("scale") or 1.0
            report.update(worst_output=name, noise_floor_rel=floor / scale,
                          tolerance_rel=c.get("tolerance", 0.0) / scale, refuse_above_rel=c.get("refuse_above", 0.0) / scale)
    report["ok"] = report["status"] != DIVERGES
    if not report["ok"]:
        node = first_diverging_node(model, module, feeds, rtol, atol, seed)
        if node is not None:
            report.update(first_diverging_node=node["node"], first_diverging_op=node["op"],
                          node_max_rel_diff=node["max_rel_diff"], node_tolerance_rel=node["tolerance_rel"])
    return report


def first_diverging_node(model: onnx.ModelProto, module: OnnxModule, feeds: Mapping[str, np.ndarray],
                         rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0) -> dict[str, Any] | None:
    """The first node (topological order) whose outputs diverge between the bridge and ONNX Runtime
    with every intermediate exposed, each tensor against its own input-rounding noise:
    ``{"node", "op", "output", "max_abs_diff", "max_rel_diff", "tolerance_rel"}``."""
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
        session = ort_session(exposed, optimize=False)
        ref = dict(zip(names, session.run(None, dict(feeds))))
        moved = dict(zip(names, session.run(None, nudged(feeds, seed))))
    except Exception:  # noqa: BLE001 - ONNX Runtime refused the exposed copy: no culprit can be named
        return None
    with torch.no_grad():
        ours = module.run({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}, keep_all=True)
    for n in module.nodes:
        for o in n.outputs:
            if o and o in ref and o in ours:
                c = compare(ours[o], ref[o], rtol, atol, _noise(moved[o], ref[o]))
                if c["status"] == DIVERGES:
                    scale = c.get("scale") or 1.0
                    return {"node": n.name, "op": n.op_type, "output": o, "max_abs_diff": c["max_abs_diff"],
                            "max_rel_diff": c["max_rel_diff"], "tolerance_rel": c.get("tolerance", 0.0) / scale}
    return None


def divergence_message(report: Mapping[str, Any]) -> str:
    """One line saying where and by how much the bridge differs from ONNX Runtime."""
    if report.get("error"):
        return report["error"]
    if report.get("first_diverging_node"):
        return (f"bridge output differs from ONNX Runtime at node {report['first_diverging_node']} "
                f"(op {report['first_diverging_op']}): max rel diff {report['node_max_rel_diff']:.3g} "
                f"(tolerance {report['node_tolerance_rel']:.3g}; refused beyond {BORDERLINE:g}x it)")
    return (f"bridge output differs from ONNX Runtime: max rel diff {report['max_rel_diff']:.3g} on output "
            f"{report['worst_output']}, beyond {report['refuse_above_rel']:.3g} ({BORDERLINE:g}x the tolerance "
            f"{report['tolerance_rel']:.3g}, {NOISE_OK:g}x the model's float32 noise floor {report['noise_floor_rel']:.3g}); "
            "no single node diverges on its own")


def borderline_message(report: Mapping[str, Any]) -> str:
    """One line for a borderline check: the figures, and that training proceeds."""
    o = next((o for o in report["outputs"] if o["name"] == report["worst_output"]), report["outputs"][0])
    return (f"the bridge differs from ONNX Runtime on output {o['name']} by max rel diff {o['max_rel_diff']:.3g}, "
            f"above the tolerance {report['tolerance_rel']:.3g} ({NOISE_OK:g}x the model's float32 noise floor "
            f"{report['noise_floor_rel']:.3g}, at least rtol) but within {BORDERLINE:g}x it: proceeding")


def assert_bridge_faithful(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                           rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """:func:`check_bridge`, raising :class:`OnnxPruneError` naming the first diverging node when the
    bridge diverges from ONNX Runtime, warning (:class:`BridgeToleranceWarning`) when it is
    borderline. Call it before any training; returns the report unless it diverges."""
    report = check_bridge(model, input_shapes, rtol, atol, seed, **kwargs)
    if not report["ok"]:
        raise OnnxPruneError(divergence_message(report))
    if report["status"] == BORDERLINE_STATUS:
        warnings.warn(borderline_message(report), BridgeToleranceWarning, stacklevel=2)
    return report


def load_for_check(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model file as ``finetune`` does (no normalization: the check covers the exact graph
    that is trained and written back)."""

    return load_model(Path(path))
