"""Quantized weights of a QDQ model: ``DequantizeLinear(int8 initializer, scale, zero_point)``.

In a QDQ model (``onnxprune quantize``, ONNX Runtime's ``quantize_static`` with ``QuantFormat.QDQ``)
a Conv/Gemm/MatMul reads its weight and bias as the output of a DequantizeLinear of an integer
initializer. The analysis treats that output as the constant it stands for (its dequantized values:
the same criterion as on the float model); the rewriter slices the integer initializer and, when
the quantization is per channel along the cut axis, its scale and zero point with it. A bias
quantized to int32 with ``scale = input_scale * weight_scale[c]`` is sliced the same way, so every
kept channel keeps its own scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..core.graph import attr


@dataclass(frozen=True)
class QuantizedWeight:
    """One ``DequantizeLinear`` of a constant integer tensor ``x`` (output ``name``)."""

    name: str  # the DequantizeLinear output: the float weight the consumer reads
    node: str
    x: str  # the integer initializer
    scale: str
    zero_point: str  # "" when absent
    axis: int | None  # the per-channel axis of ``x`` (non-negative); None when per tensor

    def params_on(self, axis: int) -> list[str]:
        """The scale/zero point sliced with ``x`` when cutting ``axis`` (per channel on that axis)."""
        if self.axis != axis:
            return []
        return [self.scale] + ([self.zero_point] if self.zero_point else [])


def quantized_weights(graph: onnx.GraphProto) -> dict[str, QuantizedWeight]:
    """DequantizeLinear outputs computed from initializers only, by output name (default domain).
    Blocked quantization (``block_size``, opset 21) is left out: its weights are not constants here,
    so their channels stay whole with that reason."""
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, QuantizedWeight] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        ins = list(node.input) + [""] * (3 - len(node.input))
        x, scale, zp = ins[:3]
        if x not in inits or scale not in inits or (zp and zp not in inits) or int(attr(node, "block_size", 0)):
            continue
        rank, s_size = len(inits[x].dims), int(np.prod(inits[scale].dims, dtype=np.int64))
        axis = None
        if len(inits[scale].dims) >= 1 and s_size > 1:
            a = int(attr(node, "axis", 1))
            axis = a + rank if a < 0 else a
        out[node.output[0]] = QuantizedWeight(node.output[0], node.name, x, scale, zp, axis)
    return out


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None) -> np.ndarray:
    """``(x - zero_point) * scale`` as DequantizeLinear computes it (per tensor or per ``axis``)."""
    s = np.asarray(scale, dtype=np.float64)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return ((x.astype(np.float64) - z) * s).astype(np.asarray(scale).dtype)


def dequantized_value(q: QuantizedWeight, const) -> np.ndarray:
    """The float weight ``q`` stands for; ``const``: initializer name -> array."""
    zp = const(q.zero_point) if q.zero_point else None
    return dequantize(const(q.x), const(q.scale), zp, q.axis)


def dequantizing_reader(graph: onnx.GraphProto, const):
    """``const`` (initializer name -> array or None) that also answers DequantizeLinear outputs of
    initializers with their dequantized values (cached): what importance criteria read in a QDQ model."""
    weights = quantized_weights(graph)
    cache: dict[str, np.ndarray] = {}

    def read(name: str) -> np.ndarray | None:
        q = weights.get(name)
        if q is None:
            return const(name)
        if name not in cache:
            cache[name] = dequantized_value(q, const)
        return cache[name]
    return read
