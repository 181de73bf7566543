"""Each propagation rule on its own, on tiny ``onnx.helper`` graphs.

Every graph starts from a Conv (the producer whose channels are followed), goes through the op
under test, and ends in a consumer. Besides the group structure, exact rules are run through the
equivalence oracle (zero the removed channels' consumers in the original, prune, compare).
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from arch_zoo import random_plan, zero_removed_inputs
from conftest import random_feeds, run_ort
from onnxprune.channels.analyze import analyze_channels
from onnxprune.channels.rewrite import apply_plan
from onnxprune.channels.rules import RULES, reshape_mapping, rule_for
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.prepare import prepare

RNG = np.random.default_rng(0)


def W(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def I64(*v):
    return np.array(v, dtype=np.int64)


def F32(*v):
    return np.array(v, dtype=np.float32)


def build(nodes, inits: dict, x_shape=(1, 3, 6, 6), outputs=("y",), opset=17, inputs=None, domains=()):
    """Model from nodes; initializers as a dict; output shapes left to inference."""
    ins = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    for i, n in enumerate(nodes):
        n.name = n.name or f"{n.op_type.lower()}{i}"
    g = helper.make_graph(nodes, "t", ins, outs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 8 if opset < 21 else 10
    return m


def analyze(model):
    prep = prepare(model)
    return prep, analyze_channels(prep.view)


def group_of(an, tensor, role="out"):
    return next(g for g in an.groups if any(m.tensor == tensor and m.role == role for m in g.members))


def member(group, tensor, role=None):
    return next(m for m in group.members if m.tensor == tensor and (role is None or m.role == role))


def oracle(prep, an, seed=0, exact_only=True):
    """Prune about half of every prunable (exact) group; outputs must match the zeroed original."""
    groups = [g for g in an.prunable if g.exact or not exact_only]
    plan = random_plan(an, np.random.default_rng(seed), groups=groups)
    pruned = apply_plan(prep.model, an, plan)
    feeds = random_feeds(prep.model, seed=seed)
    ref = run_ort(zero_removed_inputs(prep.model, an, plan), feeds)
    out = run_ort(pruned, feeds)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return pruned, plan


def conv(x, w, y, **kw):
    return helper.make_node("Conv", [x, w] + ([kw.pop("b")] if "b" in kw else []), [y], **kw)


def head(x, c_in, y="y", c_out=2):
    """Consumer 1x1 conv: reads every channel of ``x`` (its "in" member is what the oracle zeroes)."""
    return conv(x, f"w_{y}", y), {f"w_{y}": W(c_out, c_in, 1, 1)}


# ------------------------------------------------------------------------------ table


def test_rule_table_covers_the_required_ops():
    required = """Conv ConvTranspose Gemm MatMul BatchNormalization InstanceNormalization GroupNormalization
    LayerNormalization PRelu Relu Clip Sigmoid HardSigmoid HardSwish Gelu Erf Tanh LeakyRelu Elu Selu Softplus
    Mish Neg Abs Sqrt Exp Log Reciprocal Dropout Identity Cast MaxPool AveragePool GlobalAveragePool
    GlobalMaxPool LpPool Pad Resize Upsample Softmax LogSoftmax ReduceMean Add Sub Mul Div Sum Max Min Pow
    Concat Split Slice Reshape Flatten Transpose Squeeze Unsqueeze Gather""".split()
    assert not [op for op in required if op not in RULES]
    assert all(RULES[op].__doc__ for op in RULES)
    assert rule_for(helper.make_node("Relu", ["a"], ["b"], domain="custom")).__name__ == "rule_unknown"


# ------------------------------------------------------------------------------ producers


def test_conv_out_in_and_bias_members():
    nodes = [conv("x", "w0", "c0", b="b0"), helper.make_node("Relu", ["c0"], ["r"])]
    h, hw = head("r", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "b0": W(4), **hw}))
    g = group_of(an, "w0")
    assert g.size == 4 and g.prunable
    assert (member(g, "w0").axis, member(g, "b0").role, member(g, "w_y").axis) == (0, "param", 1)
    assert member(g, "w_y").role == "in"
    oracle(prep, an)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_couples_and_rewrites_group(mult):
    nodes = [conv("x", "w0", "c0"), conv("c0", "dw", "d", b="db", group=4, pads=[1, 1, 1, 1])]
    h, hw = head("d", 4 * mult)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 1, 1), "dw": W(4 * mult, 1, 3, 3), "db": W(4 * mult), **hw}))
    g = group_of(an, "w0")
    dw = member(g, "dw")
    assert dw.role == "out" and dw.positions == tuple(tuple(range(k * mult, (k + 1) * mult)) for k in range(4))
    pruned, plan = oracle(prep, an)
    kept = len(plan[g.id])
    node = next(n for n in pruned.graph.node if n.name == "conv1")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == kept


def test_grouped_conv_blocks_and_balanced_plans():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Relu", ["c0"], ["r0"]),
             conv("r0", "gw", "g", group=2, pads=[1, 1, 1, 1]), helper.make_node("Relu", ["g"], ["r1"])]
    h, hw = head("r1", 6)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 1, 1), "gw": W(6, 2, 3, 3), **hw}))
    gin, gout = group_of(an, "w0"), group_of(an, "gw")
    assert gin.blocks == 2 and gout.blocks == 2 and member(gin, "gw").groups == 2
    oracle(prep, an)
    with pytest.raises(OnnxPruneError, match="equal counts"):
        apply_plan(prep.model, an, {gin.id: np.array([0, 1, 2])})


def test_conv_transpose_axes():
    nodes = [conv("x", "w0", "c0"), helper.make_node("ConvTranspose", ["c0", "tw", "tb"], ["t"], strides=[2, 2])]
    h, hw = head("t", 5)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 1, 1), "tw": W(4, 5, 2, 2), "tb": W(5), **hw}))
    assert member(group_of(an, "w0"), "tw").axis == 0
    g = group_of(an, "tw")
    assert member(g, "tw", "out").axis == 1 and member(g, "tb").role == "param"
    oracle(prep, an)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_axes(trans_b):
    w1 = W(5, 4) if trans_b else W(4, 5)
    w2 = W(2, 5) if trans_b else W(5, 2)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=trans_b)]
    prep, an = analyze(build(nodes, {"w1": w1, "b1": W(5), "w2": w2}, x_shape=(2, 4)))
    g = group_of(an, "w1")
    assert member(g, "w1", "out").axis == (0 if trans_b else 1)
    assert member(g, "w2", "in").axis == (1 if trans_b else 0)
    oracle(prep, an)


def test_matmul_2d_and_batched_weights():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    prep, an = analyze(build(nodes, {"w1": W(2, 4, 6), "b1": W(6), "w2": W(6, 3)}, x_shape=(2, 5, 4)))
    g = group_of(an, "w1")
    assert member(g, "w1", "out").axis == 2 and member(g, "b1").role == "param" and member(g, "w2").axis == 0
    oracle(prep, an)


def test_normalizations():
    nodes = [conv("x", "w0", "c0"),
             helper.make_node("BatchNormalization", ["c0", "s", "bb", "m", "v"], ["bn"]),
             helper.make_node("InstanceNormalization", ["bn", "s2", "b2"], ["inn"]),
             helper.make_node("PRelu", ["inn", "slope"], ["p"])]
    h, hw = head("p", 4)
    inits = {"w0": W(4, 3, 3, 3), "s": W(4), "bb": W(4), "m": W(4), "v": np.abs(W(4)) + 0.5, "s2": W(4), "b2": W(4),
             "slope": W(4, 1, 1), **hw}
    prep, an = analyze(build(nodes + [h], inits))
    g = group_of(an, "w0")
    assert {m.tensor for m in g.members_with_role("param")} == {"s", "bb", "m", "v", "s2", "b2", "slope"}
    assert g.exact
    oracle(prep, an)


def test_groupnorm_blocks_and_inexact():
    nodes = [conv("x", "w0", "c0"), helper.make_node("GroupNormalization", ["c0", "gs", "gb"], ["gn"], num_groups=2)]
    h, hw = head("gn", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "gs": W(4), "gb": W(4), **hw}, opset=21))
    g = group_of(an, "w0")
    assert g.prunable and not g.exact and g.blocks == 2
    pruned = apply_plan(prep.model, an, {g.id: I64(0, 2)})  # one channel per block
    assert run_ort(pruned, random_feeds(prep.model))[0].shape == (1, 2, 4, 4)
    with pytest.raises(OnnxPruneError, match="equal counts"):
        apply_plan(prep.model, an, {g.id: I64(0, 1)})


@pytest.mark.parametrize("axis,inexact", [(-1, True), (2, False)])
def test_layernorm_over_channel_axis_or_not(axis, inexact):
    # x: [B, T, D] -> Linear -> LayerNorm(axis) ; with axis=2 of a [B, D, T] layout the channels are not normalized
    if inexact:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
                 helper.make_node("LayerNormalization", ["h", "ls", "lb"], ["n"], axis=axis),
                 helper.make_node("MatMul", ["n", "w2"], ["y"])]
        inits = {"w1": W(4, 6), "ls": W(6), "lb": W(6), "w2": W(6, 3)}
    else:
        nodes = [conv("x", "w1", "h"), helper.make_node("LayerNormalization", ["h", "ls", "lb"], ["n"], axis=axis),
                 conv("n", "w2", "y")]
        inits = {"w1": W(6, 4, 1, 1), "ls": W(5, 5), "lb": W(5, 5), "w2": W(3, 6, 1, 1)}
    prep, an = analyze(build(nodes, inits, x_shape=(1, 5, 4) if inexact else (1, 4, 5, 5)))
    g = group_of(an, "w1")
    assert g.prunable and g.exact is (not inexact)
    assert ("ls" in {m.tensor for m in g.members_with_role("param")}) is inexact
    if not inexact:
        oracle(prep, an)


# ------------------------------------------------------------------------------ pass-through


def test_unary_chain_passes_channels():
    ops = ["Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Tanh", "LeakyRelu", "Elu", "Selu", "Softplus",
           "Mish", "Neg", "Abs", "Exp", "Sigmoid", "Sqrt", "Reciprocal", "Log", "Cast", "Identity", "Dropout"]
    nodes, prev = [conv("x", "w0", "c0")], "c0"
    for i, op in enumerate(ops):
        kw = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [prev], [f"u{i}"], **kw))
        prev = f"u{i}"
    nodes.append(helper.make_node("Clip", [prev, "lo", "hi"], ["cl"]))
    h, hw = head("cl", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "lo": F32(0.1), "hi": F32(5.0), **hw}, opset=20))
    g = group_of(an, "w0")
    assert g.prunable and member(g, "w_y").role == "in"
    oracle(prep, an)


def test_pooling_pad_resize_pass():
    nodes = [conv("x", "w0", "c0"),
             helper.make_node("MaxPool", ["c0"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[1, 1]),
             helper.make_node("LpPool", ["ap"], ["lp"], kernel_shape=[1, 1]),
             helper.make_node("Pad", ["lp", "pads"], ["pd"]),
             helper.make_node("Resize", ["pd", "", "scales"], ["rs"], mode="nearest")]
    h, hw = head("rs", 4)
    inits = {"w0": W(4, 3, 3, 3), "pads": I64(0, 0, 1, 1, 0, 0, 1, 1), "scales": F32(1, 1, 2, 2), **hw}
    prep, an = analyze(build(nodes + [h], inits))
    assert group_of(an, "w0").prunable
    oracle(prep, an)


@pytest.mark.parametrize("case", ["pad_channels", "resize_channels", "softmax_channels", "softmax_old_opset",
                                  "argmax_channels", "unknown_op", "custom_domain", "slice_step2",
                                  "depth_to_space"])
def test_unprunable_cases_name_node_and_op(case):
    opset, domains = 17, ()
    inits = {"w0": W(4, 3, 3, 3)}
    if case == "pad_channels":
        n = helper.make_node("Pad", ["c0", "pads"], ["z"], name="thepad")
        inits["pads"] = I64(0, 1, 0, 0, 0, 1, 0, 0)
    elif case == "resize_channels":
        n = helper.make_node("Resize", ["c0", "", "scales"], ["z"], name="thepad")
        inits["scales"] = F32(1, 2, 1, 1)
    elif case == "softmax_channels":
        n = helper.make_node("Softmax", ["c0"], ["z"], axis=1, name="thepad")
    elif case == "softmax_old_opset":  # opset < 13 flattens axes 1.. together
        n, opset = helper.make_node("Softmax", ["c0"], ["z"], axis=1, name="thepad"), 11
    elif case == "argmax_channels":
        n = helper.make_node("ArgMax", ["c0"], ["z0"], axis=1, name="thepad")
    elif case == "unknown_op":
        n = helper.make_node("DepthToSpace", ["c0"], ["z"], blocksize=2, name="thepad")
    elif case == "custom_domain":
        n, domains = helper.make_node("MyOp", ["c0"], ["z"], domain="my.ops", name="thepad"), ("my.ops",)
    elif case == "slice_step2":
        n = helper.make_node("Slice", ["c0", "st", "en", "ax", "sp"], ["z"], name="thepad")
        inits.update(st=I64(0), en=I64(4), ax=I64(1), sp=I64(2))
    else:
        n = helper.make_node("SpaceToDepth", ["c0"], ["z"], blocksize=2, name="thepad")
    nodes = [conv("x", "w0", "c0", pads=[1, 1, 1, 1]), n, helper.make_node("Relu", ["z"], ["y"])]
    if case == "argmax_channels":
        nodes.insert(2, helper.make_node("Cast", ["z0"], ["z"], to=TensorProto.FLOAT))
    m = build(nodes, inits, opset=opset, domains=domains)
    _, an = analyze(m)
    g = group_of(an, "w0")
    assert not g.prunable and "thepad" in g.reason and n.op_type in g.reason


def test_decomposed_layernorm_is_prunable_but_inexact():
    """Opset < 17 exporters spell LayerNorm out: ReduceMean over C, Sub, Pow, ReduceMean, Add, Sqrt, Div."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]), helper.make_node("Sub", ["h", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["ng"]),
             helper.make_node("Add", ["ng", "beta"], ["nb"]), helper.make_node("MatMul", ["nb", "w2"], ["y"])]
    inits = {"w1": W(4, 6), "two": F32(2.0), "eps": F32(1e-5), "gamma": W(6), "beta": W(6), "w2": W(6, 3)}
    prep, an = analyze(build(nodes, inits, x_shape=(1, 5, 4), opset=13))
    g = group_of(an, "w1")
    assert g.prunable and not g.exact and "statistic over the channel axis" in g.inexact_reason
    assert {"gamma", "beta"} <= {m.tensor for m in g.members_with_role("param")}
    pruned = apply_plan(prep.model, an, {g.id: I64(0, 2, 5)})
    assert run_ort(pruned, random_feeds(prep.model))[0].shape == (1, 5, 3)


def test_softmax_and_reduce_over_other_axes_pass():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Softmax", ["c0"], ["s"], axis=3),
             helper.make_node("ReduceMean", ["s", "axes"], ["r"], keepdims=0),
             helper.make_node("Unsqueeze", ["r", "uax"], ["u"])]
    h, hw = head("u", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "axes": I64(3), "uax": I64(3), **hw}, opset=18))
    g = group_of(an, "w0")
    assert g.prunable and member(g, "r", "act").axis == 1
    oracle(prep, an)


# ------------------------------------------------------------------------------ elementwise


def test_residual_add_unites_and_constants_become_params():
    nodes = [conv("x", "w0", "a"), conv("x", "w1", "b"), helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["m"]), helper.make_node("Add", ["m", "shift"], ["t"]),
             helper.make_node("Mul", ["t", "two"], ["u"]), helper.make_node("Sum", ["u", "a", "b"], ["v"])]
    h, hw = head("v", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "w1": W(4, 3, 3, 3), "scale": W(4, 1, 1),
                                           "shift": W(1, 4, 1, 1), "two": F32(2.0), **hw}))
    g = group_of(an, "w0")
    assert g is group_of(an, "w1")
    assert member(g, "scale").axis == 0 and member(g, "shift").axis == 1
    assert "two" not in {m.tensor for m in g.members}
    oracle(prep, an)


def test_broadcast_spatial_map_and_se_gate():
    nodes = [conv("x", "w0", "a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ar"]),
             conv("ar", "ws", "sp"), helper.make_node("Sigmoid", ["sp"], ["spg"]),  # [N,1,H,W] map
             helper.make_node("Mul", ["ar", "spg"], ["m"]),
             helper.make_node("GlobalAveragePool", ["m"], ["gp"]), conv("gp", "wse", "se"),
             helper.make_node("Sigmoid", ["se"], ["seg"]), helper.make_node("Mul", ["m", "seg"], ["g"])]
    h, hw = head("g", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "ws": W(1, 4, 1, 1), "wse": W(4, 4, 1, 1), **hw}))
    g = group_of(an, "w0")
    assert g.prunable and g is group_of(an, "wse")  # SE scale [N,C,1,1] goes with the channels
    assert member(g, "ws").role == "in"  # the spatial conv reads the channels ...
    assert not group_of(an, "ws").prunable  # ... and its 1-channel map is broadcast, never pruned
    oracle(prep, an)


def test_add_with_model_input_is_unprunable():
    nodes = [conv("x", "w0", "a", pads=[1, 1, 1, 1]), helper.make_node("Add", ["a", "x"], ["y"])]
    _, an = analyze(build(nodes, {"w0": W(3, 3, 3, 3)}))
    g = group_of(an, "w0")
    assert not g.prunable and "model input 'x'" in g.reason


def test_add_with_untracked_full_tensor_is_unprunable():
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4, 4, 4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    nodes = [conv("x", "w0", "a"), helper.make_node("Add", ["a", "x2"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    _, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3)}, inputs=[x, x2]))
    assert "model input 'x2'" in group_of(an, "w0").reason


# ------------------------------------------------------------------------------ index mapping


def test_concat_offsets_and_slice_window():
    nodes = [conv("x", "w0", "a"), conv("x", "w1", "b"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Slice", ["c", "st", "en", "ax"], ["s"]), helper.make_node("Relu", ["c"], ["r"])]
    h, hw = head("s", 4)
    h2, hw2 = head("r", 7, y="y2")
    prep, an = analyze(build(nodes + [h, h2], {"w0": W(3, 3, 3, 3), "w1": W(4, 3, 3, 3), "st": I64(2), "en": I64(-1),
                                              "ax": I64(1), **hw, **hw2}, outputs=("y", "y2")))
    ga, gb = group_of(an, "w0"), group_of(an, "w1")
    assert member(gb, "w_y2").positions == tuple((3 + k,) for k in range(4))
    assert [p for p in member(ga, "w_y").positions] == [(), (), (0,)]  # channel 2 of a is position 0 of the slice
    assert [p for p in member(gb, "w_y").positions] == [(1,), (2,), (3,), ()]
    oracle(prep, an)
    oracle(prep, an, seed=5)


@pytest.mark.parametrize("opset,style", [(11, "attr"), (13, "input"), (18, "num_outputs")])
def test_split_sizes_across_opsets(opset, style):
    inits = {"w0": W(6, 3, 3, 3)}
    if style == "attr":
        sp = helper.make_node("Split", ["c"], ["s0", "s1"], axis=1, split=[2, 4])
    elif style == "input":
        sp = helper.make_node("Split", ["c", "sizes"], ["s0", "s1"], axis=1)
        inits["sizes"] = I64(2, 4)
    else:
        sp = helper.make_node("Split", ["c"], ["s0", "s1"], axis=1, num_outputs=2)
    n0 = 2 if style != "num_outputs" else 3
    h0, hw0 = head("s0", n0, y="y")
    h1, hw1 = head("s1", 6 - n0, y="y2")
    prep, an = analyze(build([conv("x", "w0", "c"), sp, h0, h1], {**inits, **hw0, **hw1}, opset=opset,
                             outputs=("y", "y2")))
    g = group_of(an, "w0")
    assert tuple(range(n0)) in g.keep_one_of and tuple(range(n0, 6)) in g.keep_one_of
    oracle(prep, an)
    with pytest.raises(OnnxPruneError, match="every channel|empties"):
        apply_plan(prep.model, an, {g.id: np.arange(n0, 6)})


def test_flatten_reshape_expansion_positions():
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "shp"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    prep, an = analyze(build(nodes, {"w0": W(3, 3, 3, 3), "shp": I64(0, -1), "fw": W(2, 48)}))
    fw = member(group_of(an, "w0"), "fw")
    assert fw.positions == tuple(tuple(range(16 * c, 16 * c + 16)) for c in range(3))
    oracle(prep, an)


def test_reshape_explicit_target_is_rewritten():
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "shp"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1)]
    prep, an = analyze(build(nodes, {"w0": W(3, 3, 3, 3), "shp": I64(1, 48), "fw": W(2, 48)}))
    pruned, plan = oracle(prep, an)
    shp = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "shp")
    assert shp.tolist() == [1, 16 * len(plan[group_of(an, "w0").id])]


def test_transpose_moves_channel_axis():
    nodes = [conv("x", "w0", "c"), helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "mw"], ["y"])]
    prep, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3), "mw": W(4, 2)}))
    g = group_of(an, "w0")
    assert member(g, "t", "act").axis == 3 and member(g, "mw").axis == 0
    oracle(prep, an)


def test_channel_shuffle_permutation():
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "s1"], ["r1"]),
             helper.make_node("Transpose", ["r1"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s2"], ["r2"])]
    h, hw = head("r2", 6)
    prep, an = analyze(build(nodes + [h], {"w0": W(6, 3, 3, 3), "s1": I64(1, 2, 3, 4, 4), "s2": I64(1, 6, 4, 4),
                                           **hw}))
    g = group_of(an, "w0")
    # channels j and 3+j go together (same position in both shuffle groups): 3 group channels
    assert g.size == 3 and member(g, "w0").positions == ((0, 3), (1, 4), (2, 5))
    assert member(g, "w_y").positions == ((0, 1), (2, 3), (4, 5))
    oracle(prep, an)


def test_irregular_reshape_is_unprunable():
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "s1"], ["r1"]),
             helper.make_node("Relu", ["r1"], ["y"])]
    _, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3), "s1": I64(1, 2, 32)}))
    assert "mixes the channel axis" in group_of(an, "w0").reason


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_attr_and_input(opset):
    if opset < 13:
        sq = helper.make_node("Squeeze", ["gp"], ["s"], axes=[2, 3])
        us = helper.make_node("Unsqueeze", ["g"], ["u"], axes=[2, 3])
        extra = {}
    else:
        sq = helper.make_node("Squeeze", ["gp", "ax"], ["s"])
        us = helper.make_node("Unsqueeze", ["g", "ax"], ["u"])
        extra = {"ax": I64(2, 3)}
    nodes = [conv("x", "w0", "c"), helper.make_node("GlobalAveragePool", ["c"], ["gp"]), sq,
             helper.make_node("Gemm", ["s", "gw"], ["g"], transB=1), us, helper.make_node("Mul", ["c", "u"], ["m"])]
    h, hw = head("m", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "gw": W(4, 4), **extra, **hw}, opset=opset))
    g = group_of(an, "w0")
    assert g is group_of(an, "gw") and member(g, "gw", "in").axis == 1
    oracle(prep, an)


def test_gather_of_channels():
    nodes = [conv("x", "w0", "c"), helper.make_node("Gather", ["c", "idx"], ["g"], axis=1)]
    h, hw = head("g", 3)
    prep, an = analyze(build(nodes + [h], {"w0": W(5, 3, 3, 3), "idx": I64(4, 0, 2), **hw}))
    g = group_of(an, "w0")
    assert member(g, "w_y").positions == ((1,), (), (2,), (), (0,))
    oracle(prep, an)
    oracle(prep, an, seed=3)


def test_gather_scalar_index_pins_channel():
    nodes = [conv("x", "w0", "c"), helper.make_node("Gather", ["c", "i"], ["y"], axis=1)]
    _, an = analyze(build(nodes, {"w0": W(5, 3, 3, 3), "i": np.array(2, dtype=np.int64)}))
    assert "picks this channel" in group_of(an, "w0").reason


# ------------------------------------------------------------------------------ boundaries


def test_channels_reaching_graph_output_are_unprunable():
    _, an = analyze(build([conv("x", "w0", "y")], {"w0": W(4, 3, 3, 3)}))
    assert group_of(an, "w0").reason == "reaches model output 'y'"


def test_shared_weight_is_unprunable():
    nodes = [conv("x", "w0", "a"), conv("x", "w0", "b"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1)]
    h, hw = head("c", 8)
    _, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), **hw}))
    assert "shared" in group_of(an, "w0").reason


def test_dynamic_shape_reshape_is_unprunable():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "s"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    _, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3)}, inputs=[x, s]))
    assert "not static" in group_of(an, "w0").reason


def test_invalid_plans_are_rejected():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Relu", ["c0"], ["r"])]
    h, hw = head("r", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), **hw}))
    g = group_of(an, "w0")
    head_group = group_of(an, "w_y")
    for plan, msg in [({g.id: I64()}, "keeps no channel"), ({g.id: I64(0, 4)}, r"\[0, 4\)"),
                      ({g.id: I64(1, 1)}, "duplicate"), ({99: I64(0)}, "does not have"),
                      ({head_group.id: I64(0)}, "unprunable"), ({g.id: np.array([0.5])}, "integers")]:
        with pytest.raises(OnnxPruneError, match=msg):
            apply_plan(prep.model, an, plan)


def test_reshape_mapping_cases():
    assert reshape_mapping((1, 3, 2, 2), 1, (1, 12))[0:2] == ("map", 1)
    kind, axis, chan = reshape_mapping((1, 4, 2), 1, (1, 2, 2, 2))
    assert (kind, axis, chan) == ("split", 2, [[0, 2], [1, 3]])
    assert reshape_mapping((1, 4, 2), 1, (1, 2, 4)) is None
    kind, axis, chan = reshape_mapping((1, 2, 3), 2, (1, 6))  # channels minor: strided positions
    assert kind == "map" and list(chan) == [0, 1, 2, 0, 1, 2]


def test_grouped_conv_transpose():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Relu", ["c0"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "tw"], ["t"], group=2, strides=[2, 2])]
    h, hw = head("t", 6)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 1, 1), "tw": W(4, 3, 2, 2), **hw}))
    gin, gout = group_of(an, "w0"), group_of(an, "tw")
    assert gin.blocks == 2 and gout.blocks == 2 and member(gout, "tw", "out").groups == 2
    oracle(prep, an)
    oracle(prep, an, seed=4)


def test_resize_with_sizes_is_rewritten():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Resize", ["c0", "", "", "sizes"], ["rs"], mode="nearest")]
    h, hw = head("rs", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "sizes": I64(1, 4, 8, 8), **hw}))
    pruned, plan = oracle(prep, an)
    sizes = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "sizes")
    assert sizes.tolist() == [1, len(plan[group_of(an, "w0").id]), 8, 8]


def test_matmul_constant_on_the_left():
    # y = W @ X with X [B, K, N] channels on axis -2 (e.g. a token-mixing layer written as W @ X)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["w1", "xt"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["w2", "r"], ["y"])]
    prep, an = analyze(build(nodes, {"w1": W(6, 4), "w2": W(3, 6)}, x_shape=(2, 5, 4)))
    g = group_of(an, "w1")
    assert member(g, "w1", "out").axis == 0 and member(g, "w2", "in").axis == 1
    oracle(prep, an)


def test_where_expand_tile_pass_through():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Greater", ["c0", "zero"], ["pos"]),
             helper.make_node("Where", ["pos", "c0", "alpha"], ["wh"]),
             helper.make_node("Expand", ["wh", "eshape"], ["ex"]), helper.make_node("Tile", ["ex", "reps"], ["tl"])]
    h, hw = head("tl", 4)
    inits = {"w0": W(4, 3, 3, 3), "zero": F32(0.0), "alpha": W(4, 1, 1), "eshape": I64(2, 1, 1, 1),
             "reps": I64(1, 1, 2, 1), **hw}
    prep, an = analyze(build(nodes + [h], inits))
    g = group_of(an, "w0")
    assert g.prunable and member(g, "alpha").role == "param"
    oracle(prep, an)


def test_expand_to_channel_count_is_rewritten():
    nodes = [conv("x", "w0", "c0"), helper.make_node("GlobalAveragePool", ["c0"], ["gp"]),
             helper.make_node("Sigmoid", ["gp"], ["sg"]), helper.make_node("Expand", ["sg", "eshape"], ["ex"]),
             helper.make_node("Mul", ["c0", "ex"], ["m"])]
    h, hw = head("m", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "eshape": I64(1, 4, 4, 4), **hw}))
    pruned, plan = oracle(prep, an)
    shp = next(numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "eshape")
    assert shp.tolist() == [1, len(plan[group_of(an, "w0").id]), 4, 4]


def test_tile_repeats_channels():
    nodes = [conv("x", "w0", "c0"), helper.make_node("Tile", ["c0", "reps"], ["t"])]
    h, hw = head("t", 6)
    prep, an = analyze(build(nodes + [h], {"w0": W(3, 3, 3, 3), "reps": I64(1, 2, 1, 1), **hw}))
    assert member(group_of(an, "w0"), "w_y").positions == ((0, 3), (1, 4), (2, 5))
    oracle(prep, an)


def test_matmul_of_activations_contracting_channels_is_unprunable():
    # Gram matrix / non-local block: features [N, HW, C] @ [N, C, HW] contracts the channels
    nodes = [conv("x", "w0", "c"), helper.make_node("Reshape", ["c", "s"], ["f"]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["ft", "f"], ["y"])]
    _, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3), "s": I64(1, 4, 16)}))
    assert "contracted with another activation" in group_of(an, "w0").reason


def test_matmul_of_activations_couples_batch_axes():
    # [N, C, T, D] @ [N, C, D, T]: channels on a batch axis of both operands go together (like heads)
    nodes = [conv("x", "w0", "a"), conv("x", "w1", "b"), helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["a", "bt"], ["m"])]
    h, hw = head("m", 4)
    prep, an = analyze(build(nodes + [h], {"w0": W(4, 3, 3, 3), "w1": W(4, 3, 3, 3), **hw}))
    g = group_of(an, "w0")
    assert g is group_of(an, "w1") and g.prunable
    oracle(prep, an)


def test_tensor_read_inside_a_subgraph_is_unprunable():
    then_g = helper.make_graph([helper.make_node("Relu", ["r"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["r"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [conv("x", "w0", "c"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    _, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3), "cond": np.array(True)}))
    assert "If (node branch)" in group_of(an, "w0").reason


@pytest.mark.parametrize("shapes", [{"x": (1, 3, 6)}, None], ids=["given", "symbolic"])
def test_positional_table_sliced_at_run_time_is_a_param(shapes):
    """``x + table[:x.size(1)]`` (Whisper's positional embedding): a constant table sliced on its
    rows to the run-time length joins the channels it is added to as a "param" member on its columns,
    whether the given shapes fold the slice or not. The stream is then the hidden size: left whole
    without --prune-hidden, saying so; with it, the table's columns go too and any length runs."""
    nodes = [conv("x", "w0", "a"), helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
             helper.make_node("Shape", ["at"], ["shp"]), helper.make_node("Gather", ["shp", "one"], ["t"]),
             helper.make_node("Unsqueeze", ["t", "zero1"], ["end"]),
             helper.make_node("Slice", ["table", "zero1", "end", "zero1"], ["pos"]),
             helper.make_node("Add", ["at", "pos"], ["s"]), helper.make_node("MatMul", ["s", "wout"], ["y"])]
    inits = {"w0": W(4, 3, 1), "one": I64(1).reshape(()), "zero1": I64(0), "table": W(16, 4), "wout": W(4, 2)}
    prep = prepare(build(nodes, inits, x_shape=["batch", 3, "frames"]), shapes)
    g = group_of(analyze_channels(prep.view), "w0")
    assert not g.prunable and "positional table 'table'" in g.reason and "--prune-hidden" in g.reason
    an = analyze_channels(prep.view, prune_hidden=True)
    g = group_of(an, "w0")
    assert g.prunable and (member(g, "table").role, member(g, "table").axis) == ("param", 1)
    plan = {g.id: np.array([0, 2])}
    pruned, zeroed = apply_plan(prep.model, an, plan), zero_removed_inputs(prep.model, an, plan)
    for batch, length in ((1, 6), (2, 3)):
        feeds = {"x": RNG.standard_normal((batch, 3, length)).astype(np.float32)}
        np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(zeroed, feeds)[0], rtol=1e-5, atol=1e-5)


def test_heads_merged_with_batch_by_a_minus_one_target_adapt():
    """The dynamo exporter's attention reshapes ``[B, heads, S, dh]`` to ``Concat([-1], Shape[2:])``
    (batch and heads merged, analysed at batch 1): the ``-1`` already infers ``B * kept heads`` for
    every batch, so the rewriter leaves it (it used to write the analysed kept count there)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    shape_slice = lambda t, s, e, o: [helper.make_node("Shape", [t], [f"{o}_s"]),  # noqa: E731
                                      helper.make_node("Slice", [f"{o}_s", s, e], [o])]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("Reshape", ["q", "split"], ["q4"]),
             helper.make_node("Transpose", ["q4"], ["t"], perm=[0, 2, 1, 3]), *shape_slice("t", "two", "four", "sd"),
             helper.make_node("Concat", ["minus1", "sd"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["t", "tgt"], ["r"]), helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["r", "rt"], ["sc"]), helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "r"], ["o"]),  # self-attention with q = k = v, per merged head
             *shape_slice("t", "zero1", "two", "bh"), helper.make_node("Concat", ["bh", "sd"], ["back"], axis=0),
             helper.make_node("Reshape", ["o", "back"], ["b4"]),
             helper.make_node("Transpose", ["b4"], ["bt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["bt", "merge"], ["m"]), helper.make_node("MatMul", ["m", "wo"], ["y"])]
    inits = {"wq": W(8, 8), "split": I64(0, 0, 2, 4), "two": I64(2), "four": I64(4), "minus1": I64(-1),
             "zero1": I64(0), "merge": I64(0, 0, 8), "wo": W(8, 3)}
    prep = prepare(build(nodes, inits, inputs=[x]), {"x": (1, 5, 8)})
    an = analyze_channels(prep.view)
    (g,) = an.prunable
    assert g.size == 2 and member(g, "wo").role == "in"
    plan = {g.id: np.array([1])}
    pruned, zeroed = apply_plan(prep.model, an, plan), zero_removed_inputs(prep.model, an, plan)
    for batch, seq in ((1, 5), (3, 4)):
        feeds = {"x": RNG.standard_normal((batch, seq, 8)).astype(np.float32)}
        np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(zeroed, feeds)[0], rtol=1e-5, atol=1e-5)
