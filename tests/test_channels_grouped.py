"""Group-wise pruning of grouped convolutions whose groups hold several channels each.

A grouped conv keeps its ``group``: every group loses the same number of channels. Where a channel
shuffle (Reshape/Transpose/Reshape) or a Concat spreads channels over the conv's groups, the j-th
channel of every group is coupled with the others (removed together, importance summed over them),
so the count per group stays equal. Proven with the zeroed-channel equivalence oracle (zero what
the removed channels feed in the original, prune them, outputs must match) on an AlexNet-style
group=2 stack, ShuffleNet-v1 units (group=4 1x1 conv -> shuffle -> depthwise 3x3 -> group=4 1x1
conv, residual and concat variants; PyTorch export and a Caffe2-style ``onnx.helper`` graph) and
by the MACs removed at ``--ratio 0.5`` against the uniform expectation.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from arch_zoo import randomize_norms
from cli_util import run_cli
from test_channels_rules import analyze, build, conv, group_of, member, oracle
from onnxprune.channels.analyze import block_layout
from onnxprune.metrics.macs import macs_by_node
from onnxprune.bridge.torch_export import export_torch

RNG = np.random.default_rng(0)


def W(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------ the rule


def test_block_layout_cases():
    # one-to-one: 4 classes in 2 blocks of 2 -> per-block classes
    assert block_layout(np.array([5, 6, 7, 8]), 2).tolist() == [[5, 6], [7, 8]]
    # shuffle-coupled lanes: every class once in every block -> nothing to constrain
    assert block_layout(np.array([0, 1, 0, 1, 0, 1]), 3).shape == (3, 0)
    # each class in one block, twice (after a shuffle) -> blocks of distinct classes
    assert block_layout(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 2).tolist() == [[0, 1], [2, 3]]
    # a class straddling two blocks, or blocks with unequal class counts: not expressible
    assert block_layout(np.array([0, 1, 1, 2]), 2) is None
    assert block_layout(np.array([0, 0, 0, 1, 2, 3]), 2) is None


def test_lrn_passes_channels_and_is_inexact():
    """LRN (Caffe AlexNet): per-position window over neighbouring channels: channels pass through,
    removing some changes the others' windows (inexact, like LayerNorm), never unprunable."""
    nodes = [conv("x", "w0", "c0"), helper.make_node("LRN", ["c0"], ["l"], size=3, name="lrn"),
             conv("l", "w1", "y")]
    prep, an = analyze(build(nodes, {"w0": W(4, 3, 3, 3), "w1": W(2, 4, 1, 1)}))
    g = group_of(an, "w0")
    assert g.prunable and not g.exact and "lrn" in g.inexact_reason
    assert member(g, "w1").role == "in"
    from onnxprune.channels.rewrite import apply_plan
    pruned = apply_plan(prep.model, an, {g.id: np.array([0, 2])})
    assert [int(d) for d in next(i for i in pruned.graph.initializer if i.name == "w1").dims] == [2, 2, 1, 1]


def test_grouped_conv_after_shuffle_keeps_group_and_couples_lanes():
    """group=4 conv -> shuffle -> group=4 conv: the shuffle couples channel j of every group of the
    first conv; the second conv then needs equal counts of those coupled lanes per group."""
    m_ch, h, w = 32, 4, 4
    nodes = [conv("x", "w0", "a", group=1), helper.make_node("Relu", ["a"], ["r"]),
             conv("r", "g1", "b", group=4), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Reshape", ["rb", "s1"], ["t0"]),
             helper.make_node("Transpose", ["t0"], ["t1"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t1", "s2"], ["sh"]),
             conv("sh", "g2", "y", group=4)]
    inits = {"w0": W(8, 3, 1, 1), "g1": W(m_ch, 2, 1, 1), "g2": W(8, 8, 1, 1),
             "s1": np.array([1, 4, m_ch // 4, h, w], np.int64), "s2": np.array([1, m_ch, h, w], np.int64)}
    prep, an = analyze(build(nodes, inits, x_shape=(1, 3, h, w)))
    g = group_of(an, "g1")
    assert g.prunable and g.size == m_ch // 4 and g.blocks == 4
    assert all(len(p) == 4 for p in member(g, "g1", "out").positions)  # channel j of every group
    pruned, plan = oracle(prep, an)
    conv2 = next(n for n in pruned.graph.node if n.op_type == "Conv" and n.input[1] == "g2")
    assert helper.get_attribute_value(next(a for a in conv2.attribute if a.name == "group")) == 4
    shape = next(i for i in pruned.graph.initializer if i.name == "s1")
    assert numpy_helper.to_array(shape).tolist()[2] == len(plan[g.id])


# ------------------------------------------------------------------------------ models


class AlexNetStyle(nn.Module):
    """AlexNet's shape: conv, group=2 conv, conv, two group=2 convs, FC head (tiny)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(32, 24, 3, padding=1, groups=2), nn.ReLU())
        self.fc = nn.Sequential(nn.Linear(24 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet v1 unit: group conv 1x1 -> shuffle -> depthwise 3x3 -> group conv 1x1; stride 1 adds
    the input (residual), stride 2 concatenates an average-pooled input (concat)."""

    def __init__(self, c_in, c_out, mid, stride=1, groups=4, first_groups=None):
        super().__init__()
        self.groups, self.stride = groups, stride
        branch = c_out - c_in if stride == 2 else c_out
        self.c1 = nn.Conv2d(c_in, mid, 1, groups=first_groups or groups, bias=False)
        self.b1 = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.b2 = nn.BatchNorm2d(mid)
        self.c2 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.b3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b3(self.c2(self.b2(self.dw(shuffle(y, self.groups)))))
        if self.stride == 2:
            return torch.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))
        return torch.relu(x + y)


class ShuffleNetV1(nn.Module):
    """Stem, a stride-2 (concat) unit whose output feeds group=4 convs, a residual unit, a second
    stage of both, global pool, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.units = nn.Sequential(ShuffleV1Unit(24, 96, 32, 2, first_groups=1), ShuffleV1Unit(96, 96, 32),
                                   ShuffleV1Unit(96, 192, 48, 2), ShuffleV1Unit(192, 192, 48))
        self.fc = nn.Linear(192, 10)

    def forward(self, x):
        x = self.units(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("grouped")
    torch.manual_seed(0)
    alex = export_torch(AlexNetStyle().eval(), (torch.randn(1, 3, 16, 16),), d / "alexnet_style.onnx")
    shuf = export_torch(randomize_norms(ShuffleNetV1()).eval(), (torch.randn(1, 3, 16, 16),), d / "shufflenet_v1.onnx")
    return {"alexnet": alex, "shufflenet_v1": shuf, "caffe2_shufflenet_v1": caffe2_shuffle_unit(d / "caffe2.onnx"),
            "caffe_alexnet": caffe_alexnet(d / "caffe_alexnet.onnx")}


def caffe_alexnet(path):
    """bvlc_alexnet as converted from Caffe (tiny): LRN after conv1/conv2, group=2 conv2/4/5, Gemm head."""
    def cv(x, w, y, group=1, pad=1):
        return helper.make_node("Conv", [x, w, w + "_b"], [y], pads=[pad] * 4, group=group, kernel_shape=[3, 3])
    chans = {"c1": (16, 3, 1), "c2": (24, 16, 2), "c3": (32, 24, 1), "c4": (32, 32, 2), "c5": (24, 32, 2)}
    nodes = [cv("x", "c1", "a1"), helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("LRN", ["r1"], ["n1"], size=5, alpha=1e-4, beta=0.75),
             helper.make_node("MaxPool", ["n1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             cv("p1", "c2", "a2", 2), helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("LRN", ["r2"], ["n2"], size=5, alpha=1e-4, beta=0.75),
             helper.make_node("MaxPool", ["n2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             cv("p2", "c3", "a3"), helper.make_node("Relu", ["a3"], ["r3"]),
             cv("r3", "c4", "a4", 2), helper.make_node("Relu", ["a4"], ["r4"]),
             cv("r4", "c5", "a5", 2), helper.make_node("Relu", ["a5"], ["r5"]),
             helper.make_node("Flatten", ["r5"], ["f"]),
             helper.make_node("Gemm", ["f", "fc6", "fc6_b"], ["g6"], transB=1),
             helper.make_node("Relu", ["g6"], ["h6"]),
             helper.make_node("Gemm", ["h6", "fc7", "fc7_b"], ["g7"], transB=1),
             helper.make_node("Relu", ["g7"], ["h7"]),
             helper.make_node("Gemm", ["h7", "fc8", "fc8_b"], ["y"], transB=1)]
    inits = {}
    for k, (co, ci, g) in chans.items():
        inits[k], inits[k + "_b"] = W(co, ci // g, 3, 3), W(co)
    inits.update(fc6=W(32, 24 * 4 * 4), fc6_b=W(32), fc7=W(32, 32), fc7_b=W(32), fc8=W(10, 32), fc8_b=W(10))
    m = build(nodes, inits, x_shape=(1, 3, 16, 16), opset=9)
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]))
    onnx.save(m, path)
    return path


def caffe2_shuffle_unit(path):
    """ShuffleNet v1 residual unit the way Caffe2's exporter writes it (opset 9, ``Sum`` for the
    residual, explicit BN, constant 5-D shuffle targets) after a plain stem conv."""
    c, mid, h, w = 16, 32, 6, 6
    nodes = [conv("x", "stem", "s0", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["s0"], ["s"]),
             conv("s", "g1", "a"),
             helper.make_node("BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["ab"]),
             helper.make_node("Relu", ["ab"], ["ar"]),
             helper.make_node("Reshape", ["ar", "shuf1"], ["t0"]),
             helper.make_node("Transpose", ["t0"], ["t1"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t1", "shuf2"], ["sh"]),
             conv("sh", "dw", "d", pads=[1, 1, 1, 1], group=mid),
             conv("d", "g2", "e", b="g2b"),
             helper.make_node("Sum", ["e", "s"], ["res"]), helper.make_node("Relu", ["res"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    for n in nodes:
        if n.op_type == "Conv" and n.input[1] in ("g1", "g2"):
            n.attribute.append(helper.make_attribute("group", 4))
    inits = {"stem": W(c, 3, 3, 3), "g1": W(mid, c // 4, 1, 1), "bn_s": W(mid), "bn_b": W(mid), "bn_m": W(mid),
             "bn_v": np.abs(W(mid)) + 0.5, "shuf1": np.array([1, 4, mid // 4, h, w], np.int64),
             "shuf2": np.array([1, mid, h, w], np.int64), "dw": W(mid, 1, 3, 3), "g2": W(c, mid // 4, 1, 1),
             "g2b": W(c), "fc": W(10, c), "fcb": W(10)}
    m = build(nodes, inits, x_shape=(1, 3, h, w), opset=9)
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]))
    onnx.save(m, path)
    return path


# ------------------------------------------------------------------------------ structure + oracle


def test_alexnet_style_group2_blocks(exported):
    from onnxprune.core.prepare import prepare
    from onnxprune.channels.analyze import analyze_channels
    prep = prepare(exported["alexnet"])
    an = analyze_channels(prep.view)
    grouped = [g for g in an.prunable if g.blocks == 2]
    assert len(grouped) == 5  # every conv output read or written by a group=2 conv
    _oracle_all(prep, an)


@pytest.mark.parametrize("name", ["shufflenet_v1", "caffe2_shufflenet_v1"])
def test_shufflenet_v1_prunes_group_wise(exported, name):
    from onnxprune.core.prepare import prepare
    from onnxprune.channels.analyze import analyze_channels
    prep = prepare(exported[name])
    an = analyze_channels(prep.view)
    reasons = [g.reason for g in an.unprunable]
    assert all(r.startswith("reaches model output") for r in reasons), reasons
    bottlenecks = [g for g in an.prunable if g.blocks == 4]
    # torch: the 4 bottlenecks (the outer channels are coupled lanes across the concats);
    # Caffe2 unit: the bottleneck and the residual stream (both sides of group=4 convs)
    assert len(bottlenecks) == (4 if name == "shufflenet_v1" else 2)
    _oracle_all(prep, an)


def _oracle_all(prep, an):
    from arch_zoo import random_plan, zero_removed_inputs
    from conftest import random_feeds, run_ort
    from onnxprune.channels.rewrite import apply_plan
    for seed in (0, 1):
        plan = random_plan(an, np.random.default_rng(seed), 0.5, groups=[g for g in an.prunable if g.exact])
        assert any(len(k) < an.group(gid).size for gid, k in plan.items())
        pruned = apply_plan(prep.model, an, plan)
        feeds = random_feeds(prep.model, seed=seed)
        ref, out = run_ort(zero_removed_inputs(prep.model, an, plan), feeds), run_ort(pruned, feeds)
        for a, b in zip(ref, out):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ MACs at --ratio 0.5


def _uniform_expectation(path, ratio: float) -> float:
    """MACs kept if every channel count shrank by ``ratio`` except the image input and the logits:
    a layer keeps ``(1 - ratio)`` of its MACs per pruned side (a depthwise conv has one side)."""
    from onnxprune.core.prepare import prepare
    view = prepare(path).view
    first_input = set(view.input_names)
    outputs = set(view.output_names)
    kept = total = 0.0
    by_node = macs_by_node(view)
    for node in view.model.graph.node:
        macs = by_node.get(node.name) if node.op_type in ("Conv", "Gemm") else None
        if not macs:
            continue
        w = view.const(node.input[1])
        depthwise = node.op_type == "Conv" and w.shape[1] == 1 and int(next(
            (a.i for a in node.attribute if a.name == "group"), 1)) > 1
        sides = (0 if node.input[0] in first_input else 1) + (0 if depthwise else 1)
        sides -= 1 if node.output[0] in outputs else 0
        total += macs
        kept += macs * (1 - ratio) ** max(sides, 0)
    return kept / total


@pytest.mark.parametrize("name", ["alexnet", "caffe_alexnet", "shufflenet_v1"])
def test_macs_at_ratio_half_close_to_uniform(exported, tmp_path, name):
    code, out, err = run_cli("prune", exported[name], "--structured", "--ratio", "0.5", "--json",
                             "-o", tmp_path / "p.onnx")
    assert code == 0, err
    data = json.loads(out)
    kept = data["macs_after"] / data["macs_before"]
    expected = _uniform_expectation(exported[name], 0.5)
    print(f"{name}: MACs {data['macs_before']} -> {data['macs_after']} ({data['macs_reduction']:.2f}x fewer), "
          f"uniform expectation keeps {expected:.3f}")
    # equal counts per group and coupled shuffle lanes round a little; never far from uniform
    assert kept <= expected * 1.25, (kept, expected)
    assert data["macs_reduction"] > 2.5
