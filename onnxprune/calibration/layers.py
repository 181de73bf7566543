"""The linear layers calibration re-fits, seen as ``Y = X @ M.T + b`` over sampled rows.

One small rule per op type maps a node to (weight matrix ``M`` [out, d], rows of ``X`` [n, d] and
of ``Y`` [n, out]):

- ``Conv`` (group 1, 1-D or 2-D, explicit pads): ``d = Cin * prod(kernel)``; a row is the input patch
  under one output position (im2col at sampled positions only, so memory stays bounded).
- ``Gemm`` (``transA`` 0, ``alpha`` 1): ``d = K``; a row is one sample.
- ``MatMul`` ``x @ W`` with a 2-D constant ``W``: ``d = K``; a row is one position of ``x[..., K]``.

Column ``j`` of ``M`` reads input channel :meth:`Layer.channel_of_column` ``(j)``: the index along the
weight's input axis, which is what channel-pruning members name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..core.graph import GraphView, attr


@dataclass(frozen=True)
class Layer:
    """One re-fittable linear node."""

    node: str
    op_type: str
    x: str  # input activation
    y: str  # output activation
    weight: str
    bias: str | None  # bias initializer (Conv input 2, Gemm C), None when absent
    in_axis: int  # weight axis of the input channels
    out_axis: int  # weight axis of the output channels
    kernel: tuple[int, ...] = ()  # Conv spatial kernel (empty otherwise)
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    dilations: tuple[int, ...] = ()
    beta: float = 1.0  # Gemm: C is scaled by beta

    @property
    def taps(self) -> int:
        """Matrix columns per input channel (kernel positions of a Conv, 1 otherwise)."""
        return math.prod(self.kernel) if self.kernel else 1

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as ``M`` [out, d] (float64)."""
        w = np.asarray(w, dtype=np.float64)
        if self.op_type == "Conv":
            return w.reshape(w.shape[0], -1)
        return w if self.out_axis == 0 else w.T

    def weight_from(self, m: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Inverse of :meth:`matrix` for a weight of ``shape``."""
        if self.op_type == "Conv":
            return m.reshape(shape).astype(dtype)
        return (m if self.out_axis == 0 else m.T).reshape(shape).astype(dtype)

    def columns(self, channels: np.ndarray) -> np.ndarray:
        """Matrix columns of the given input channels (in order)."""
        t = self.taps
        channels = np.asarray(channels, dtype=np.int64)
        return (channels[:, None] * t + np.arange(t)[None, :]).reshape(-1)

    def rows(self, x: np.ndarray, y: np.ndarray | None, per_sample: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """(X rows, Y rows) at up to ``per_sample`` random output positions of each sample of a batch
        (Y rows None when ``y`` is: the caller computes them from the weights)."""
        if self.op_type == "Conv":
            return _conv_rows(self, x, y, per_sample, rng)
        k = x.shape[-1]
        xs = x.reshape(x.shape[0], -1, k)
        pos = _positions(xs.shape[1], per_sample, xs.shape[0], rng)
        b = np.arange(xs.shape[0])[:, None]
        if y is None:
            return xs[b, pos].reshape(-1, k), None
        ys = y.reshape(y.shape[0], -1, y.shape[-1])
        return xs[b, pos].reshape(-1, k), ys[b, pos].reshape(-1, ys.shape[-1])


def dense_affine(layers: list[Layer], view: GraphView) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer node, its dense ``M`` [out, d] and bias in float32: collecting computes the layers'
    output rows from these instead of exposing their outputs."""
    out = {}
    for l in layers:
        m = l.matrix(view.const(l.weight)).astype(np.float32)
        b = np.zeros(m.shape[0], np.float32) if l.bias is None else \
            (np.asarray(view.const(l.bias), np.float64).reshape(-1) * l.beta).astype(np.float32)
        out[l.node] = (m, b)
    return out


def _positions(total: int, per_sample: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, p] distinct positions in ``range(total)`` per sample (all of them when few)."""
    if per_sample >= total:
        return np.broadcast_to(np.arange(total), (batch, total))
    return np.argsort(rng.random((batch, total)), axis=1)[:, :per_sample]


def _conv_rows(layer: Layer, x: np.ndarray, y: np.ndarray | None, per_sample: int, rng
               ) -> tuple[np.ndarray, np.ndarray | None]:
    nd = len(layer.kernel)
    if nd == 1:  # 1-D conv as 2-D with height 1
        x, y = x[:, :, None, :], (None if y is None else y[:, :, None, :])
        kh, kw = 1, layer.kernel[0]
        sh, sw = 1, layer.strides[0]
        dh, dw = 1, layer.dilations[0]
        ph0, pw0, ph1, pw1 = 0, layer.pads[0], 0, layer.pads[1]
    else:
        kh, kw = layer.kernel
        sh, sw = layer.strides
        dh, dw = layer.dilations
        ph0, pw0, ph1, pw1 = layer.pads
    b, c = x.shape[:2]
    ho = (x.shape[2] + ph0 + ph1 - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + pw0 + pw1 - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1))) if (ph0 or pw0 or ph1 or pw1) else x
    pos = _positions(ho * wo, per_sample, b, rng)  # [b, p]
    oy, ox = pos // wo, pos % wo
    iy = oy[..., None] * sh + np.arange(kh) * dh  # [b, p, kh]
    ix = ox[..., None] * sw + np.arange(kw) * dw  # [b, p, kw]
    bi = np.arange(b)[:, None, None, None]
    # xp[b, :, iy, ix] -> [b, p, kh, kw, c] (advanced indices first), then channel-major columns
    patches = xp.transpose(0, 2, 3, 1)[bi, iy[..., :, None], ix[..., None, :]]
    xr = patches.transpose(0, 1, 4, 2, 3).reshape(-1, c * kh * kw)
    if y is None:
        return xr, None
    yr = y.transpose(0, 2, 3, 1).reshape(b, ho * wo, -1)[np.arange(b)[:, None], pos].reshape(-1, y.shape[1])
    return xr, yr


def layer_of(node: onnx.NodeProto, view: GraphView) -> tuple[Layer | None, str | None]:
    """The :class:`Layer` of ``node``, or (None, why it cannot be re-fitted)."""
    op = node.op_type
    if op not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or not view.is_const(node.input[1]):
        return None, f"{op} without a constant weight as input 1"
    w, x, y = node.input[1], node.input[0], node.output[0]
    wshape = tuple(view.initializers[w].dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and not view.is_const(bias):
        return None, "its bias is not a constant"
    if op == "Conv":
        if attr(node, "group", 1) != 1:
            return None, "grouped Conv (its channels are re-fitted through the next layer)"
        k = tuple(wshape[2:])
        if len(k) not in (1, 2):
            return None, f"{len(k)}-D Conv"
        auto = attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "VALID"):
            return None, f"Conv auto_pad={auto}"
        pads = tuple(attr(node, "pads", None) or [0] * (2 * len(k)))
        return Layer(node.name, op, x, y, w, bias, 1, 0, k, tuple(attr(node, "strides", None) or [1] * len(k)),
                     pads, tuple(attr(node, "dilations", None) or [1] * len(k))), None
    if op == "Gemm":
        if attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0:
            return None, "Gemm with transA or alpha != 1"
        beta = float(attr(node, "beta", 1.0))
        if bias is not None and (beta == 0 or math.prod(view.initializers[bias].dims) != wshape[0 if attr(node, "transB", 0) else 1]):
            return None, "Gemm whose C is not one bias per output"
        tb = bool(attr(node, "transB", 0))
        return Layer(node.name, op, x, y, w, bias, 1 if tb else 0, 0 if tb else 1, beta=beta), None
    if len(wshape) != 2 or view.is_const(x):
        return None, "MatMul whose constant is not a 2-D right operand"
    return Layer(node.name, op, x, y, w, None, 0, 1), None
