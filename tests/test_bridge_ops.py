"""Every op of the bridge's table against ONNX Runtime on tiny ``onnx.helper`` graphs, opset
variants included (attributes in old opsets, inputs in new ones)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxprune.bridge import TABLE, OnnxModule  # noqa: E402
from onnxprune.bridge.check import compare, ort_session  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class In:
    """A graph input fed with this exact value (ints, bools, or chosen floats)."""

    def __init__(self, value):
        self.value = np.asarray(value)


class Pos:
    """A random strictly positive float graph input (for Log, Sqrt ...)."""

    def __init__(self, *shape):
        self.shape = shape


def i64(*v):
    return np.array(v, dtype=np.int64)


def f32(*v):
    return np.array(v, dtype=np.float32)


def w(*shape, seed=1):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


CASES = []


def case(op_type, inputs, opset=17, outputs=1, tag="", **attrs):
    CASES.append(pytest.param(op_type, inputs, attrs, opset, outputs, id=f"{op_type}-op{opset}{'-' + tag if tag else ''}"))


def build(op_type, inputs, attrs, opset, outputs, seed=0):
    rng = np.random.default_rng(seed)
    graph_inputs, inits, feeds, names = [], [], {}, []
    for i, spec in enumerate(inputs):
        name = f"in{i}"
        if spec is None:
            names.append("")
            continue
        names.append(name)
        if isinstance(spec, tuple):
            spec = In(rng.standard_normal(spec).astype(np.float32))
        elif isinstance(spec, Pos):
            spec = In((np.abs(rng.standard_normal(spec.shape)) + 0.1).astype(np.float32))
        if isinstance(spec, In):
            feeds[name] = spec.value
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(spec.value.dtype), spec.value.shape))
        else:
            inits.append(numpy_helper.from_array(np.asarray(spec), name))
    outs = [f"out{k}" for k in range(outputs)]
    node = helper.make_node(op_type, names, outs, name=f"the_{op_type}", **attrs)
    g = helper.make_graph([node], "g", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model, feeds


# ---------------------------------------------------------------------------------------- cases
X4 = (2, 3, 6, 6)
case("Conv", [X4, w(4, 3, 3, 3), w(4)], pads=[1, 1, 1, 1])
case("Conv", [(1, 4, 9, 9), w(4, 2, 3, 3), None], tag="group-dil-asym", group=2, strides=[2, 2], dilations=[2, 1], pads=[1, 0, 2, 1])
case("Conv", [(1, 4, 8, 8), w(4, 1, 3, 3), w(4)], tag="depthwise", group=4, pads=[1, 1, 1, 1])
case("Conv", [(1, 3, 7, 7), w(2, 3, 3, 3)], tag="same-upper", auto_pad="SAME_UPPER", strides=[2, 2])
case("Conv", [(1, 3, 8, 8), w(2, 3, 4, 4)], tag="same-lower", auto_pad="SAME_LOWER", strides=[3, 3])
case("Conv", [(1, 3, 8, 8), w(2, 3, 3, 3)], tag="valid", auto_pad="VALID")
case("Conv", [(1, 3, 10), w(5, 3, 3), w(5)], tag="1d", pads=[1, 1])
case("Conv", [(1, 2, 5, 5, 5), w(3, 2, 3, 3, 3)], tag="3d", pads=[1] * 6, strides=[1, 2, 1])
case("Conv", [(1, 3, 8, 8), w(4, 3, 3, 3)], opset=9, tag="kernel-attr", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
case("ConvTranspose", [(1, 4, 5, 5), w(4, 3, 3, 3), w(3)], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
case("ConvTranspose", [(1, 4, 5, 5), w(4, 3, 3, 3)], tag="asym", strides=[2, 2], pads=[0, 1, 1, 0])
case("ConvTranspose", [(1, 4, 5, 5), w(4, 2, 3, 3), w(4)], tag="group-dil", group=2, dilations=[2, 2], strides=[1, 2])
case("ConvTranspose", [(1, 4, 5, 5), w(4, 3, 3, 3)], tag="output-shape", strides=[2, 2], output_shape=[10, 10])
case("ConvTranspose", [(1, 4, 5, 5), w(4, 3, 3, 3)], tag="same-upper", strides=[2, 2], auto_pad="SAME_UPPER")
case("ConvTranspose", [(1, 4, 5, 5), w(4, 3, 4, 4)], tag="same-lower", strides=[2, 2], auto_pad="SAME_LOWER")
case("ConvTranspose", [(1, 4, 7), w(4, 2, 3), w(2)], tag="1d", strides=[3], output_padding=[2])
case("Gemm", [(3, 5), w(5, 4), w(4)])
case("Gemm", [(5, 3), w(4, 5), w(3, 4)], tag="trans-alpha-beta", transA=1, transB=1, alpha=0.5, beta=2.0)
case("Gemm", [(3, 5), w(4, 5)], tag="no-c", transB=1)
case("MatMul", [(3, 4), w(4, 5)])
case("MatMul", [(2, 1, 3, 4), (5, 4, 6)], tag="batched")
case("MatMul", [(4,), (2, 4, 3)], tag="vector")
case("Einsum", [(2, 3, 4), (2, 4, 5)], opset=12, equation="bij,bjk->bik")
BN = [w(3), w(3), w(3), np.abs(w(3)) + 0.5]
case("BatchNormalization", [X4] + BN, epsilon=1e-3)
case("BatchNormalization", [X4] + BN, opset=9, tag="opset9", momentum=0.8)
case("BatchNormalization", [(4, 3)] + BN, tag="2d")
case("InstanceNormalization", [X4, w(3), w(3)])
case("GroupNormalization", [(2, 6, 4, 4), w(3), w(3)], opset=18, tag="per-group", num_groups=3)
case("GroupNormalization", [(2, 6, 4, 4), w(6), w(6)], opset=21, tag="per-channel", num_groups=3, epsilon=1e-3)
case("LayerNormalization", [(2, 5, 8), w(8), w(8)])
case("LayerNormalization", [(2, 3, 4, 4), w(3, 4, 4)], tag="axis1-nobias", axis=1)
case("LayerNormalization", [(2, 5, 8), w(8), w(8)], outputs=3, tag="stats")
case("RMSNormalization", [(2, 5, 8), w(8)], opset=23)
case("RMSNormalization", [(2, 3, 4, 4), w(3, 4, 4)], opset=23, tag="axis1", axis=1, epsilon=1e-3)
case("LRN", [X4], size=3, opset=9)
case("LRN", [(1, 6, 4, 4)], tag="size5", size=5, alpha=1e-2, beta=0.5, bias=2.0)
for name, extra in [("Relu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.7}), ("Celu", {"alpha": 1.5}),
                    ("Selu", {}), ("ThresholdedRelu", {"alpha": 0.3}), ("Sigmoid", {}),
                    ("HardSigmoid", {"alpha": 0.25, "beta": 0.4}), ("HardSwish", {}), ("Erf", {}), ("Tanh", {}),
                    ("Softplus", {}), ("Softsign", {}), ("Neg", {}), ("Abs", {}), ("Exp", {}), ("Floor", {}),
                    ("Ceil", {}), ("Round", {}), ("Sign", {}), ("Sin", {}), ("Cos", {}), ("IsNaN", {})]:
    case(name, [(2, 3, 4)], **extra)
case("Mish", [(2, 3, 4)], opset=18)
case("Gelu", [(2, 3, 4)], opset=20)
case("Gelu", [(2, 3, 4)], opset=20, tag="tanh", approximate="tanh")
for name in ("Sqrt", "Log", "Reciprocal"):
    case(name, [Pos(2, 3, 4)])
case("PRelu", [X4, np.abs(w(3, 1, 1)) * 0.2])
case("PRelu", [X4, f32(0.25)], tag="shared", opset=9)
case("Clip", [(2, 3, 4)], opset=9, tag="attrs", min=-0.5, max=0.6)
case("Clip", [(2, 3, 4), f32(0.0).reshape(()), f32(6.0).reshape(())], opset=13)
case("Clip", [(2, 3, 4), None, f32(0.3).reshape(())], opset=13, tag="max-only")
case("Clip", [(2, 3, 4)], opset=13, tag="none")
case("Not", [In(np.array([[True, False], [False, True]]))])
for name in ("Add", "Sub", "Mul", "Div"):
    case(name, [(2, 3, 4, 4), w(3, 1, 1)])
case("Add", [(2, 3), (3,)], opset=7, tag="opset7")
case("Div", [In(i64(-7, 7, 9, -9)), In(i64(2, -2, 4, 4))], tag="int-trunc")
case("Mod", [In(i64(-7, 7, 9, -9)), In(i64(2, -2, 4, 4))])
case("Mod", [(6,), In(f32(0.7, -0.7, 0.3, 0.5, -0.4, 1.1))], tag="fmod", fmod=1)
case("Pow", [Pos(2, 3), f32(2.0).reshape(())])
case("Pow", [Pos(2, 3), (2, 3)], tag="tensor")
case("Pow", [Pos(2, 3), np.array(3, dtype=np.int64)], tag="int-exp", opset=15)
case("Sum", [(2, 3), (2, 3), (3,)])
case("Sum", [(2, 3), (2, 3)], opset=6, tag="opset6")
case("Mean", [(2, 3), (2, 3), (2, 3)])
case("Max", [(2, 3), (3,), (2, 3)])
case("Min", [(2, 3), (2, 3)])
case("Equal", [In(i64(1, 2, 3)), In(i64(1, 0, 3))])
for name in ("Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
    case(name, [(3, 4), In(np.zeros((3, 4), np.float32))])
for name in ("And", "Or", "Xor"):
    case(name, [In(np.array([True, True, False, False])), In(np.array([True, False, True, False]))])
case("Where", [In(np.array([[True, False, True]])), (2, 3), (2, 1)])
case("MaxPool", [X4], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
case("MaxPool", [(1, 2, 7, 7)], tag="ceil", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
case("MaxPool", [(1, 2, 8, 8)], tag="ceil-pad", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
case("MaxPool", [(1, 2, 7, 7)], tag="asym", kernel_shape=[3, 3], pads=[0, 1, 2, 1])
case("MaxPool", [(1, 2, 9, 9)], tag="dilated", kernel_shape=[2, 2], dilations=[2, 2])
case("MaxPool", [(1, 2, 9)], tag="1d", kernel_shape=[3], strides=[2])
case("MaxPool", [(1, 2, 5, 5, 5)], tag="3d", kernel_shape=[2, 2, 2], strides=[2, 2, 2])
case("MaxPool", [(1, 2, 7, 7)], tag="same-upper", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")
case("MaxPool", [(1, 2, 7, 7)], opset=9, tag="opset9", kernel_shape=[3, 3], strides=[2, 2])
case("MaxPool", [(2, 3, 7, 6)], opset=12, tag="indices", outputs=2, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 2, 1],
     ceil_mode=1)
case("MaxPool", [(2, 3, 7, 6)], opset=12, tag="indices-column-major", outputs=2, kernel_shape=[2, 2], dilations=[2, 1],
     storage_order=1)
case("MaxPool", [(2, 2, 4, 5, 6)], opset=12, tag="indices-3d", outputs=2, kernel_shape=[2, 2, 2], pads=[1, 0, 1, 0, 1, 0])
case("AveragePool", [X4], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
case("AveragePool", [X4], tag="include-pad", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
case("AveragePool", [(1, 2, 7, 7)], tag="ceil", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
case("AveragePool", [(1, 2, 8, 8)], tag="ceil-pad", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)
case("AveragePool", [(1, 2, 7, 7)], tag="asym", kernel_shape=[3, 3], pads=[0, 1, 2, 1])
case("AveragePool", [(1, 2, 7, 7)], tag="asym-include", kernel_shape=[3, 3], pads=[0, 1, 2, 1], count_include_pad=1)
case("AveragePool", [(1, 2, 7, 7)], tag="same-lower", kernel_shape=[2, 2], auto_pad="SAME_LOWER")
case("AveragePool", [(1, 2, 9)], tag="1d", kernel_shape=[3], strides=[2], pads=[1, 1])
case("AveragePool", [(1, 2, 4, 4, 4)], tag="3d", kernel_shape=[2, 2, 2], strides=[2, 2, 2])
case("AveragePool", [(1, 2, 9, 9)], opset=19, tag="dilated", kernel_shape=[2, 3], dilations=[2, 2])
case("AveragePool", [(1, 2, 10, 9)], opset=19, tag="dilated-pads-ceil", kernel_shape=[3, 2], strides=[2, 3],
     dilations=[2, 3], pads=[1, 1, 2, 0], ceil_mode=1)
case("AveragePool", [(1, 2, 10, 9)], opset=19, tag="dilated-pads-ceil-include", kernel_shape=[3, 2], strides=[2, 3],
     dilations=[2, 3], pads=[1, 1, 2, 0], ceil_mode=1, count_include_pad=1)
case("AveragePool", [(1, 2, 11)], opset=19, tag="dilated-1d", kernel_shape=[3], strides=[2], dilations=[3], pads=[2, 1])
case("LpPool", [(1, 2, 9, 9)], opset=18, tag="dilated", kernel_shape=[2, 2], dilations=[2, 3], pads=[1, 1, 0, 1])
case("LpPool", [X4], kernel_shape=[2, 2], strides=[2, 2])
case("LpPool", [(1, 2, 7)], tag="p1-pads", kernel_shape=[3], p=1, pads=[1, 1])
case("LpPool", [(1, 2, 8, 7)], opset=18, tag="ceil-asym", kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0],
     ceil_mode=1)
case("MaxPool", [(1, 2, 7, 6)], opset=12, tag="ceil-asym", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 2, 1],
     ceil_mode=1)
case("AveragePool", [(1, 2, 7, 6)], opset=19, tag="ceil-asym", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 2, 1],
     ceil_mode=1)
case("AveragePool", [(1, 2, 7, 6)], opset=19, tag="ceil-asym-include", kernel_shape=[3, 2], strides=[2, 2],
     pads=[1, 0, 2, 1], ceil_mode=1, count_include_pad=1)
case("GlobalAveragePool", [X4])
case("GlobalMaxPool", [X4])
case("GlobalLpPool", [X4], p=3)
case("Pad", [X4], opset=9, tag="attrs", pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5)
case("Pad", [X4, i64(0, 0, 1, 2, 0, 0, 2, 1), f32(0.5).reshape(())], opset=13)
case("Pad", [X4, i64(0, 0, 2, 1, 0, 0, 1, 2)], opset=13, tag="reflect", mode="reflect")
case("Pad", [X4, i64(0, 0, 2, 1, 0, 0, 1, 2)], opset=13, tag="edge", mode="edge")
case("Pad", [X4, i64(0, 1, 0, 0, 0, 1, -1, 0)], opset=13, tag="negative-channel")
case("Pad", [(2, 3, 5), i64(1, 2), None, i64(-1)], opset=18, tag="axes")
case("Pad", [X4, i64(0, 0, 2, 1, 0, 0, 1, 2)], opset=19, tag="wrap", mode="wrap")
case("Pad", [(3, 4)], opset=2, tag="opset2-edge", pads=[1, 1, 1, 1], mode="edge")
R = (1, 2, 5, 6)
case("Resize", [R, f32(), f32(1, 1, 2, 2)], opset=11, tag="pytorch-nearest", mode="nearest",
     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
case("Resize", [R, f32(), f32(1, 1, 2, 2)], opset=11, tag="nearest-default", mode="nearest")
case("Resize", [R, None, None, i64(1, 2, 9, 4)], opset=13, tag="nearest-sizes", mode="nearest")
case("Resize", [R, None, None, i64(1, 2, 9, 4)], opset=13, tag="nearest-ceil", nearest_mode="ceil",
     coordinate_transformation_mode="tf_half_pixel_for_nn")
case("Resize", [R, None, None, i64(1, 2, 7, 13)], opset=13, tag="nearest-prefer-ceil", nearest_mode="round_prefer_ceil",
     coordinate_transformation_mode="align_corners")
case("Resize", [R, None, f32(1, 1, 2, 2)], opset=13, tag="linear-half-pixel", mode="linear")
case("Resize", [R, None, None, i64(1, 2, 9, 4)], opset=13, tag="linear-align-corners", mode="linear",
     coordinate_transformation_mode="align_corners")
case("Resize", [R, None, f32(1, 1, 0.5, 0.5)], opset=13, tag="linear-pytorch-half-pixel-down", mode="linear",
     coordinate_transformation_mode="pytorch_half_pixel")
case("Resize", [R, None, f32(1, 1, 1.5, 2.5)], opset=13, tag="linear-asymmetric", mode="linear",
     coordinate_transformation_mode="asymmetric")
case("Resize", [R, None, f32(1, 1, 2, 2)], opset=13, tag="cubic", mode="cubic")
case("Resize", [R, None, None, i64(1, 2, 8, 3)], opset=13, tag="cubic-exclude", mode="cubic", exclude_outside=1,
     cubic_coeff_a=-0.5)
case("Resize", [R, None, None, i64(8, 3)], opset=18, tag="axes-linear", mode="linear", axes=[2, 3])
case("Resize", [R, None, f32(1, 1, 1.7, 0.6)], opset=19, tag="half-pixel-symmetric", mode="linear",
     coordinate_transformation_mode="half_pixel_symmetric")
case("Resize", [R, None, f32(1, 1, 0.6, 0.5)], opset=18, tag="linear-antialias", mode="linear", antialias=1)
case("Resize", [R, None, None, i64(1, 2, 3, 2)], opset=18, tag="cubic-antialias", mode="cubic", antialias=1)
case("Resize", [R, None, None, i64(1, 2, 3, 3)], opset=18, tag="cubic-antialias-exclude", mode="cubic", antialias=1,
     exclude_outside=1)
case("Resize", [R, None, None, i64(7, 7)], opset=18, tag="not-larger", mode="linear", axes=[2, 3],
     keep_aspect_ratio_policy="not_larger")
case("Resize", [R, None, None, i64(7, 7)], opset=18, tag="not-smaller", mode="nearest", axes=[2, 3],
     keep_aspect_ratio_policy="not_smaller")
case("Resize", [R, f32(0, 0, 0.2, 0.1, 1, 1, 1.2, 0.7), None, i64(1, 2, 4, 5)], opset=13, tag="crop-and-resize",
     mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-2.0)
case("Resize", [R, f32(1, 1, 2, 3)], opset=10, tag="opset10", mode="nearest")
case("Resize", [R, f32(1, 1, 2, 2)], opset=10, tag="opset10-linear", mode="linear")
case("Upsample", [R, f32(1, 1, 2, 2)], opset=9, mode="nearest")
case("Upsample", [R, f32(1, 1, 2, 3)], opset=9, tag="linear", mode="linear")
case("Upsample", [R], opset=7, tag="attr", scales=[1.0, 1.0, 2.0, 2.0])
case("DepthToSpace", [(1, 8, 3, 3)], blocksize=2)
case("DepthToSpace", [(1, 8, 3, 3)], tag="crd", blocksize=2, mode="CRD")
case("SpaceToDepth", [(1, 2, 4, 6)], blocksize=2)
case("Concat", [(2, 3, 4), (2, 1, 4), (2, 2, 4)], axis=1)
case("Concat", [(2, 3), (2, 3)], axis=-1, tag="neg")
case("Split", [(2, 6, 4)], opset=11, outputs=2, tag="attr", axis=1, split=[2, 4])
case("Split", [(2, 6, 4), i64(1, 2, 3)], opset=13, outputs=3, axis=1)
case("Split", [(2, 6, 4)], opset=13, outputs=3, tag="equal", axis=-2)
case("Split", [(7, 2)], opset=18, outputs=3, tag="num-outputs", num_outputs=3)
case("Slice", [(5, 6, 7)], opset=9, tag="attrs", starts=[1, -4], ends=[4, 1000], axes=[0, 2])
case("Slice", [(5, 6, 7), i64(1, 0), i64(4, 6), i64(0, 1), i64(2, 3)], opset=13, tag="steps")
case("Slice", [(5, 6, 7), i64(-1, 4), i64(-1000, 0), i64(0, -1), i64(-2, -1)], opset=13, tag="negative-steps")
case("Slice", [(5, 6, 7), i64(2), i64(np.iinfo(np.int64).max)], opset=13, tag="no-axes")
case("Reshape", [(2, 3, 4), i64(0, -1)])
case("Reshape", [(2, 3, 4), i64(4, 0, 2)], tag="zero-mid", opset=13)
case("Reshape", [(2, 3, 4)], opset=4, tag="attr", shape=[6, 4])
case("Flatten", [(2, 3, 4, 5)])
case("Flatten", [(2, 3, 4, 5)], tag="axis0", axis=0)
case("Flatten", [(2, 3, 4, 5)], tag="axis-neg", axis=-1)
case("Transpose", [(2, 3, 4)], perm=[1, 2, 0])
case("Transpose", [(2, 3, 4)], tag="default")
case("Squeeze", [(2, 1, 3, 1)], opset=11, tag="attr", axes=[1])
case("Squeeze", [(2, 1, 3, 1), i64(-1, 1)], opset=13)
case("Squeeze", [(2, 1, 3, 1)], opset=13, tag="all")
case("Unsqueeze", [(2, 3)], opset=11, tag="attr", axes=[0, 3])
case("Unsqueeze", [(2, 3), i64(-1, 0)], opset=13)
case("Gather", [(5, 4), In(np.array(2, np.int64))], tag="scalar")
case("Gather", [(3, 5, 2), In(i64(0, -1, 2, 2).reshape(2, 2))], tag="axis1", axis=1)
case("GatherElements", [(3, 4), In(i64(0, -1, 2, 1, 3, 0).reshape(3, 2))], axis=1)
case("ScatterND", [(4, 3, 2), In(i64(2, -1).reshape(2, 1)), (2, 3, 2)], opset=13, tag="slices")
case("ScatterND", [(4, 3), In(i64(1, 2, 1, 2, 3, 0).reshape(3, 2)), (3,)], opset=16, tag="add-duplicates", reduction="add")
case("ScatterND", [(4, 3), In(i64(1, 2, 1, 2, 3, 0).reshape(3, 2)), (3,)], opset=16, tag="mul-duplicates", reduction="mul")
case("ScatterND", [(1, 4, 3), In(i64(0, 1, 0, 1, 0, 3).reshape(3, 2)), (3, 3)], opset=18, tag="max", reduction="max")
case("ScatterND", [(2, 4), In(i64(1, 0).reshape(2, 1)), (2, 4)], opset=18, tag="min", reduction="min")
case("Shape", [(2, 3, 4)])
case("Shape", [(2, 3, 4, 5)], opset=15, tag="start-end", start=1, end=-1)
case("Size", [(2, 3, 4)])
case("Cast", [(2, 3)], to=TensorProto.INT64)
case("Cast", [In(i64(1, 2, 0))], tag="to-bool", to=TensorProto.BOOL)
case("Cast", [In(i64(1, 2, 0))], tag="to-double", opset=6, to=TensorProto.DOUBLE)
case("CastLike", [In(i64(1, 2, 3)), f32(0)], opset=15)
case("Constant", [], value=numpy_helper.from_array(w(2, 3)))
case("Constant", [], tag="floats", opset=13, value_floats=[1.0, 2.5])
case("Constant", [], tag="int", opset=13, value_int=7)
case("ConstantOfShape", [In(i64(2, 3))], value=numpy_helper.from_array(f32(1.5)))
case("ConstantOfShape", [In(i64(2, 3))], tag="default")
case("Identity", [(2, 3)])
case("Dropout", [(2, 3), f32(0.3).reshape(())], opset=12)
case("Dropout", [(2, 3)], opset=10, tag="mask10", outputs=2, ratio=0.3)
case("Dropout", [(2, 3)], opset=13, tag="mask13", outputs=2)
case("Dropout", [(2, 3)], opset=9, tag="mask", outputs=2, ratio=0.3)
case("Expand", [(3, 1), i64(2, 1, 4)])
case("Tile", [(2, 3), i64(2, 3)])
case("Range", [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.7, np.float32)])
case("Range", [np.array(10, np.int64), np.array(2, np.int64), np.array(-3, np.int64)], tag="int")
case("Trilu", [(2, 4, 5)], opset=14)
case("Trilu", [(4, 5), np.array(-1, np.int64)], opset=14, tag="lower", upper=0)
case("CumSum", [(3, 4), np.array(1, np.int64)], opset=14)
case("CumSum", [(3, 4), np.array(0, np.int64)], opset=14, tag="excl-rev", exclusive=1, reverse=1)
case("NonZero", [In(np.array([[1, 0, 2], [0, 3, 0]], np.float32))])
case("TopK", [(3, 7), i64(3)], outputs=2, axis=1)
case("TopK", [(3, 7), i64(2)], outputs=2, tag="smallest", axis=0, largest=0)
case("TopK", [In(f32(3, 1, 3, 2, 1, 3, 0)), i64(4)], outputs=2, opset=11, tag="ties-lower-index-first")
case("TopK", [In(f32(3, 1, 3, 2, 1, 3, 0)), i64(3)], outputs=2, opset=11, tag="ties-smallest", largest=0)
case("ArgMax", [(3, 5)], axis=1, keepdims=0)
case("ArgMax", [In(np.array([[1, 3, 3], [2, 2, 0]], np.float32))], tag="last", select_last_index=1)
case("ArgMin", [(3, 5)], axis=-1)
case("Softmax", [X4], opset=11, tag="coerce-axis1", axis=1)
case("Softmax", [X4], opset=11, tag="coerce-default")
case("Softmax", [X4], opset=13, axis=1)
case("LogSoftmax", [X4], opset=11, tag="coerce-axis2", axis=2)
case("LogSoftmax", [X4], opset=13)
case("Hardmax", [(3, 5)], opset=13)
case("ReduceMean", [X4], opset=13, axes=[2, 3], keepdims=0)
case("ReduceMean", [X4, i64(-1)], opset=18, tag="input-axes")
case("ReduceSum", [X4, i64(1)], opset=13, keepdims=0)
case("ReduceSum", [X4], opset=11, tag="attr-all")
case("ReduceSum", [X4, np.zeros(0, np.int64)], opset=13, tag="noop", noop_with_empty_axes=1)
case("ReduceMax", [X4], opset=13, axes=[1])
case("ReduceMax", [X4, i64(1, 3)], opset=18, tag="input-axes", keepdims=0)
case("ReduceMin", [X4], opset=13, axes=[0, 2])
case("ReduceProd", [(2, 3, 4)], opset=13, axes=[1, 2], keepdims=0)
case("ReduceL1", [X4], opset=13, axes=[1])
case("ReduceL2", [X4], opset=13, axes=[2, 3])
case("ReduceSumSquare", [X4], opset=13, axes=[1])
case("ReduceLogSum", [Pos(2, 3, 4)], opset=13, axes=[2])
case("ReduceLogSumExp", [X4], opset=13, axes=[1])
# recurrent ops (the full grid of attributes against ONNX Runtime is in test_bridge_rnn.py)
SEQ = (5, 2, 3)  # [T, N, I]
case("LSTM", [SEQ, w(2, 16, 3), w(2, 16, 4), w(2, 32), In(np.array([5, 3], np.int32)), w(2, 2, 4), w(2, 2, 4),
              w(2, 12)], outputs=3, opset=14, tag="bidir-lens-peephole", hidden_size=4, direction="bidirectional")
case("GRU", [SEQ, w(1, 12, 3), w(1, 12, 4), w(1, 24)], outputs=2, opset=14, tag="reverse", hidden_size=4,
     direction="reverse")
case("GRU", [SEQ, w(1, 12, 3), w(1, 12, 4), w(1, 24)], outputs=2, opset=14, tag="linear-before-reset", hidden_size=4,
     linear_before_reset=1)
case("RNN", [SEQ, w(1, 4, 3), w(1, 4, 4), w(1, 8), None, w(1, 2, 4)], outputs=2, opset=14, tag="initial-h-clip",
     hidden_size=4, clip=0.5)


@pytest.mark.parametrize("op_type,inputs,attrs,opset,outputs", CASES)
def test_op_matches_onnxruntime(op_type, inputs, attrs, opset, outputs):
    model, feeds = build(op_type, inputs, attrs, opset, outputs)
    ref = ort_session(model).run(None, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        ours = module.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for k, r in enumerate(ref):
        got = ours[f"out{k}"]
        c = compare(got, r, rtol=1e-5, atol=1e-5)
        assert c["ok"], f"output {k}: {c} ours={got.detach().numpy().ravel()[:8]} ort={np.asarray(r).ravel()[:8]}"
        assert got.dtype == torch.from_numpy(np.asarray(r)).dtype, f"output {k}: dtype {got.dtype}, ONNX Runtime {r.dtype}"


GRAD_CASES = ["Conv-op17-group-dil-asym", "ConvTranspose-op17-asym", "Gemm-op17-trans-alpha-beta", "MatMul-op17-batched",
              "BatchNormalization-op17", "LayerNormalization-op17-axis1-nobias", "GroupNormalization-op18-per-group",
              "LRN-op9", "PRelu-op17", "AveragePool-op17-asym", "MaxPool-op17-ceil-pad", "LpPool-op17",
              "Pad-op13-reflect", "Resize-op13-linear-half-pixel", "Resize-op13-cubic", "Resize-op11-pytorch-nearest",
              "Slice-op13-negative-steps", "Split-op18-num-outputs", "Softmax-op11-coerce-axis1", "ReduceL2-op13",
              "Where-op17", "Expand-op17", "Mish-op18", "HardSigmoid-op17", "Selu-op17", "Einsum-op12",
              "LSTM-op14-bidir-lens-peephole", "GRU-op14-reverse", "GRU-op14-linear-before-reset"]


@pytest.mark.parametrize("case_id", GRAD_CASES)
def test_op_gradients(case_id):
    """Backward through the op is the derivative of its forward (float64 gradcheck on every float input)."""
    param = next(c for c in CASES if c.id == case_id)
    model, feeds = build(*param.values)
    module = OnnxModule(model).double()
    names = sorted(feeds)
    xs = [torch.from_numpy(feeds[k]).double().requires_grad_(feeds[k].dtype.kind == "f") if feeds[k].dtype.kind == "f"
          else torch.from_numpy(feeds[k]) for k in names]

    def f(*args):
        out = module.run(dict(zip(names, args)))
        return tuple(out[o] for o in module.output_names if out[o].is_floating_point())

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-5)
    weights = [p for p in module.parameters()]
    if weights:
        loss = sum(o.sum() for o in f(*xs))
        loss.backward()
        assert all(p.grad is not None for p in weights)


def test_every_table_op_has_a_case():
    covered = {c.values[0] for c in CASES}
    assert sorted(set(TABLE) - covered) == []


def test_unknown_op_fails_at_construction():
    from onnxprune.core.errors import OnnxPruneError

    model, _ = build("Det", [(3, 3)], {}, 17, 1)
    with pytest.raises(OnnxPruneError, match=r"bridge: op Det \(node the_Det\) is not supported"):
        OnnxModule(model)


def test_unsupported_mode_fails_at_construction():
    from onnxprune.core.errors import OnnxPruneError

    model, _ = build("Resize", [R, None, f32(1, 1, 2, 2)], {"coordinate_transformation_mode": "tf_crop_and_resize"}, 13, 1)
    with pytest.raises(OnnxPruneError, match="coordinate_transformation_mode"):
        OnnxModule(model)
    model, _ = build("MaxPool", [X4], {"kernel_shape": [2, 2]}, 13, 3)
    with pytest.raises(OnnxPruneError, match="not supported"):
        OnnxModule(model)
