"""Calibration inputs: ONE function, so the source of unlabeled data can be switched in one place.

Specs go through ``onnxprune.datasets.load_inputs`` (unlabeled or labeled specs, labels dropped, one
array per model input), reading the *train* split unless the spec says ``?split=val|test|all``: the
splits a pruned model is scored on are never calibrated on by default. Arrays (or a dict of arrays
per input name) are taken as they are.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx

from ..datasets import load_inputs
from ..core.errors import OnnxPruneError
from ..core.shapes import graph_inputs
from ..datasets.spec import selected_split


#: the split calibration reads from a data spec unless ``?split=`` says otherwise
DEFAULT_SPLIT = "train"


def calibration_split(spec: Any) -> str | None:
    """The split :func:`calibration_inputs` reads from ``spec`` (None for arrays given directly)."""

    if isinstance(spec, np.ndarray) or (isinstance(spec, Mapping) and spec and "spec" not in spec
                                        and all(isinstance(v, np.ndarray) for v in spec.values())):
        return None
    return selected_split(spec, DEFAULT_SPLIT)[1]


def calibration_inputs(spec: Any, model: onnx.ModelProto, n: int | None, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Up to ``n`` samples per real input of ``model``, as ``{input name: array}`` (batch first, in
    the input's dtype). ``spec``: a data spec string (its train split, or ``?split=``), loaded
    DatasetSplits (train split too), an array, or a dict of arrays by input name."""
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    if isinstance(spec, np.ndarray):
        if len(names) != 1:
            raise OnnxPruneError(f"calibration data: the model has {len(names)} inputs ({', '.join(names)}); pass one "
                                 "array per input name")
        arrays = {names[0]: spec}
    elif isinstance(spec, Mapping) and all(isinstance(v, np.ndarray) for v in spec.values()) and spec:
        arrays = dict(spec)
    else:
        arrays = load_inputs(spec, model, n, seed=seed, split=calibration_split(spec) or DEFAULT_SPLIT)
    missing = [k for k in names if k not in arrays]
    if missing:
        raise OnnxPruneError(f"calibration data has no array for input(s) {', '.join(missing)} (has {', '.join(arrays)})")
    lengths = {len(arrays[k]) for k in names}
    if len(lengths) != 1 or 0 in lengths:
        raise OnnxPruneError(f"calibration data: inputs need the same, non-zero number of samples; got "
                             f"{ {k: len(arrays[k]) for k in names} }")
    count = lengths.pop()
    take = np.arange(count) if n is None or n >= count else np.sort(np.random.default_rng(seed).permutation(count)[:n])
    out = {}
    for vi in inputs:
        a = np.asarray(arrays[vi.name])[take]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if dims and (len(dims) != a.ndim or any(d and d != s for d, s in zip(dims[1:], a.shape[1:]))):
            raise OnnxPruneError(f"calibration data for input {vi.name!r} has samples of shape {list(a.shape[1:])}; "
                                 f"the model expects {['?' if d is None else d for d in dims[1:]]}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise OnnxPruneError(f"calibration data for input {vi.name!r}: {int((~np.isfinite(a)).sum())} values are "
                                 "NaN or infinite")
        out[vi.name] = np.ascontiguousarray(a.astype(dtype, copy=False))
    return out
