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

    def positions(self, x_shape: tuple[int, ...], per_sample: int, rng: np.random.Generator,
                  valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sample index, output position) of up to ``per_sample`` random output positions of each
        sample of a batch whose input has ``x_shape``; ``valid`` ([batch, positions] bool) leaves
        positions out (padding tokens)."""
        return _positions(self.output_positions(x_shape), per_sample, x_shape[0], rng, valid)

    def output_positions(self, x_shape: tuple[int, ...]) -> int:
        """Rows one sample yields: output positions of a Conv, positions of ``x[..., K]`` otherwise."""
        if self.op_type == "Conv":
            return math.prod(_conv_out(self, x_shape))
        return math.prod(x_shape[1:-1])

    def rows(self, x: np.ndarray, y: np.ndarray | None, per_sample: int, rng: np.random.Generator,
             valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(X rows, Y rows) at up to ``per_sample`` random output positions of each sample of a batch
        (Y rows None when ``y`` is: the caller computes them from the weights)."""
        return self.rows_at(x, y, *self.positions(x.shape, per_sample, rng, valid))

    def rows_at(self, x: np.ndarray, y: np.ndarray | None, bi: np.ndarray, pos: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """(X rows, Y rows) at the given (sample, output position) pairs."""
        if self.op_type == "Conv":
            return _conv_rows(self, x, y, bi, pos)
        k = x.shape[-1]
        xs = x.reshape(x.shape[0], -1, k)
        if y is None:
            return xs[bi, pos], None
        ys = y.reshape(y.shape[0], -1, y.shape[-1])
        return xs[bi, pos], ys[bi, pos]

    def valid_positions(self, x_shape: tuple[int, ...], mask: np.ndarray | None) -> np.ndarray | None:
        """[batch, positions] bool of the rows that are real tokens under an attention ``mask``
        ([batch, seq], 1 = token): rows of a MatMul over ``[.., seq, K]`` (per-head ``[B, H, seq, D]``
        too) and of a 1-D Conv keeping the length; None where the layer's rows are not per token."""
        if mask is None or mask.ndim != 2 or mask.shape[0] != x_shape[0]:
            return None
        seq = mask.shape[1]
        total = self.output_positions(x_shape)
        if self.op_type == "Conv":
            ok = len(self.kernel) == 1 and total == seq
        else:
            ok = self.op_type == "MatMul" and len(x_shape) >= 3 and x_shape[-2] == seq
        return np.tile(mask != 0, (1, total // seq)) if ok else None


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


def _positions(total: int, per_sample: int, batch: int, rng: np.random.Generator,
               valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat (sample, position) pairs: ``per_sample`` distinct positions in ``range(total)`` per
    sample (all of them when few), only where ``valid`` is true when it is given."""
    if valid is None and per_sample >= total:
        return np.repeat(np.arange(batch), total), np.tile(np.arange(total), batch)
    keys = rng.random((batch, total))
    if valid is not None:
        keys = np.where(valid, keys, np.inf)
    take = min(per_sample, total)
    pos = np.argsort(keys, axis=1)[:, :take]
    bi = np.broadcast_to(np.arange(batch)[:, None], pos.shape)
    if valid is not None:
        keep = valid[bi, pos]
        return bi[keep], pos[keep]
    return bi.reshape(-1), pos.reshape(-1)


def _conv_geometry(layer: Layer):
    """(kh, kw, sh, sw, dh, dw, pads h0, w0, h1, w1) of a 1-D (as 2-D with height 1) or 2-D Conv."""
    if len(layer.kernel) == 1:
        return (1, layer.kernel[0], 1, layer.strides[0], 1, layer.dilations[0], 0, layer.pads[0], 0, layer.pads[1])
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    ph0, pw0, ph1, pw1 = layer.pads
    return kh, kw, sh, sw, dh, dw, ph0, pw0, ph1, pw1


def _conv_out(layer: Layer, x_shape: tuple[int, ...]) -> tuple[int, int]:
    kh, kw, sh, sw, dh, dw, ph0, pw0, ph1, pw1 = _conv_geometry(layer)
    h, w = (1, x_shape[2]) if len(layer.kernel) == 1 else x_shape[2:4]
    return (h + ph0 + ph1 - dh * (kh - 1) - 1) // sh + 1, (w + pw0 + pw1 - dw * (kw - 1) - 1) // sw + 1


def _conv_rows(layer: Layer, x: np.ndarray, y: np.ndarray | None, bi: np.ndarray, pos: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None]:
    if len(layer.kernel) == 1:  # 1-D conv as 2-D with height 1
        x, y = x[:, :, None, :], (None if y is None else y[:, :, None, :])
    kh, kw, sh, sw, dh, dw, ph0, pw0, ph1, pw1 = _conv_geometry(layer)
    c = x.shape[1]
    ho, wo = _conv_out(layer, (x.shape[0], c) + ((x.shape[3],) if len(layer.kernel) == 1 else x.shape[2:]))
    xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1))) if (ph0 or pw0 or ph1 or pw1) else x
    oy, ox = pos // wo, pos % wo
    iy = oy[:, None] * sh + np.arange(kh) * dh  # [r, kh]
    ix = ox[:, None] * sw + np.arange(kw) * dw  # [r, kw]
    # xp[b, :, iy, ix] -> [r, kh, kw, c] (advanced indices first), then channel-major columns
    patches = xp.transpose(0, 2, 3, 1)[bi[:, None, None], iy[:, :, None], ix[:, None, :]]
    xr = patches.transpose(0, 3, 1, 2).reshape(-1, c * kh * kw)
    if y is None:
        return xr, None
    yr = y.transpose(0, 2, 3, 1).reshape(y.shape[0], ho * wo, -1)[bi, pos]
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
