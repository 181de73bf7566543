"""ONNX operators implemented with torch: one small function per op type, registered in :data:`TABLE`
(the recurrent LSTM/GRU/RNN in :mod:`onnxprune.bridge.rnn`, registered from here).

Every function has the signature ``fn(n: Node, *inputs) -> Tensor | tuple[Tensor, ...]``: ``n`` holds
the node's attributes, name, opset and declared outputs; ``inputs`` are the node's input tensors in
order, ``None`` for an omitted optional input (an empty name, or trailing inputs left out). Shape
arguments (Reshape targets, Slice starts, Pad pads ...) are read from their tensors at run time, so
shape-computing subgraphs (Shape -> Gather -> Concat -> Reshape) work for any batch size.

Opset differences are handled inside each function (``n.opset`` is the model's default-domain opset):
attributes that later opsets turned into inputs (Split ``split``, Slice ``starts``, Clip ``min``,
Squeeze/Unsqueeze/Reduce ``axes``, Pad ``pads``, Upsample/Resize ``scales``), Softmax's 2-D coercion
before opset 13, GroupNormalization's per-group affine before opset 21.

Some ops need a look at their attributes before anything runs (an unsupported mode, an output we do
not produce): :data:`CHECKS` maps such op types to a validator that raises :class:`OnnxPruneError` when
the module is built, not in the middle of a training run; :data:`CONST_CHECKS` validators also see
the graph's constant tensors (a Dropout's ``training_mode``). Semantics follow the ONNX spec and its
reference implementation (``onnx.reference``), checked case by case by
:mod:`onnxprune.bridge.conformance`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..core.errors import OnnxPruneError
from ..core.model_io import sparse_to_dense


@dataclass
class RunFlags:
    """Run-time switches shared by all nodes of one module (set by the module on every forward)."""

    bn_train: bool = False  # BatchNormalization uses batch statistics and updates running stats


@dataclass
class Node:
    """What an op function may know about its node."""

    name: str
    op_type: str
    opset: int
    attrs: dict[str, Any]
    inputs: list[str]
    outputs: list[str]
    flags: RunFlags = field(default_factory=RunFlags)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def fail(self, why: str) -> OnnxPruneError:
        return OnnxPruneError(f"bridge: op {self.op_type} (node {self.name}) {why}")


OpFn = Callable[..., Any]
#: op type (default ONNX domain) -> torch implementation.
TABLE: dict[str, OpFn] = {}
#: op type -> construction-time validator (raises :class:`OnnxPruneError` for what the function can't do).
CHECKS: dict[str, Callable[[Node], None]] = {}
#: op type -> construction-time validator that also sees the graph's constant tensors (initializers and
#: Constant outputs, by name): for refusals that depend on an input's value, not only on attributes.
CONST_CHECKS: dict[str, Callable[[Node, dict[str, np.ndarray]], None]] = {}


def op(*names: str, check: Callable[[Node], None] | None = None,
       const_check: Callable[[Node, dict[str, np.ndarray]], None] | None = None) -> Callable[[OpFn], OpFn]:
    """Register the decorated function for ``names`` (and its validators)."""
    def deco(fn: OpFn) -> OpFn:
        for name in names:
            TABLE[name] = fn
            if check is not None:
                CHECKS[name] = check
            if const_check is not None:
                CONST_CHECKS[name] = const_check
        return fn
    return deco


# ----------------------------------------------------------------------------------------- helpers

#: ONNX element type -> torch dtype (what the bridge can hold).
TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.BOOL: torch.bool,
}
#: element types torch can store but not compute with (no add, compare, remainder, topk on CPU).
_NO_ARITHMETIC = {onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def torch_dtype(elem_type: int, n: Node | None = None) -> torch.dtype:
    if elem_type not in TORCH_DTYPES:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        msg = f"element type {name} is not supported by the bridge"
        if elem_type in _NO_ARITHMETIC:
            msg += " (torch has no arithmetic for unsigned 16/32/64-bit integers)"
        raise n.fail(msg) if n else OnnxPruneError(f"bridge: {msg}")
    return TORCH_DTYPES[elem_type]


def ints(t: torch.Tensor | None) -> list[int] | None:
    """An int list from a (shape-like) tensor; None stays None."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.reshape(-1).tolist()]


def ints_input_or_attr(n: Node, t: torch.Tensor | None, attr_name: str) -> list[int] | None:
    """Newer opsets pass some int lists as inputs, older ones as attributes; read whichever is there."""
    if t is not None:
        return ints(t)
    v = n.attr(attr_name)
    return None if v is None else [int(a) for a in v]


def axis_of(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads -> ``F.pad`` order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [int(b), int(e)]
    return out


def spatial_pads(n: Node, in_sizes, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list[int], list[int]]:
    """Begin/end pads of a Conv or pool: explicit ``pads`` or computed from ``auto_pad`` at run time."""
    d = len(kernel)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(d):
            out = -(-int(in_sizes[i]) // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - int(in_sizes[i]))
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * d, [0] * d
    pads = list(n.attr("pads") or [0] * (2 * d))
    return pads[:d], pads[d:]


def _geometry(n: Node, x: torch.Tensor, kernel: list[int]):
    d = len(kernel)
    strides = list(n.attr("strides") or [1] * d)
    dilations = list(n.attr("dilations") or [1] * d)
    begin, end = spatial_pads(n, x.shape[2:], kernel, strides, dilations)
    return strides, dilations, begin, end


def _reduce_all(fn, xs):
    return functools.reduce(fn, [x for x in xs if x is not None])


def _check_outputs(max_outputs: int) -> Callable[[Node], None]:
    def check(n: Node) -> None:
        extra = [o for o in n.outputs[max_outputs:] if o]
        if extra:
            raise n.fail(f"output {len(n.outputs) - 1} ({extra[0]}) is not supported by the bridge")
    return check


def _checks(*fns: Callable[[Node], None]) -> Callable[[Node], None]:
    def check(n: Node) -> None:
        for f in fns:
            f(n)
    return check


# --------------------------------------------------------------------------------------- constants

def tensor_of_attr(n: Node) -> np.ndarray:
    """The value of a Constant node's attribute as numpy."""
    a = n.attrs
    if "value" in a:
        return a["value"]
    if "sparse_value" in a:
        return a["sparse_value"]
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    raise n.fail("holds a string or unknown attribute the bridge cannot represent")


def _check_constant(n: Node) -> None:
    tensor_of_attr(n)


@op("Constant", check=_check_constant)
def constant(n: Node) -> torch.Tensor:
    """A constant tensor from the ``value``/``value_float(s)``/``value_int(s)`` attribute. (The module
    stores Constant outputs as parameters/buffers when it is built, so this runs only on its own.)"""
    return torch.from_numpy(np.array(tensor_of_attr(n)))


@op("ConstantOfShape")
def constant_of_shape(n: Node, shape: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` filled with the one-element ``value`` attribute (default float 0)."""
    value = n.attr("value")
    v = torch.zeros(1) if value is None else torch.from_numpy(np.array(value).reshape(-1))
    return torch.full(ints(shape), v[0].item(), dtype=v.dtype, device=shape.device)


# ------------------------------------------------------------------------------------ convolutions

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_spatial_rank(n: Node) -> None:
    k = n.attr("kernel_shape")
    if k is not None and len(k) not in (1, 2, 3):
        raise n.fail(f"with {len(k)} spatial dims is not supported (1 to 3)")


@op("Conv", check=_check_spatial_rank)
def conv(n: Node, x, w, b=None):
    """N-d convolution (1-3 spatial dims) with groups, dilations, explicit or ``auto_pad`` padding;
    asymmetric pads are applied with ``F.pad`` first."""
    d = w.dim() - 2
    kernel = list(n.attr("kernel_shape") or w.shape[2:])
    strides, dil, begin, end = _geometry(n, x, kernel)
    if begin != end:
        x = F.pad(x, torch_pad(begin, end))
        begin = [0] * d
    return _CONV[d](x, w, b, strides, begin, dil, n.attr("group", 1))


@op("ConvTranspose", check=_check_spatial_rank)
def conv_transpose(n: Node, x, w, b=None):
    """Transposed convolution with ``output_padding``, explicit/asymmetric pads, ``output_shape`` and
    ``auto_pad``. The general case computes the full (unpadded) result, then crops ``pads`` and
    appends ``output_padding`` positions (which receive only the bias)."""
    d = w.dim() - 2
    kernel = list(n.attr("kernel_shape") or w.shape[2:])
    strides = list(n.attr("strides") or [1] * d)
    dil = list(n.attr("dilations") or [1] * d)
    group = n.attr("group", 1)
    out_pad = list(n.attr("output_padding") or [0] * d)
    in_sizes = [int(s) for s in x.shape[2:]]
    full = [(in_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(d)]
    auto = n.attr("auto_pad", "NOTSET")
    output_shape = n.attr("output_shape")
    if output_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape)[-d:] if output_shape is not None else [in_sizes[i] * strides[i] for i in range(d)]
        total = [full[i] + out_pad[i] - target[i] for i in range(d)]
        if auto == "SAME_UPPER":
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
    elif auto == "VALID":
        begin, end = [0] * d, [0] * d
    else:
        pads = list(n.attr("pads") or [0] * (2 * d))
        begin, end = pads[:d], pads[d:]
    if begin == end and all(p >= 0 for p in begin) and all(o < max(s, dd) for o, s, dd in zip(out_pad, strides, dil)):
        return _CONV_T[d](x, w, b, strides, begin, out_pad, group, dil)
    y = _CONV_T[d](x, w, None, strides, 0, 0, group, dil)
    y = F.pad(y, torch_pad([-p for p in begin], [o - p for o, p in zip(out_pad, end)]))
    return y if b is None else y + b.reshape((1, -1) + (1,) * d)


# --------------------------------------------------------------------------------- linear algebra

@op("Gemm")
def gemm(n: Node, a, b, c=None):
    """``alpha * A' @ B' + beta * C`` with ``transA``/``transB``."""
    if n.attr("transA", 0):
        a = a.transpose(0, 1)
    y = F.linear(a, b) if n.attr("transB", 0) else a @ b
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@op("MatMul")
def matmul(n: Node, a, b):
    """numpy-style matmul (batched, broadcasting): ``torch.matmul``."""
    return torch.matmul(a, b)


@op("Einsum")
def einsum(n: Node, *xs):
    """``torch.einsum`` with the ``equation`` attribute."""
    return torch.einsum(n.attr("equation").replace(" ", ""), *xs)


# --------------------------------------------------------------------------------- normalizations

def _check_bn(n: Node) -> None:
    if n.attr("training_mode", 0):
        raise n.fail("in training mode (training_mode=1) is not supported; export the model in eval mode")
    if n.attr("spatial", 1) == 0:
        raise n.fail("with spatial=0 (per-activation statistics, opset < 9) is not supported by the bridge")
    _check_outputs(1)(n)


@op("BatchNormalization", check=_check_bn)
def batch_norm(n: Node, x, scale, bias, mean, var):
    """Inference-form batch norm ``(x - mean) / sqrt(var + eps) * scale + bias``.

    By default the statistics stay frozen and only the affine ``scale``/``bias`` train: fine-tuning
    batches are small, so batch statistics would be noisy estimates, and the exported graph holds
    inference-form BN whose stored statistics describe the full training set. With
    ``to_torch(..., train_bn=True)`` the module behaves like ``torch.nn.BatchNorm``: in train mode it
    normalizes with batch statistics and updates the running ones (ONNX ``momentum`` m means
    ``running = m * running + (1 - m) * batch``).
    """
    train = n.flags.bn_train
    # Statistics are never learned by gradient; detaching also covers exports that share one zero
    # tensor between a BN's bias and its running mean (untrained models).
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, training=train,
                        momentum=1.0 - n.attr("momentum", 0.9), eps=n.attr("epsilon", 1e-5))


@op("InstanceNormalization")
def instance_norm(n: Node, x, scale, bias):
    """Per-sample, per-channel normalization over the spatial dims, then ``scale``/``bias``."""
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


@op("GroupNormalization", check=_check_outputs(1))
def group_norm(n: Node, x, scale, bias):
    """Group norm over ``num_groups``. Opset 18 gives ``scale``/``bias`` one value per group (opset 21
    made them per channel); per-group values are repeated over each group's channels."""
    groups = n.attr("num_groups")
    c = x.shape[1]
    if scale.numel() == groups and groups != c:
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return F.group_norm(x, groups, scale, bias, n.attr("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(n: Node, x, scale, bias=None):
    """Normalize over dims ``axis..`` (default -1) then ``* scale + bias`` (broadcast); the optional
    ``Mean`` and ``InvStdDev`` outputs are produced when requested."""
    axis = axis_of(n.attr("axis", -1), x.dim())
    eps = n.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)
    else:
        y = F.layer_norm(x, shape, None, None, eps) * scale
        if bias is not None:
            y = y + bias
    if len([o for o in n.outputs if o]) == 1:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(x.var(dim=dims, keepdim=True, unbiased=False) + eps)
    return y, mean, inv


def _check_rms_norm(n: Node) -> None:
    if n.attr("stash_type", 1) != 1:
        raise n.fail(f"with stash_type={n.attr('stash_type')} is not supported by the bridge (float32 statistics only)")


@op("RMSNormalization", check=_check_rms_norm)
def rms_norm(n: Node, x, scale):
    """``x / sqrt(mean(x^2 over dims axis..) + epsilon) * scale`` (opset 23), statistics in float32
    (``stash_type=1``) whatever the input's precision."""
    axis = axis_of(n.attr("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    inv = torch.rsqrt((xf * xf).mean(dim=dims, keepdim=True) + n.attr("epsilon", 1e-5))
    return ((xf * inv).to(x.dtype) * scale).to(x.dtype)


@op("LRN")
def lrn(n: Node, x):
    """Local response norm across channels: window ``[c - floor((size-1)/2), c + ceil((size-1)/2)]``,
    ``x / (bias + alpha / size * sum(x^2))^beta`` (torch's own LRN centres even windows differently)."""
    size = n.attr("size")
    alpha, beta, bias = n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size - 1 - (size - 1) // 2))
    s = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return x / (bias + alpha / size * s.reshape(x.shape)) ** beta


# ------------------------------------------------------------------------------------ activations

@op("LeakyRelu")
def leaky_relu(n: Node, x):
    """``x`` for x >= 0, ``alpha * x`` otherwise (alpha 0.01)."""
    return F.leaky_relu(x, n.attr("alpha", 0.01))


@op("PRelu")
def prelu(n: Node, x, slope):
    """``x`` for x >= 0, ``slope * x`` otherwise; ``slope`` broadcasts to ``x`` numpy-style."""
    return torch.where(x >= 0, x, x * slope)


@op("Elu")
def elu(n: Node, x):
    """``x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise (alpha 1)."""
    return F.elu(x, n.attr("alpha", 1.0))


@op("Celu")
def celu(n: Node, x):
    """``max(0, x) + min(0, alpha * (exp(x / alpha) - 1))``."""
    return F.celu(x, n.attr("alpha", 1.0))


@op("Selu")
def selu(n: Node, x):
    """``gamma * (x if x > 0 else alpha * (exp(x) - 1))`` with ONNX's default constants."""
    alpha = n.attr("alpha", 1.67326319217681884765625)
    gamma = n.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@op("ThresholdedRelu")
def thresholded_relu(n: Node, x):
    """``x`` where x > alpha (default 1), else 0."""
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x))


@op("Clip")
def clip(n: Node, x, lo=None, hi=None):
    """Clamp to [min, max]: attributes before opset 11, optional inputs from 11 on."""
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@op("HardSigmoid")
def hard_sigmoid(n: Node, x):
    """``clip(alpha * x + beta, 0, 1)`` (alpha 0.2, beta 0.5: not torch's 1/6, 1/2)."""
    return torch.clamp(n.attr("alpha", 0.2) * x + n.attr("beta", 0.5), 0.0, 1.0)


@op("Gelu")
def gelu(n: Node, x):
    """Gelu, exact (erf) or ``approximate="tanh"``."""
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@op("Softplus")
def softplus(n: Node, x):
    """``log(1 + exp(x))`` (computed stably)."""
    return torch.logaddexp(x, torch.zeros_like(x))


@op("Softsign")
def softsign(n: Node, x):
    """``x / (1 + |x|)``."""
    return x / (1 + torch.abs(x))


def _plain(name: str, fn: Callable[..., torch.Tensor], doc: str) -> None:
    """Register an op that is one torch function of its inputs, without attributes."""
    def f(n: Node, *xs):
        return fn(*xs)
    f.__name__ = name.lower()
    f.__doc__ = doc
    op(name)(f)


for _name, _fn, _doc in [
    ("Relu", torch.relu, "``max(x, 0)``."), ("Sigmoid", torch.sigmoid, "``1 / (1 + exp(-x))``."),
    ("HardSwish", F.hardswish, "``x * clip(x / 6 + 1/2, 0, 1)``."), ("Mish", F.mish, "``x * tanh(softplus(x))``."),
    ("Tanh", torch.tanh, "Hyperbolic tangent."), ("Erf", torch.erf, "Gauss error function."),
    ("Neg", torch.neg, "``-x``."), ("Abs", torch.abs, "``|x|``."), ("Sqrt", torch.sqrt, "Square root."),
    ("Exp", torch.exp, "``e^x``."), ("Log", torch.log, "Natural logarithm."),
    ("Reciprocal", torch.reciprocal, "``1 / x``."), ("Floor", torch.floor, "Round down."),
    ("Ceil", torch.ceil, "Round up."), ("Round", torch.round, "Round half to even (as ONNX)."),
    ("Sign", torch.sign, "-1, 0 or 1."), ("Sin", torch.sin, "Sine."), ("Cos", torch.cos, "Cosine."),
    ("Not", torch.logical_not, "Logical not."), ("IsNaN", torch.isnan, "NaN test."),
    # binary, numpy broadcasting
    ("Add", torch.add, "``a + b``."), ("Sub", torch.sub, "``a - b``."), ("Mul", torch.mul, "``a * b``."),
    ("Equal", torch.eq, "``a == b``."), ("Less", torch.lt, "``a < b``."), ("LessOrEqual", torch.le, "``a <= b``."),
    ("Greater", torch.gt, "``a > b``."), ("GreaterOrEqual", torch.ge, "``a >= b``."),
    ("And", torch.logical_and, "Logical and."), ("Or", torch.logical_or, "Logical or."),
    ("Xor", torch.logical_xor, "Logical xor."),
]:
    _plain(_name, _fn, _doc)


# ------------------------------------------------------------------------------------ elementwise

@op("Div")
def div(n: Node, a, b):
    """``a / b``; integer division truncates toward zero, as in ONNX Runtime."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _fmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C ``fmod``, exact. torch's vectorized kernel computes through ``a / b`` and returns NaN when
    that quotient overflows (a tiny divisor): 16/32-bit floats go through float64 (where it cannot
    overflow; the remainder is exact in the input type), float64's rare NaNs are redone by numpy."""
    if not a.is_floating_point():
        return torch.fmod(a, b)
    if a.dtype != torch.float64:
        return torch.fmod(a.double(), b.double()).to(a.dtype)
    r = torch.fmod(a, b)
    bad = torch.isnan(r) & torch.isfinite(a) & torch.isfinite(b) & (b != 0)
    if bool(bad.any()):
        a, b = torch.broadcast_tensors(a, b)
        r = r.clone()
        r[bad] = torch.from_numpy(np.fmod(a[bad].detach().cpu().numpy(), b[bad].detach().cpu().numpy())).to(r.device)
    return r


@op("Mod")
def mod(n: Node, a, b):
    """Remainder with the divisor's sign (``fmod=0``, Python/numpy ``mod``) or the dividend's
    (``fmod=1``, C ``fmod``). Float ``fmod=0`` is built from ``fmod`` as numpy does: a nonzero
    remainder whose sign differs from the divisor's gets the divisor added, and a zero remainder takes
    the divisor's sign (``torch.remainder`` gives +0 there, and NaN for tiny divisors)."""
    if n.attr("fmod", 0):
        return _fmod(a, b)
    if not (a.is_floating_point() or b.is_floating_point()):
        return torch.remainder(a, b)
    r = _fmod(a, b)
    r = torch.where((r != 0) & (torch.signbit(r) != torch.signbit(b)), r + b, r)
    return torch.where(r == 0, torch.copysign(torch.zeros_like(r), b), r)


@op("Pow")
def pow_(n: Node, x, y):
    """``x ** y``; the result has ``x``'s type."""
    out = torch.pow(x, y)
    return out if out.dtype == x.dtype else out.to(x.dtype)


@op("Sum")
def sum_(n: Node, *xs):
    """Elementwise sum of any number of inputs (broadcasting)."""
    return _reduce_all(torch.add, xs)


@op("Mean")
def mean(n: Node, *xs):
    """Elementwise mean of the inputs."""
    return _reduce_all(torch.add, xs) / len([x for x in xs if x is not None])


@op("Max")
def max_(n: Node, *xs):
    """Elementwise maximum of the inputs."""
    return _reduce_all(torch.maximum, xs)


@op("Min")
def min_(n: Node, *xs):
    """Elementwise minimum of the inputs."""
    return _reduce_all(torch.minimum, xs)


@op("Where")
def where(n: Node, cond, a, b):
    """``a`` where ``cond`` else ``b`` (broadcasting)."""
    return torch.where(cond.bool(), a, b)


# ------------------------------------------------------------------------------------------ pools

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _check_pool(n: Node) -> None:
    _check_spatial_rank(n)
    _check_outputs(2 if n.op_type == "MaxPool" else 1)(n)


def _native_pads_ok(begin: list[int], end: list[int], kernel: list[int], dil: list[int]) -> bool:
    """torch pools take only symmetric pads of at most half the (dilated) kernel."""
    return begin == end and all(2 * p <= (k - 1) * d + 1 for p, k, d in zip(begin, kernel, dil))


def _ceil_extra(sizes: list[int], begin: list[int], end: list[int], kernel: list[int], strides: list[int],
                dil: list[int], ceil: bool) -> list[int]:
    """Per spatial dim, how many positions past the end pad ONNX's output length reads: its length is
    ``(len + pads - span) / stride + 1`` rounded up with ``ceil_mode``, less a last window that would
    start in the end padding. Padding that much more and pooling without ceil mode gives exactly
    ONNX's output (torch's own ceil rule, applied to an already padded input, keeps such windows)."""
    extra = []
    for i in range(len(kernel)):
        span = (kernel[i] - 1) * dil[i] + 1
        padded = sizes[i] + begin[i] + end[i]
        steps = (padded - span) / strides[i] + 1
        out = math.ceil(steps) if ceil else math.floor(steps)
        if ceil and (out - 1) * strides[i] >= sizes[i] + begin[i]:
            out -= 1
        extra.append(max(0, (out - 1) * strides[i] + span - padded))
    return extra


@op("MaxPool", check=_check_pool)
def max_pool(n: Node, x):
    """Max pooling with pads (asymmetric ones applied as -inf padding), strides, dilations, ceil_mode.
    The optional ``Indices`` output: flat positions in the whole input (batch and channel included),
    row-major or, with ``storage_order=1``, column-major over the spatial dims; ties keep the first."""
    kernel = list(n.attr("kernel_shape"))
    d = len(kernel)
    strides, dil, begin, end = _geometry(n, x, kernel)
    ceil = bool(n.attr("ceil_mode", 0))
    want_indices = len([o for o in n.outputs if o]) > 1
    if not want_indices and _native_pads_ok(begin, end, kernel, dil):
        return _MAX_POOL[d](x, kernel, strides, begin, dil, ceil_mode=ceil)
    sizes = [int(v) for v in x.shape[2:]]
    end = [e + x_ for e, x_ in zip(end, _ceil_extra(sizes, begin, end, kernel, strides, dil, ceil))]
    xp = F.pad(x, torch_pad(begin, end), value=-math.inf)  # torch's indices then address the padded plane
    if not want_indices:
        return _MAX_POOL[d](xp, kernel, strides, 0, dil)
    y, flat = _MAX_POOL[d](xp, kernel, strides, 0, dil, return_indices=True)
    padded = [s + b + e for s, b, e in zip(sizes, begin, end)]
    coords = []
    for i in reversed(range(d)):
        coords.append(flat % padded[i] - begin[i])
        flat = flat // padded[i]
    coords.reverse()  # spatial coordinates in the unpadded input
    order = range(d) if not n.attr("storage_order", 0) else reversed(range(d))
    index = torch.zeros_like(coords[0])
    for i in order:
        index = index * sizes[i] + coords[i]
    plane = math.prod(sizes)
    offset = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *([1] * d)) * plane
    return y, index + offset


def _dilated_window_sums(n: Node, x: torch.Tensor, kernel: list[int], include_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``x`` over every (dilated) pooling window, and how many positions each counts (real
    ones, plus pads with ``include_pad``): for pools torch has no form of (dilated averages, pads
    torch refuses). Output lengths as :func:`_ceil_extra`; the positions ceil mode adds past the
    pads count nowhere. Windows are ``unfold`` views, one axis at a time, then every
    ``dilation``-th tap."""
    d = len(kernel)
    strides, dil, begin, end = _geometry(n, x, kernel)
    sizes = [int(v) for v in x.shape[2:]]
    extra = _ceil_extra(sizes, begin, end, kernel, strides, dil, bool(n.attr("ceil_mode", 0)))
    inner = torch.ones((1, 1) + tuple(sizes), dtype=x.dtype, device=x.device)
    if include_pad:
        inner = F.pad(inner, torch_pad(begin, end), value=1.0)
        counts = F.pad(inner, torch_pad([0] * d, extra))
    else:
        counts = F.pad(inner, torch_pad(begin, [e + x_ for e, x_ in zip(end, extra)]))
    xs = F.pad(x, torch_pad(begin, [e + x_ for e, x_ in zip(end, extra)]))

    def sums(t: torch.Tensor) -> torch.Tensor:
        for i in range(d):
            t = t.unfold(2 + i, (kernel[i] - 1) * dil[i] + 1, strides[i])
        taps = (Ellipsis,) + tuple(slice(None, None, dl) for dl in dil)
        return t[taps].sum(dim=tuple(range(-d, 0)))

    return sums(xs), sums(counts)


@op("AveragePool", check=_check_pool)
def avg_pool(n: Node, x):
    """Average pooling with pads, strides, ceil_mode and ``count_include_pad``: torch's pool where
    it takes the pads (symmetric, at most half the kernel), else explicit window sums divided by
    the count of real (or, with ``count_include_pad``, real and padded) positions; dilated windows
    (opset 19) likewise."""
    kernel = list(n.attr("kernel_shape"))
    d = len(kernel)
    include = bool(n.attr("count_include_pad", 0))
    strides, dil, begin, end = _geometry(n, x, kernel)
    if all(v == 1 for v in dil) and _native_pads_ok(begin, end, kernel, dil):
        return _AVG_POOL[d](x, kernel, strides, begin, bool(n.attr("ceil_mode", 0)), include)
    total, count = _dilated_window_sums(n, x, kernel, include)
    return total / count


@op("LpPool", check=_check_pool)
def lp_pool(n: Node, x):
    """``(sum over the window of |x|^p)^(1/p)`` (p default 2), zero padding, dilations, ceil_mode."""
    kernel = list(n.attr("kernel_shape"))
    p = n.attr("p", 2)
    return _dilated_window_sums(n, torch.abs(x) ** p, kernel, True)[0] ** (1.0 / p)


@op("GlobalAveragePool")
def global_avg_pool(n: Node, x):
    """Mean over all spatial dims, kept as size 1."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(n: Node, x):
    """Max over all spatial dims, kept as size 1."""
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalLpPool")
def global_lp_pool(n: Node, x):
    """``(sum over spatial dims of |x|^p)^(1/p)``, kept as size 1."""
    p = n.attr("p", 2)
    return (torch.abs(x) ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)


# ---------------------------------------------------------------------------------- shape and copy

def _check_pad(n: Node) -> None:
    mode = n.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise n.fail(f"mode {mode!r} is not supported by the bridge")


@op("Pad", check=_check_pad)
def pad(n: Node, x, pads=None, value=None, axes=None):
    """Constant/reflect/edge/wrap padding; ``pads`` (begin..., end...) and ``value`` are attributes
    before opset 11 and inputs from 11 on (``axes`` from 18); negative pads crop."""
    if n.opset < 11:
        pad_list, fill = list(n.attr("pads")), float(n.attr("value", 0.0))
    else:
        pad_list = ints(pads)
        fill = value.reshape(-1)[0].item() if value is not None and value.numel() else 0
    r = x.dim()
    axes_list = [axis_of(a, r) for a in ints(axes)] if axes is not None else list(range(r))
    begin, end = [0] * r, [0] * r
    for i, a in enumerate(axes_list):
        begin[a], end[a] = pad_list[i], pad_list[i + len(axes_list)]
    first = next((i for i in range(r) if begin[i] or end[i]), r)
    if first == r:
        return x
    tp = torch_pad(begin[first:], end[first:])
    mode = n.attr("mode", "constant")
    if mode == "constant":
        return F.pad(x, tp, value=fill)
    lead = tuple(x.shape[:first])
    y = F.pad(x.reshape((-1,) + tuple(x.shape[first:])), tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])
    return y.reshape(lead + tuple(y.shape[1:]))


def _check_resize(n: Node) -> None:
    mode = n.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        raise n.fail(f"mode {mode!r} is not supported by the bridge")
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    if ctm not in _COORD and ctm != "tf_crop_and_resize":
        raise n.fail(f"coordinate_transformation_mode {ctm!r} is not supported by the bridge")
    if n.attr("keep_aspect_ratio_policy", "stretch") not in ("stretch", "not_larger", "not_smaller"):
        raise n.fail(f"keep_aspect_ratio_policy {n.attr('keep_aspect_ratio_policy')!r} is not supported by the bridge")


def _check_resize_consts(n: Node, consts: dict[str, np.ndarray]) -> None:
    """``tf_crop_and_resize`` from ``scales``: the spec sizes the output ``floor(len * (roi_end -
    roi_start) * scale)``, its reference implementation ``floor(len * scale)``. Refused rather than
    guessed; with ``sizes`` (what TensorFlow exports write) both agree."""
    if n.opset < 11 or n.attr("coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize":
        return
    scales = n.inputs[2] if len(n.inputs) > 2 else ""
    if scales and not (scales in consts and np.asarray(consts[scales]).size == 0):
        raise n.fail("with coordinate_transformation_mode 'tf_crop_and_resize' and scales (not sizes) is not "
                     "supported by the bridge: the spec and its reference implementation size the output differently")


#: Resize coordinate transforms: output index (float32 array), scale, input length, output length
#: (the integer one) and output width (``scale * length``, fractional when it comes from ``scales``)
#: -> input coordinate. ``align_corners`` and ``pytorch_half_pixel`` use the fractional width, as the
#: spec's ``length_resized`` and ONNX's reference implementation do (ONNX Runtime uses the integer
#: length there: the two differ only when downsampling by a scale whose product is not an integer,
#: and the bridge follows the spec; ``check_bridge`` reports such a node as diverging from ORT).
_COORD: dict[str, Callable] = {
    "half_pixel": lambda i, s, lin, lout, w: (i + np.float32(0.5)) / s - np.float32(0.5),
    "pytorch_half_pixel": lambda i, s, lin, lout, w: (i + np.float32(0.5)) / s - np.float32(0.5) if w > 1 else np.zeros_like(i),
    "align_corners": lambda i, s, lin, lout, w: i * np.float32(lin - 1) / np.float32(w - 1) if w != 1 else np.zeros_like(i),
    "asymmetric": lambda i, s, lin, lout, w: i / s,
    "tf_half_pixel_for_nn": lambda i, s, lin, lout, w: (i + np.float32(0.5)) / s,
    "half_pixel_symmetric": lambda i, s, lin, lout, w: (
        np.float32(lin / 2) * (1 - np.float32(lout) / np.float32(w)) + (i + np.float32(0.5)) / s - np.float32(0.5)),
}

_NEAREST: dict[str, Callable[[np.ndarray, bool], np.ndarray]] = {
    "round_prefer_floor": lambda x, down: np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x)),
    "round_prefer_ceil": lambda x, down: np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x)),
    "floor": lambda x, down: np.floor(x),
    "ceil": lambda x, down: np.ceil(x),
    # ONNX Runtime's rule before Resize-11 (Upsample, Resize-10): ceil when downsampling, else floor
    "simple": lambda x, down: np.ceil(x) if down else np.floor(x),
}


def _kernel_taps(coord: np.ndarray, lin: int, scale: float, mode: str, cubic_a: float, exclude_outside: bool,
                 antialias: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input index, weight) per tap of a linear or cubic kernel, as ONNX's reference computes them:
    taps at ``base + j`` with ``base = ceil(c) - 1`` (the pixel left of ``c``, ratio in (0, 1]),
    weights ``kernel(|j - ratio| * s)``. ``antialias`` stretches the kernel by ``1 / scale`` when
    downsampling (``s = min(scale, 1)``, more taps) and normalizes the weights; ``exclude_outside``
    drops taps outside the input and renormalizes; border taps read the edge pixel."""
    a = np.float32(cubic_a)
    s = np.float32(min(float(scale), 1.0)) if antialias else np.float32(1.0)
    support = 1 if mode in ("linear", "bilinear") else 2
    first = int(math.floor(-support / float(s))) + 1
    base = np.ceil(coord).astype(np.int64) - 1
    ratio = (coord - base).astype(np.float32)
    taps = []
    for j in range(first, 2 - first):
        d = np.abs((np.float32(j) - ratio) * s).astype(np.float32)
        if support == 1:
            w = np.maximum(np.float32(1) - d, 0)
        else:
            w = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                         np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0))
        idx = base + j
        if exclude_outside:
            w = np.where((idx < 0) | (idx >= lin), 0, w)
        taps.append((np.clip(idx, 0, lin - 1), w.astype(np.float32)))
    if antialias or exclude_outside:
        total = sum(w for _, w in taps)
        taps = [(i, (w / total).astype(np.float32)) for i, w in taps]
    return taps


def _crop_coord(i: np.ndarray, lin: int, width: float, start: float, end: float) -> np.ndarray:
    """``tf_crop_and_resize``: output index -> input coordinate inside the normalized ``roi`` box."""
    if width == 1:
        return np.full(i.shape, 0.5 * (start + end) * (lin - 1))
    return start * (lin - 1) + i.astype(np.float64) * (end - start) * (lin - 1) / (width - 1)


def _resize_axis(x: torch.Tensor, axis: int, out_len: int, out_width: float, scale: float, mode: str, ctm: str,
                 nearest: str, n: Node, roi: tuple[float, float] | None = None) -> torch.Tensor:
    """Resample ``x`` along one axis (multilinear/cubic resizing in ONNX is separable)."""
    lin = int(x.shape[axis])
    index = np.arange(out_len, dtype=np.float32)
    outside = None
    if ctm == "tf_crop_and_resize":
        coord = _crop_coord(index, lin, out_width, *roi)
        outside = (coord < 0) | (coord > lin - 1)
    else:
        coord = _COORD[ctm](index, np.float32(scale), lin, out_len, out_width).astype(np.float32)
    dev = x.device
    shape = [1] * x.dim()
    shape[axis] = out_len
    antialias = bool(n.attr("antialias", 0)) and mode != "nearest" and scale < 1
    if mode == "nearest":
        idx = np.clip(_NEAREST[nearest](coord, scale < 1), 0, lin - 1).astype(np.int64)
        y = x.index_select(axis, torch.from_numpy(idx).to(dev))
    elif mode in ("linear", "bilinear") and not antialias:
        c = np.clip(coord, 0, lin - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, lin - 1)
        w1 = torch.from_numpy((c - i0).astype(np.float32)).to(dev, x.dtype).reshape(shape)
        a = x.index_select(axis, torch.from_numpy(i0).to(dev))
        b = x.index_select(axis, torch.from_numpy(i1).to(dev))
        y = a + (b - a) * w1
    else:
        y = None
        for idx, w in _kernel_taps(coord, lin, scale, mode, n.attr("cubic_coeff_a", -0.75),
                                   bool(n.attr("exclude_outside", 0)), antialias):
            term = x.index_select(axis, torch.from_numpy(idx).to(dev)) * torch.from_numpy(w).to(dev, x.dtype).reshape(shape)
            y = term if y is None else y + term
    if outside is not None and outside.any():
        fill = torch.tensor(float(n.attr("extrapolation_value", 0.0)), dtype=y.dtype, device=dev)
        y = torch.where(torch.from_numpy(outside).to(dev).reshape(shape), fill, y)
    return y


def _resample(n: Node, x: torch.Tensor, scales: list[float] | None, sizes: list[int] | None, axes: list[int] | None,
              mode: str, ctm: str, nearest: str, roi: list[float] | None = None) -> torch.Tensor:
    """Resize axis by axis. With ``sizes``, ``keep_aspect_ratio_policy`` not_larger/not_smaller
    uses one scale for every resized axis (the min/max of ``sizes / len``) and sizes the output
    ``round_half_up(scale * len)``; ``roi`` (``[starts..., ends...]`` of the resized axes) is read by
    ``tf_crop_and_resize`` only."""
    r = x.dim()
    axes = [axis_of(a, r) for a in axes] if axes else list(range(r))
    policy = n.attr("keep_aspect_ratio_policy", "stretch")
    common = None
    if sizes is not None and policy != "stretch":
        ratios = [sizes[j] / int(x.shape[a]) for j, a in enumerate(axes)]
        common = min(ratios) if policy == "not_larger" else max(ratios)
    for j, axis in enumerate(axes):
        lin = int(x.shape[axis])
        if common is not None:
            scale = common
            out_len = int(common * lin + 0.5)
            width = common * lin
        elif sizes is not None:
            out_len = sizes[j]
            scale = float(np.float32(out_len) / np.float32(lin))
            width = float(out_len)
        else:
            scale = scales[j]
            out_len = int(math.floor(lin * scale))
            width = float(np.float32(lin) * np.float32(scale))
        box = (roi[j], roi[j + len(axes)]) if ctm == "tf_crop_and_resize" else None
        if out_len == lin and scale == 1.0 and box in (None, (0.0, 1.0)):
            continue  # ONNX Runtime leaves such axes alone whatever the transform
        x = _resize_axis(x, axis, out_len, width, scale, mode, ctm, nearest, n, box)
    return x


@op("Resize", check=_check_resize, const_check=_check_resize_consts)
def resize(n: Node, x, roi=None, scales=None, sizes=None):
    """Nearest/linear/cubic resizing from ``scales`` or ``sizes`` with every coordinate transform,
    ``antialias`` (linear/cubic downsampling), ``exclude_outside``, ``keep_aspect_ratio_policy`` and
    ``tf_crop_and_resize`` (with ``sizes``) with its ``extrapolation_value``; ``nearest_mode`` as given
    (PyTorch exports ``floor`` with ``asymmetric``). Opset 10's Resize (``X, scales``) uses
    asymmetric coordinates like Upsample."""
    if n.opset < 11:
        return _resample(n, x, floats(roi), None, None, n.attr("mode", "nearest"), "asymmetric", "simple")
    sz = ints(sizes) if sizes is not None and sizes.numel() else None
    sc = floats(scales) if sz is None else None
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    box = floats(roi) if ctm == "tf_crop_and_resize" else None
    if ctm == "tf_crop_and_resize" and (box is None or not box):
        raise n.fail("tf_crop_and_resize needs its roi input")
    return _resample(n, x, sc, sz, n.attr("axes"), n.attr("mode", "nearest"), ctm,
                     n.attr("nearest_mode", "round_prefer_floor"), box)


@op("Upsample", check=_check_resize)
def upsample(n: Node, x, scales=None):
    """Opset 7-9 resizing: ``scales`` attribute (7) or input (9), asymmetric coordinates."""
    sc = floats(scales) if scales is not None else [float(s) for s in n.attr("scales")]
    return _resample(n, x, sc, None, None, n.attr("mode", "nearest"), "asymmetric", "simple")


@op("DepthToSpace")
def depth_to_space(n: Node, x):
    """Move ``blocksize^2`` channel blocks into space, in DCR (default) or CRD order."""
    b, c, h, w = x.shape
    bs = n.attr("blocksize")
    if n.attr("mode", "DCR") == "DCR":
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


@op("SpaceToDepth")
def space_to_depth(n: Node, x):
    """Move ``blocksize x blocksize`` spatial blocks into channels: block offset outermost (``DCR``,
    the default) or channel outermost (``CRD``, opset 25's ``mode``)."""
    b, c, h, w = x.shape
    bs = n.attr("blocksize")
    perm = (0, 3, 5, 1, 2, 4) if n.attr("mode", "DCR") == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(*perm)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


@op("Concat")
def concat(n: Node, *xs):
    """Concatenate along ``axis``."""
    return torch.cat([x for x in xs if x is not None], dim=n.attr("axis"))


@op("Split")
def split(n: Node, x, split_sizes=None):
    """Split along ``axis`` by ``split`` (attribute before opset 13, input after), else into
    ``num_outputs`` (opset 18) or as many equal parts as outputs, the last part smaller if uneven."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    sizes = ints_input_or_attr(n, split_sizes, "split")
    if not sizes:
        parts = n.attr("num_outputs", len(n.outputs))
        dim = int(x.shape[axis])
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def slice_(n: Node, x, starts=None, ends=None, axes=None, steps=None):
    """Slice with ``starts/ends/axes`` (attributes before opset 10) and ``steps`` (inputs from 10),
    negative indices and steps, out-of-range ends clamped as ONNX specifies."""
    if n.opset < 10:
        st, en, ax, sp = list(n.attr("starts")), list(n.attr("ends")), n.attr("axes"), None
    else:
        st, en, ax, sp = ints(starts), ints(ends), ints(axes), ints(steps)
    ax = list(range(len(st))) if ax is None else list(ax)
    sp = [1] * len(st) if sp is None else sp
    for s, e, a, k in zip(st, en, ax, sp):
        a = axis_of(a, x.dim())
        dim = int(x.shape[a])
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if k > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
            index = [slice(None)] * a + [slice(s, e, k)]
            x = x[tuple(index)]
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
            x = x.index_select(a, torch.arange(s, e, k, device=x.device))
    return x


@op("Reshape")
def reshape(n: Node, x, shape=None):
    """Reshape to ``shape`` (attribute before opset 5): 0 copies the input dim (unless ``allowzero``),
    -1 is inferred."""
    target = ints(shape) if shape is not None else list(n.attr("shape"))
    if not n.attr("allowzero", 0):
        target = [int(x.shape[i]) if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(n: Node, x):
    """To 2-D: dims before ``axis`` (default 1) and from ``axis`` on."""
    axis = axis_of(n.attr("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1) if axis else x.reshape(1, -1)


@op("Transpose")
def transpose(n: Node, x):
    """Permute dims by ``perm`` (default: reversed)."""
    perm = n.attr("perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))


@op("Squeeze")
def squeeze(n: Node, x, axes=None):
    """Remove size-1 dims ``axes`` (attribute before opset 13), or all of them."""
    ax = ints_input_or_attr(n, axes, "axes")
    if not ax:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(a, x.dim()) for a in ax))


@op("Unsqueeze")
def unsqueeze(n: Node, x, axes=None):
    """Insert size-1 dims at output positions ``axes`` (attribute before opset 13)."""
    ax = ints_input_or_attr(n, axes, "axes")
    rank = x.dim() + len(ax)
    for a in sorted(axis_of(a, rank) for a in ax):
        x = x.unsqueeze(a)
    return x


@op("Gather")
def gather(n: Node, x, idx):
    """Take ``idx`` (any shape, negative allowed) along ``axis``: output dims are
    ``x.shape[:axis] + idx.shape + x.shape[axis+1:]``."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


#: ScatterND ``reduction`` -> ``Tensor.scatter_reduce`` mode (None: plain assignment).
_SCATTER_REDUCE = {"none": None, "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _check_scatter(n: Node) -> None:
    red = n.attr("reduction", "none")
    if red not in _SCATTER_REDUCE:
        raise n.fail(f"with reduction {red!r} is not supported by the bridge (none, add, mul, max, min)")


@op("ScatterND", check=_check_scatter)
def scatter_nd(n: Node, data, indices, updates):
    """A copy of ``data`` with ``updates`` written (or combined by ``reduction``) at the k-tuples of
    ``indices`` (negative entries count from the end). The leading k dims of ``data`` are flattened so
    each k-tuple becomes one row index, then rows are assigned (``none``; duplicate indices leave an
    unspecified winner, as ONNX says) or reduced with ``scatter_reduce`` including the old value."""
    k = int(indices.shape[-1])
    lead = [int(d) for d in data.shape[:k]]
    idx = indices.long().reshape(-1, k)
    dims = torch.tensor(lead, dtype=torch.long, device=data.device)
    idx = torch.where(idx < 0, idx + dims, idx)
    strides = [math.prod(lead[i + 1:]) for i in range(k)]
    rows = (idx * torch.tensor(strides, dtype=torch.long, device=data.device)).sum(-1)
    flat = data.reshape((math.prod(lead),) + tuple(data.shape[k:]))
    upd = updates.reshape((rows.numel(),) + tuple(data.shape[k:]))
    mode = _SCATTER_REDUCE[n.attr("reduction", "none")]
    if mode is None:
        out = flat.index_put((rows,), upd)
    else:
        index = rows.reshape((-1,) + (1,) * (flat.dim() - 1)).expand_as(upd)
        out = flat.scatter_reduce(0, index, upd, reduce=mode, include_self=True)
    return out.reshape(data.shape)


@op("GatherElements")
def gather_elements(n: Node, x, idx):
    """``torch.gather`` along ``axis`` with negative indices wrapped."""
    axis = axis_of(n.attr("axis", 0), x.dim())
    idx = idx.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@op("Shape")
def shape(n: Node, x):
    """The shape as int64, optionally ``[start:end]`` (opset 15)."""
    dims = list(x.shape)[n.attr("start", 0):n.attr("end")]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def size(n: Node, x):
    """Number of elements, as an int64 scalar."""
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def _check_cast(n: Node) -> None:
    torch_dtype(n.attr("to"), n)


@op("Cast", check=_check_cast)
def cast(n: Node, x):
    """Convert to element type ``to`` (float -> int truncates toward zero)."""
    return x.to(torch_dtype(n.attr("to")))


@op("CastLike")
def cast_like(n: Node, x, like):
    """Convert to the element type of the second input."""
    return x.to(like.dtype)


@op("Identity")
def identity(n: Node, x):
    """Pass-through."""
    return x


def _check_dropout(n: Node, consts: dict[str, np.ndarray]) -> None:
    """Refuse a Dropout that may run in training mode (opset 12's ``training_mode`` input, unless it
    is a constant false or ``ratio`` is a constant 0): its output is random, the bridge's pass-through
    would be a different function."""
    mode = n.inputs[2] if len(n.inputs) > 2 else ""
    if not mode or (mode in consts and not np.asarray(consts[mode]).any()):
        return
    ratio = n.inputs[1] if len(n.inputs) > 1 else ""
    if ratio and ratio in consts and not np.asarray(consts[ratio]).any():
        return
    why = "is true" if mode in consts else "is not a constant"
    raise n.fail(f"in training mode (its training_mode input {mode!r} {why}) is not supported by the bridge: "
                 "random dropout is not the inference function; export the model in eval mode")


@op("Dropout", const_check=_check_dropout)
def dropout(n: Node, x, ratio=None, training_mode=None):
    """Always a no-op: exported inference graphs hold Dropout only as a pass-through, and the
    bridge fine-tunes the deployed graph as it is. An optional mask output is what ONNX Runtime
    returns in inference: all true from opset 12, all false in 10-11, float zeros before."""
    if len([o for o in n.outputs if o]) > 1:
        if n.opset >= 12:
            return x, torch.ones_like(x, dtype=torch.bool)
        return x, torch.zeros_like(x, dtype=torch.bool if n.opset >= 10 else x.dtype)
    return x


@op("Expand")
def expand(n: Node, x, shape):
    """Broadcast to ``shape`` (bidirectionally: 1s in ``shape`` keep the input's dims)."""
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape))))


@op("Tile")
def tile(n: Node, x, repeats):
    """Repeat ``repeats[i]`` times along each dim."""
    return x.repeat(ints(repeats))


@op("Range")
def range_(n: Node, start, limit, delta):
    """``start + i * delta`` for ``i < max(ceil((limit - start) / delta), 0)``, in ``start``'s type."""
    s, lim, d = start.item(), limit.item(), delta.item()
    count = max(int(math.ceil((lim - s) / d)), 0)
    return start.reshape(()) + torch.arange(count, device=start.device, dtype=start.dtype) * delta.reshape(())


@op("Trilu")
def trilu(n: Node, x, k=None):
    """Upper (default) or lower triangle of the last two dims, offset by ``k``."""
    kk = int(k.item()) if k is not None else 0
    return torch.triu(x, kk) if n.attr("upper", 1) else torch.tril(x, kk)


@op("CumSum")
def cumsum(n: Node, x, axis):
    """Cumulative sum along ``axis`` (input), optionally ``exclusive`` and/or ``reverse``."""
    a = axis_of(int(axis.item()), x.dim())
    if n.attr("reverse", 0):
        x = x.flip(a)
    y = torch.cumsum(x, a, dtype=x.dtype)  # torch would widen int32 to int64
    if n.attr("exclusive", 0):
        y = y - x
    return y.flip(a) if n.attr("reverse", 0) else y


@op("NonZero")
def nonzero(n: Node, x):
    """Indices of the nonzero elements, shape ``[rank, count]``."""
    return torch.nonzero(x).t()


# ------------------------------------------------------------------------------- softmax, reduce

def _softmax_like(fn: Callable) -> OpFn:
    def f(n: Node, x):
        if n.opset >= 13:
            return fn(x, axis_of(n.attr("axis", -1), x.dim()))
        # before opset 13 the input is coerced to 2-D [prod(dims[:axis]), prod(dims[axis:])]
        axis = axis_of(n.attr("axis", 1), x.dim())
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)
    return f


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.softmax``; 16-bit floats step by step in their own precision (``exp(x - max) / sum``),
    as ONNX specifies it: the fused kernel computes in float32 and rounds once, an ULP away."""
    if x.dtype in (torch.float16, torch.bfloat16):
        e = torch.exp(x - x.amax(dim, keepdim=True))
        return e / e.sum(dim, keepdim=True)
    return torch.softmax(x, dim)


op("Softmax")(_softmax_like(_softmax))
op("LogSoftmax")(_softmax_like(lambda x, d: torch.log_softmax(x, d)))
op("Hardmax")(_softmax_like(_hardmax))
TABLE["Softmax"].__doc__ = "Softmax over ``axis`` (opset < 13: over the 2-D coercion at ``axis``, default 1)."
TABLE["LogSoftmax"].__doc__ = "Log-softmax, axis semantics as Softmax."
TABLE["Hardmax"].__doc__ = "One-hot of the first maximum, axis semantics as Softmax."


def _empty_reduce(x: torch.Tensor, dims: tuple[int, ...], keep: bool, value: float) -> torch.Tensor:
    """A reduction over an empty set: the operation's identity (ONNX: -inf for max, +inf for min;
    the dtype's lowest/highest value for integers, False/True for bool)."""
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keep else \
        [s for d, s in enumerate(x.shape) if d not in dims]
    if x.dtype == torch.bool:
        fill = value > 0
    elif x.is_floating_point():
        fill = value
    else:
        info = torch.iinfo(x.dtype)
        fill = info.max if value > 0 else info.min
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


def _reduce(fn: Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor], doc: str,
            empty: float | None = None) -> OpFn:
    """``empty``: the result of reducing an empty set where torch refuses to (max, min); the other
    reductions already give ONNX's identity (0 for sums, 1 for products, -inf for log-sum)."""
    def f(n: Node, x, axes=None):
        ax = ints_input_or_attr(n, axes, "axes")
        keep = bool(n.attr("keepdims", 1))
        if not ax:
            if n.attr("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        dims = tuple(sorted(axis_of(a, x.dim()) for a in ax))
        if empty is not None and any(x.shape[d] == 0 for d in dims):
            return _empty_reduce(x, dims, keep, empty)
        return fn(x, dims, keep)
    f.__doc__ = doc + " Over ``axes`` (attribute or input by opset; empty: all dims unless ``noop_with_empty_axes``), ``keepdims``."
    return f


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in dims:
        x = x.prod(d, keepdim=True)
    return x if keep else x.squeeze(dims)


op("ReduceMean")(_reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), "Mean."))
op("ReduceSum")(_reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), "Sum."))
op("ReduceMax")(_reduce(lambda x, d, k: x.amax(dim=d, keepdim=k), "Maximum.", empty=-math.inf))
op("ReduceMin")(_reduce(lambda x, d, k: x.amin(dim=d, keepdim=k), "Minimum.", empty=math.inf))
op("ReduceProd")(_reduce(_prod, "Product."))
op("ReduceL1")(_reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k), "Sum of absolute values."))
op("ReduceL2")(_reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(), "Euclidean norm."))
op("ReduceSumSquare")(_reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k), "Sum of squares."))
op("ReduceLogSum")(_reduce(lambda x, d, k: x.sum(dim=d, keepdim=k).log(), "Log of the sum."))
op("ReduceLogSumExp")(_reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), "Log-sum-exp."))


def _arg(fn: Callable) -> OpFn:
    def f(n: Node, x):
        axis = axis_of(n.attr("axis", 0), x.dim())
        keep = bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):
            return (x.shape[axis] - 1 - fn(x.flip(axis), axis, keep)).long()
        return fn(x, axis, keep)
    return f


op("ArgMax")(_arg(lambda x, a, k: torch.argmax(x, a, keepdim=k)))
op("ArgMin")(_arg(lambda x, a, k: torch.argmin(x, a, keepdim=k)))
TABLE["ArgMax"].__doc__ = "Index of the first (or last, ``select_last_index``) maximum along ``axis``."
TABLE["ArgMin"].__doc__ = "Index of the first (or last, ``select_last_index``) minimum along ``axis``."


@op("TopK")
def topk(n: Node, x, k=None):
    """The ``k`` largest (or smallest) values and their indices along ``axis`` (default -1). Equal
    values keep the lower index first, as ONNX requires (``torch.topk`` orders ties arbitrarily, so
    this is a stable sort cut to ``k``)."""
    axis = axis_of(n.attr("axis", -1), x.dim())
    kk = int(k.reshape(-1)[0].item()) if k is not None else int(n.attr("k"))
    values, indices = torch.sort(x, dim=axis, descending=bool(n.attr("largest", 1)), stable=True)
    return values.narrow(axis, 0, kk), indices.narrow(axis, 0, kk)


def onnx_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as python values (strings decoded, tensors as numpy)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = numpy_helper.to_array(a.t)
        elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
            out[a.name] = sparse_to_dense(a.sparse_tensor)
        elif a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = a  # control flow: rejected as an unsupported op
        else:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode("utf-8") for s in v]
            out[a.name] = v
    return out
