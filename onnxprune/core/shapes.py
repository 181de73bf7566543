"""Input-shape overrides and shape inference.

Analyses need channel counts (usually static even in dynamic models); MACs and rewrites need
concrete spatial sizes. ``--input-shape NAME=1x3x224x224`` fixes symbolic dimensions where a figure
needs them, without otherwise touching the model.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import onnx

from .errors import OnnxPruneError

Dim = int | str | None
Shape = tuple[Dim, ...]

_SHAPE_RE = re.compile(r"^(?P<name>[^=]+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (``x`` or ``,`` separated) into ``(name, dims)``."""
    m = _SHAPE_RE.match(spec.strip())
    if not m:
        raise OnnxPruneError(f"bad --input-shape {spec!r}: expected NAME=DIMS such as input=1x3x224x224")
    dims = tuple(int(d) for d in re.split(r"[x,]", m.group("dims")))
    if any(d <= 0 for d in dims):
        raise OnnxPruneError(f"bad --input-shape {spec!r}: dimensions must be positive")
    return m.group("name"), dims


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse several ``--input-shape`` values into a dict."""
    return dict(parse_input_shape(s) for s in specs)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _value_infos(graph: onnx.GraphProto):
    """Every declared value of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    yield from graph.input
    yield from graph.output
    yield from graph.value_info
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                yield from _value_infos(g)


def symbolize_negative_dims(model: onnx.ModelProto) -> int:
    """(In place.) Declared dims with a negative ``dim_value`` (``-1`` batch: older Paddle exports)
    become symbolic (``dim_param``), as they mean; returns how many. Left negative, every consumer
    that takes ``dim_value`` for a size (constant folding, MACs, ``--input-shape``) breaks."""
    n = 0
    for vi in _value_infos(model.graph):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = f"{vi.name}_dim{i}"  # (setting the oneof's other field clears dim_value)
                n += 1
    return n


def declares_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """True when every named input already has exactly these static dims (fixing them would copy
    the whole model, weights included, for nothing)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in shapes.items():
        tt = inputs[name].type.tensor_type if name in inputs else None
        if tt is None or not tt.HasField("shape") or len(tt.shape.dim) != len(dims):
            return False
        if any(not d.HasField("dim_value") or d.dim_value != v for d, v in zip(tt.shape.dim, dims)):
            return False
    return True


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose named inputs have the given concrete shapes.

    Names that are not inputs and ranks that disagree with the model are errors, not silently ignored.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {i.name: i for i in graph_inputs(out)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise OnnxPruneError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        tt = inputs[name].type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) not in (0, len(dims)):
            raise OnnxPruneError(f"--input-shape {name}: model input has rank {len(tt.shape.dim)}, got {len(dims)} dims")
        old = list(tt.shape.dim) if tt.HasField("shape") else []
        for i, (d_old, d_new) in enumerate(zip(old, dims)):
            if d_old.HasField("dim_value") and d_old.dim_value >= 0 and d_old.dim_value != d_new:
                raise OnnxPruneError(f"--input-shape {name}: dimension {i} is fixed to {d_old.dim_value} in the model, got {d_new}")
        tt.shape.Clear()
        for d in dims:
            tt.shape.dim.add().dim_value = d
    return out


#: Initializers larger than this are replaced by typed inputs during shape inference: inference
#: needs their shapes, not their values, and serializing 100 MB of weights dominates its cost.
_SKELETON_MIN_ELEMENTS = 256


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without large weight data (shapes kept as typed graph inputs)."""
    g = model.graph
    light = onnx.ModelProto()
    for fld in ("ir_version", "opset_import", "producer_name", "producer_version", "domain", "model_version", "functions"):
        if fld in ("opset_import", "functions"):
            getattr(light, fld).extend(getattr(model, fld))
        else:
            setattr(light, fld, getattr(model, fld))
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(_declarations_to_keep(g))
    declared = {i.name for i in g.input}
    for init in g.initializer:
        n = 1
        for d in init.dims:
            n *= d
        small = n < _SKELETON_MIN_ELEMENTS or init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
        if small and init.data_location != onnx.TensorProto.EXTERNAL:  # external data would be read from the cwd
            lg.initializer.append(init)
        elif init.name not in declared:  # (= make_tensor_value_info(name, type, dims), built in place: faster)
            vi = lg.input.add()
            vi.name = init.name
            tt = vi.type.tensor_type
            tt.elem_type = init.data_type
            shape_dims = tt.shape.dim
            for d in init.dims:
                shape_dims.add().dim_value = d
    for sp in g.sparse_initializer:  # --sparse-storage weights: only their shape matters here
        if sp.values.name not in declared:
            lg.input.append(onnx.helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    light.ir_version = max(light.ir_version, 4)
    return light


def _declarations_to_keep(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The intermediate declarations inference should start from: only those of outputs of ops in
    other domains (which ONNX cannot infer). ONNX keeps a declared dim over the one it infers, so an
    exporter's (or an earlier inference's) ``unk__3`` batch would stay unknown after
    ``--input-shape`` fixed the inputs and hide every size computed from it (a head split's run-time
    target, a MatMul's MACs); default-domain outputs are re-derived from the inputs instead."""
    custom = {o for n in graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    if not custom:
        return []
    return [vi for vi in graph.value_info if vi.name in custom]


def infer_shapes(model: onnx.ModelProto, *, inplace: bool = False, strict: bool = False) -> onnx.ModelProto:
    """ONNX shape inference with data propagation (resolves Shape->Reshape chains).

    Runs on a weight-free skeleton (fast, and never hits protobuf's 2 GB limit), then copies the
    inferred value_info onto the full model (a copy, or ``model`` itself with ``inplace``).
    ``strict`` turns inference errors and type mismatches into errors instead of missing shapes.
    """
    inferred = _inferskeleton(model, strict)
    out = model
    if not inplace:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def infer_value_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes of every tensor, inferred without copying the model's weights."""
    inferred = _inferskeleton(model, False)
    shapes = value_shapes(inferred)
    shapes.update({i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer})
    return shapes


def _inferskeleton(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(skeleton(model), check_type=strict, strict_mode=strict, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise OnnxPruneError(f"shape inference failed: {str(exc).splitlines()[0][:300]}") from exc


def symbolic_value_shapes(model: onnx.ModelProto) -> dict[str, Shape] | None:
    """Shapes of every tensor by ONNX Runtime's symbolic shape inference (sympy over the symbolic
    dims), or None when it fails. It solves what ONNX's data propagation leaves unknown with
    symbolic inputs: a ``-1`` in a run-time target (``view(b, s, -1, dh)``), broadcasts of equal
    symbols, rotary embeddings' run-time ranges. Runs on a weight-free copy."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # lazy: imports sympy (seconds)
    except ImportError:  # an ONNX Runtime without its tools
        return None
    light = skeleton(model)
    del light.graph.value_info[:]
    try:
        out = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - any failure: the ONNX shapes stand
        return None
    return None if out is None else value_shapes(out)


def _shape_of(vi: onnx.ValueInfoProto) -> Shape | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def value_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Map every tensor name with a known shape to it (ints, symbolic names, or None per dim).

    Expects a model that already went through :func:`infer_shapes`.
    """
    g = model.graph
    shapes: dict[str, Shape] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _shape_of(vi)
        if s is not None:
            shapes[vi.name] = s
    for init in g.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def value_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Map tensor names to ONNX element types (``onnx.TensorProto.FLOAT`` ...)."""
    g = model.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)
           if vi.type.HasField("tensor_type")}
    out.update({i.name: i.data_type for i in g.initializer})
    return out


def is_static(shape: Shape | None) -> bool:
    """True when every dimension is a known integer."""
    return shape is not None and all(isinstance(d, int) for d in shape)


def format_shape(shape: Shape | None) -> list[Dim] | None:
    """JSON-friendly shape (symbolic dims stay strings, unknown ones become null)."""
    return None if shape is None else list(shape)
