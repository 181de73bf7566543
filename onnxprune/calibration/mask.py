"""Attention masks: which model input marks padding tokens, so that padded rows count in no statistic.

Padding positions carry hidden states the model never uses (masked pooling, masked attention); on
short sentences padded to a common length they are most of the rows, and a fit that matches them
is a fit of the wrong thing.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
from ..core.shapes import graph_inputs

_INT = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
        onnx.TensorProto.BOOL, onnx.TensorProto.INT16)


def _is_01(a: np.ndarray) -> bool:
    return a.ndim == 2 and bool(np.isin(np.unique(a), (0, 1)).all())


def mask_input(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], name: str | None = None, *,
               option: str = "--calibration-mask") -> str | None:
    """The input holding a 0/1 attention mask: ``name`` when given (checked; errors name ``option``),
    else an integer input of rank 2 named like ``*attention_mask*`` or ``*mask*`` whose data are 0/1
    (None when there is none)."""
    ins = {vi.name: vi for vi in graph_inputs(model)}
    if name is not None:
        if name not in ins:
            raise OnnxPruneError(f"{option} {name}: the model has no input {name!r} (inputs: {', '.join(ins)})")
        if name not in inputs or not _is_01(np.asarray(inputs[name])):
            raise OnnxPruneError(f"{option} {name}: the data for it must be a [batch, seq] array of 0/1 (1 = token, 0 = padding)")
        return name
    cands = [n for n, vi in ins.items() if "mask" in n.lower() and vi.type.tensor_type.elem_type in _INT
             and len(vi.type.tensor_type.shape.dim) == 2 and n in inputs and _is_01(np.asarray(inputs[n]))]
    cands.sort(key=lambda n: "attention_mask" not in n.lower())
    return cands[0] if cands else None
