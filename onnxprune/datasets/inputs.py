"""Data bound to a model's inputs: one checked array per graph input, in the input's dtype.

The data decide symbolic dimensions (batch, image size, sequence length): a model with
``N x 3 x H x W`` inputs needs no ``--input-shape`` when data are given. Fixed dimensions must
match; a mismatch, a dtype that does not fit (floats for an integer input), a missing per-input
array, all come back as one line naming the data (its file) and the expected shape.

numpy + onnx only (no torch, no onnxruntime): calibration on an edge box uses :func:`load_inputs`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
from .core import load_dataset
from .types import DatasetSplits, first_array, Split
from ..core.shapes import graph_inputs
from .spec import parse_spec, selected_split
from .unlabeled import load_images

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
       onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_}


@dataclass(frozen=True)
class ModelInput:
    """A graph input: name, numpy dtype, dims (int when fixed, the symbol or None otherwise)."""

    name: str
    dtype: Any
    dims: tuple[Any, ...] | None

    def expected(self) -> str:
        if self.dims is None:
            return "any shape"
        return "[" + ", ".join(str(d) if d is not None else "?" for d in self.dims) + "]"


def model_inputs(model: "onnx.ModelProto | str | os.PathLike") -> list[ModelInput]:
    """The model's real inputs (initializers excluded), as :class:`ModelInput`."""

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    out = []
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        if tt.elem_type not in _NP:
            raise OnnxPruneError(f"input {vi.name!r}: element type {onnx.TensorProto.DataType.Name(tt.elem_type)} "
                                 "cannot be fed from data")
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                         for d in tt.shape.dim)
        out.append(ModelInput(vi.name, _NP[tt.elem_type], dims))
    return out


def bind_inputs(inputs: list[ModelInput], x: "np.ndarray | Mapping[str, np.ndarray]", source: str) -> dict[str, np.ndarray]:
    """``x`` (one array, or per-input arrays) checked against ``inputs`` -> ``{input name: array}``
    in graph-input order. ``source`` names the data in errors (e.g. ``"data 'npz:calib.npz'"``)."""
    if isinstance(x, Mapping):
        missing = [i.name for i in inputs if i.name not in x]
        if missing:
            raise OnnxPruneError(f"{source}: no array for model input(s) {', '.join(repr(m) for m in missing)} "
                                 f"(arrays: {', '.join(map(repr, x)) or 'none'}; name one array per model input, "
                                 f"expected shapes {', '.join(f'{i.name} {i.expected()}' for i in inputs)})")
        arrays = {i.name: x[i.name] for i in inputs}
    else:
        if len(inputs) != 1:
            raise OnnxPruneError(f"{source}: one array for a model with {len(inputs)} inputs "
                                 f"({', '.join(f'{i.name} {i.expected()}' for i in inputs)}); store one array per "
                                 "input, named like the input")
        arrays = {inputs[0].name: x}
    out = {i.name: _fit(i, np.asarray(arrays[i.name]), source) for i in inputs}
    lens = {k: len(v) for k, v in out.items()}
    if len(set(lens.values())) > 1:
        raise OnnxPruneError(f"{source}: per-input arrays have different sample counts {lens}")
    return out


def _fit(inp: ModelInput, a: np.ndarray, source: str) -> np.ndarray:
    label = f"{source}: array for input {inp.name!r}"
    if inp.dims is not None:
        rank = len(inp.dims)
        if a.ndim == rank + 1 and a.ndim >= 2 and a.shape[1] == 1:  # N x 1 x H x W data for an N x H x W input
            a = a[:, 0]
        elif a.ndim + 1 == rank and rank >= 2 and not (isinstance(inp.dims[1], int) and inp.dims[1] != 1):
            a = a[:, None]  # N x H x W data for an N x 1 x H x W input
        if a.ndim != rank or any(isinstance(d, int) and d != g for d, g in zip(inp.dims[1:], a.shape[1:])):
            got = "[" + ", ".join(["N", *map(str, a.shape[1:])]) + "]"
            raise OnnxPruneError(f"{label} has shape {got}, the model expects {inp.expected()} "
                                 "(N first; adjust size=/layout= in the spec or re-export the data)")
    want = np.dtype(inp.dtype)
    if a.dtype == want:
        return a
    if np.issubdtype(want, np.floating) and (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        return a.astype(want)
    if np.issubdtype(want, np.integer) and np.issubdtype(a.dtype, np.integer):
        return a.astype(want)
    if want == np.bool_ and (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
        return a.astype(want)
    raise OnnxPruneError(f"{label} is {a.dtype}, the model expects {want} of shape {inp.expected()}")


def data_input_shapes(arrays: Mapping[str, np.ndarray], batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """What ``--input-shape`` would say, from bound data (``batch`` replaces the sample count)."""
    return {k: ((batch,) if batch else (len(v),)) + tuple(v.shape[1:]) for k, v in arrays.items()}


def bind_dataset(ds: DatasetSplits, model: "onnx.ModelProto | str | os.PathLike") -> DatasetSplits:
    """``ds`` with every in-memory split's ``x`` bound to ``model``'s inputs (a dict, checked)."""


    inputs = model_inputs(model)
    source = f"data {ds.spec!r}"
    parts = {}
    for name in ("train", "val", "test"):
        s = getattr(ds, name)
        if s is not None and s.x is not None and len(s):
            parts[name] = Split(x=bind_inputs(inputs, s.x, source), y=s.y)
        else:
            parts[name] = s
    return replace(ds, **parts)


def load_inputs(spec: "str | Mapping[str, Any] | DatasetSplits", model: "onnx.ModelProto | str | os.PathLike",
                n: int | None = None, *, seed: int = 0, split: str = "all") -> dict[str, np.ndarray]:
    """Unlabeled input arrays for ``model`` from a data spec: ``{input name: array}`` (N first).

    The samples of ``split`` (``train``, ``val``, ``test`` or ``all`` of them; a ``?split=`` in the
    spec wins), or a seeded random subset of ``n``. Labels, if any, are dropped. ``images:DIR`` without ``size=`` is resized to
    the model's fixed H x W, and only ``n`` files are read.
    """
    if n is not None and n <= 0:
        raise OnnxPruneError(f"number of samples must be positive, got {n}")

    inputs = model_inputs(model)
    spec, split = selected_split(spec, split)
    ds = spec if isinstance(spec, DatasetSplits) else _load_for(spec, inputs, n, seed)
    source = f"data {ds.spec!r}"
    chunks = []
    for name in (("train", "val", "test") if split == "all" else (split,)):
        s = getattr(ds, name)
        if s is None or len(s) == 0:
            continue
        if s.x is None:  # user DataLoaders: read batches until enough
            for bx, _ in s.batches():
                chunks.append(bind_inputs(inputs, bx, source))
                if n is not None and sum(len(first_array(c)) for c in chunks) >= n:
                    break
        else:
            chunks.append(bind_inputs(inputs, s.x, source))
    if not chunks:
        raise OnnxPruneError(f"{source}: no samples" + ("" if split == "all" else f" in its {split} split"))
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    total = len(first_array(arrays))
    if n is not None and n < total:
        pick = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        arrays = {k: v[pick] for k, v in arrays.items()}
    return arrays


def _load_for(spec: Any, inputs: list[ModelInput], n: int | None, seed: int) -> DatasetSplits:
    """Load ``spec``; ``images:`` learns its size from a 4-D model input and reads only ``n`` files."""

    parsed = parse_spec(spec)
    if parsed.kind != "images":
        return load_dataset(spec, seed=seed)
    if not any(parsed.options.get(k) not in (None, "") for k in ("resize", "size")) and len(inputs) == 1:
        dims = inputs[0].dims
        layout = str(parsed.options.get("layout") or "nchw").lower()
        if dims is not None and len(dims) == 4:
            h, w = (dims[1], dims[2]) if layout == "nhwc" else (dims[2], dims[3])
            if isinstance(h, int) and isinstance(w, int):
                parsed.options["size"] = f"{h}x{w}"

    ds = load_images(parsed, parsed.preprocess(), seed, limit=n)
    ds.spec = parsed.text
    return ds
