"""One entry point from a file path to an analysable graph: load -> normalize -> fix shapes -> index.

Every command starts here, so they all see the same canonical graph and make the same
assumptions about symbolic dimensions (stated in ``notes``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import onnx

from .errors import OnnxPruneError
from .graph import GraphView, build_view
from .model_io import load_model, without_initializers
from .normalize import normalize
from .shapes import declares_shapes, fix_input_shapes, graph_inputs


@dataclass
class Prepared:
    """A normalized model, its index with concrete shapes where possible, and what was assumed."""

    path: Path | None
    original: onnx.ModelProto  # as given; for a file (or with consume) its graph without weights (in ``model``)
    model: onnx.ModelProto  # normalized, input shapes as in the file (dynamic dims kept)
    view: GraphView  # with input shapes fixed (over a copy, or over ``model`` when they already are)
    concrete_shapes: dict[str, tuple[int, ...]]
    notes: list[str] = field(default_factory=list)


def resolve_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]] | None) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete shapes for every input: overrides first; a symbolic dim named like one an override
    fixes takes its value; a symbolic leading (batch) dim becomes 1; other symbolic dims stay
    unresolved and are reported in the notes."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    unknown = sorted(set(overrides) - {i.name for i in inputs})
    if unknown:
        raise OnnxPruneError(f"--input-shape names {', '.join(map(repr, unknown))}, but the model's inputs are "
                             f"{[i.name for i in inputs]}")
    shapes, notes = {}, []
    bound = _bound_symbols(inputs, overrides)
    for inp in inputs:
        if inp.name in overrides:
            shapes[inp.name] = tuple(overrides[inp.name])
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("shape"):
            notes.append(f"input {inp.name!r} has no declared shape; pass --input-shape {inp.name}=DIMS for MACs")
            continue
        dims, unresolved = [], []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            elif d.dim_param in bound:
                dims.append(bound[d.dim_param])
            elif i == 0:
                dims.append(1)
                notes.append(f"input {inp.name!r}: symbolic batch dimension {d.dim_param or '?'!r} taken as 1")
            else:
                unresolved.append(d.dim_param or f"dim{i}")
        if unresolved:
            notes.append(f"input {inp.name!r} has symbolic dims {unresolved}; pass --input-shape {inp.name}=DIMS for exact MACs")
        else:
            shapes[inp.name] = tuple(dims)
    return shapes, notes


def _bound_symbols(inputs, overrides: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dim names fixed by ``--input-shape``: exporters name a dim the same on every input
    that shares it (``batch``, ``sequence``; dynamo's ``s0``), so fixing ``input_ids`` fixes the
    ``attention_mask`` and ``token_type_ids`` dims of that name too (the first value given wins)."""
    bound: dict[str, int] = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim if inp.type.tensor_type.HasField("shape") else []
        given = overrides.get(inp.name)
        if given is None or len(given) != len(dims):
            continue
        for d, v in zip(dims, given):
            if d.dim_param and not d.HasField("dim_value"):
                bound.setdefault(d.dim_param, int(v))
    return bound


def prepare(source: str | os.PathLike | onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
            *, fold_bn: bool = False, consume: bool = False) -> Prepared:
    """Load (when given a path), normalize and index a model.

    A model loaded here (or handed over with ``consume``) is normalized in place, and one whose
    input shapes are already concrete is indexed as is: each copy would hold all the weights again
    (gigabytes for a large model). ``original`` then keeps the input's graph without its weights.
    """
    path = None
    if isinstance(source, onnx.ModelProto) and not consume:
        original = source
        model = normalize(original, fold_bn=fold_bn)
    else:
        if isinstance(source, onnx.ModelProto):
            loaded = source
        else:
            path = Path(source)
            loaded = load_model(path)
        original = without_initializers(loaded)
        model = normalize(loaded, fold_bn=fold_bn, inplace=True)
    shapes, notes = resolve_input_shapes(model, input_shapes)
    if declares_shapes(model, shapes):
        view = build_view(model, infer=False)  # normalize has just inferred its shapes
    else:
        view = build_view(fix_input_shapes(model, shapes), inplace=True)
    return Prepared(path=path, original=original, model=model, view=view, concrete_shapes=shapes, notes=notes)
