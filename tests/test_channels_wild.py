"""Run-time shape chains from real exports: Swin's shifted-window attention and tf2onnx's BroadcastTo.

- Swin-T (torchvision, opset 17) made ``prune --structured`` fail shape inference: the attention
  reads the embedding width ``C`` at run time (``Shape -> Gather``) to size tensors whose channels
  pruning leaves alone (``C // heads`` for the fused qkv split, ``head_dim ** -0.5``, the
  ``attn @ v`` reshape back to C). Those values are now pinned to their original value, while the
  window partition/reverse reshapes (same channels) adapt by themselves; the fused qkv split into
  ``(3, heads, head_dim)`` is followed too, so whole heads are pruned. A mini Swin built like
  torchvision's swin_transformer.py (pad, roll, window partition, relative position bias, shift
  mask before softmax, window reverse, MLP, patch merging) is exported at opset 17 here.
- tf2onnx's LayerNorm ``BroadcastTo`` became ``Expand(x, Shape(h))``: a target read from the same
  channels adapts by itself, so the rewriter leaves it alone ("cannot rewrite the run-time target
  shape of Expand" before).
- Run-time values that do not fit either case are refused, with the node named.

Exactness is proven with the zeroed-channel equivalence oracle (see test_channels_rules.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from arch_zoo import random_plan, zero_removed_inputs
from cli_util import run_cli
from conftest import random_feeds, run_ort
from onnxprune.channels.analyze import analyze_channels
from onnxprune.channels.rewrite import apply_plan
from onnxprune.core.prepare import prepare
from onnxprune.core.shapes import graph_inputs
from onnxprune.bridge.torch_export import export_torch

RNG = np.random.default_rng(0)


def W(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------ mini Swin


def shifted_window_attention(x, qkv, proj, rel_bias, ws, heads, shift):
    """torchvision's ``shifted_window_attention`` (swin_transformer.py): pad, roll, window partition,
    fused qkv split into heads, relative position bias, shift mask before softmax, window reverse."""
    B, H, W, C = x.shape
    pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pH, pW, _ = x.shape
    shift = [0 if ws >= pH else shift, 0 if ws >= pW else shift]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (pH // ws) * (pW // ws)
    x = x.view(B, pH // ws, ws, pW // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, ws * ws, C)
    t = qkv(x).reshape(x.size(0), x.size(1), 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = t[0], t[1], t[2]
    q = q * (C // heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + rel_bias
    if sum(shift) > 0:
        mask = x.new_zeros((pH, pW))
        hs = ((0, -ws), (-ws, -shift[0]), (-shift[0], None))
        wsl = ((0, -ws), (-ws, -shift[1]), (-shift[1], None))
        count = 0
        for h in hs:
            for w in wsl:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pH // ws, ws, pW // ws, ws).permute(0, 2, 1, 3).reshape(nw, ws * ws)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = proj(x)
    x = x.view(B, pH // ws, pW // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class WindowAttention(nn.Module):
    def __init__(self, dim, ws, shift, heads):
        super().__init__()
        self.ws, self.shift, self.heads = ws, shift, heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        c = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x):
        n = self.ws * self.ws
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        return shifted_window_attention(x, self.qkv, self.proj, bias, self.ws, self.heads, self.shift)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, ws, shift, norm=nn.LayerNorm):
        super().__init__()
        self.norm1, self.attn = norm(dim), WindowAttention(dim, ws, shift, heads)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, norm=nn.LayerNorm):
        super().__init__()
        self.norm, self.reduction = norm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class MiniSwin(nn.Module):
    """Patch embedding, a stage of a plain and a shifted window block, patch merging, a shifted
    block, classifier. ``norm=nn.Identity`` makes every group exact, so the oracle covers the residual
    stream through the attention's run-time shapes too."""

    def __init__(self, dim=16, heads=2, ws=4, classes=10, norm=nn.LayerNorm):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norm0 = norm(dim)
        self.stage1 = nn.Sequential(SwinBlock(dim, heads, ws, 0, norm), SwinBlock(dim, heads, ws, ws // 2, norm))
        self.merge = PatchMerging(dim, norm)
        self.stage2 = SwinBlock(2 * dim, 2 * heads, 2, 1, norm)
        self.norm, self.head = norm(2 * dim), nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.norm0(self.patch(x).permute(0, 2, 3, 1))
        x = self.norm(self.stage2(self.merge(self.stage1(x))))
        return self.head(x.permute(0, 3, 1, 2).mean((2, 3)))




@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    d = tmp_path_factory.mktemp("swin")
    torch.manual_seed(0)
    ln = export_torch(MiniSwin().eval(), (torch.randn(1, 3, 32, 32),), d / "swin.onnx", opset=17)
    torch.manual_seed(0)
    exact = export_torch(MiniSwin(norm=nn.Identity).eval(), (torch.randn(1, 3, 32, 32),), d / "swin_exact.onnx",
                         opset=17)
    return {"ln": ln, "exact": exact}


def _oracle(prep, an, batches=(None,), seeds=(0, 1)):
    for seed in seeds:
        plan = random_plan(an, np.random.default_rng(seed), 0.5, groups=[g for g in an.prunable if g.exact])
        assert any(len(k) < an.group(gid).size for gid, k in plan.items())
        pruned = apply_plan(prep.model, an, plan)
        for batch in batches:
            shapes = None if batch is None else {i.name: [batch] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
                                                 for i in graph_inputs(prep.model)}
            feeds = random_feeds(prep.model, shapes, seed=seed)
            ref, out = run_ort(zero_removed_inputs(prep.model, an, plan), feeds), run_ort(pruned, feeds)
            for a, b in zip(ref, out):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    return pruned


def test_swin_prunes_with_structured_ratio(swin, tmp_path):
    code, out, err = run_cli("prune", swin["ln"], "--structured", "--ratio", "0.5", "--json", "-o", tmp_path / "p.onnx",
                             "--prune-hidden")
    assert code == 0, err  # was exit 1: "pruned model fails shape inference ... attn ... MatMul"
    data = json.loads(out)
    print(f"mini Swin: MACs {data['macs_before']} -> {data['macs_after']} ({data['macs_reduction']:.2f}x fewer)")
    assert data["macs_reduction"] > 2
    # the residual stream (LayerNorm over the patch embedding) is a transformer's hidden size: opt-in
    (default,) = [g for g in analyze_channels(prepare(swin["ln"]).view).groups
                  if any(m.tensor == "patch.weight" for m in g.members)]
    assert not default.prunable and "--prune-hidden" in default.reason
    an = analyze_channels(prepare(swin["ln"]).view, prune_hidden=True)
    residual = [g for g in an.groups if any(m.tensor == "patch.weight" for m in g.members)][0]
    assert residual.prunable and not residual.exact  # LayerNorm over the embedding
    assert any("attn" in node for node, _ in an.pins)  # qkv split, scale, attn @ v reshape
    assert any("attn" in node for node in an.adaptive)  # window partition / reverse
    heads = [g for g in an.groups if any(m.tensor.endswith("attn/qkv/Transpose_output_0") and m.role == "out"
                                         for m in g.members)]
    assert sorted(g.size for g in heads) == [2, 2, 4] and all(g.prunable for g in heads)
    # a head: its q, k and v columns (head_dim each) and its slice of the relative position bias
    qkv = next(m for m in heads[0].members if m.role == "out")
    assert [len(p) for p in qkv.positions] == [3 * 8, 3 * 8]
    assert any(m.role == "param" and m.axis == 1 for m in heads[0].members)


def test_swin_residual_stream_is_exact_through_attention(swin):
    """Without LayerNorm every group is exact: pruning the embedding channels (which the attention
    reads at run time) matches the zeroed original, at the exported batch and another one."""
    prep = prepare(swin["exact"])
    an = analyze_channels(prep.view)
    residual = [g for g in an.groups if any(m.tensor == "patch.weight" for m in g.members)][0]
    assert residual.prunable and residual.exact
    _oracle(prep, an, batches=(None, 2), seeds=(0,))


def test_reshape_mapping_three_way_split_tracks_the_middle_axis():
    from onnxprune.channels.rules import reshape_mapping
    kind, axis, chan = reshape_mapping((1, 4, 12), 2, (1, 4, 3, 2, 2))  # qkv -> (3, heads, head_dim)
    assert (kind, axis) == ("split3", 3)
    assert chan == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]  # head j: (i, j, k) for every i, k
    assert reshape_mapping((1, 12), 1, (1, 2, 3, 2))[0] == "split3"
    assert reshape_mapping((1, 4, 12), 2, (1, 3, 4, 4)) is None  # 12 -> (3, 4) with 4 from T: mixed


# ------------------------------------------------------------------------------ helper graphs


def _model(nodes, inits, x_shape, out_shape, opset=13):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, list(out_shape))],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def tf2onnx_layernorm(c=8, ln=True):
    """A Keras Dense -> Reshape -> LayerNormalization -> Dense as tf2onnx writes it: the norm
    spelled out, ``BroadcastTo`` as ``Expand`` to ``Shape`` of its input (dynamic batch)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="dense/MatMul"),
             helper.make_node("Reshape", ["h0", "tshape"], ["h"], name="reshape/Reshape")]
    inits = {"w1": W(6, c), "w2": W(c, 3), "tshape": np.array([-1, 4, c], np.int64)}
    if ln:
        nodes += [helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], name="ln/moments/mean"),
                  helper.make_node("Sub", ["h", "mean"], ["d"], name="ln/sub"),
                  helper.make_node("Mul", ["d", "d"], ["d2"], name="ln/sq"),
                  helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], name="ln/moments/variance"),
                  helper.make_node("Add", ["var", "eps"], ["ve"], name="ln/add"),
                  helper.make_node("Sqrt", ["ve"], ["sd"], name="ln/Sqrt"),
                  helper.make_node("Div", ["d", "sd"], ["n"], name="ln/truediv"),
                  helper.make_node("Mul", ["n", "gamma"], ["ng"], name="ln/mul"),
                  helper.make_node("Add", ["ng", "beta"], ["nb"], name="ln/add_1")]
        inits.update(eps=np.array([1e-3], np.float32), gamma=W(c), beta=W(c))
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["nb"], name="relu"))
    nodes += [helper.make_node("Shape", ["h"], ["shp"], name="ln/Shape"),
              helper.make_node("Expand", ["nb", "shp"], ["y"], name="ln/BroadcastTo"),
              helper.make_node("MatMul", ["y", "w2"], ["out"], name="dense_1/MatMul")]
    return _model(nodes, inits, ["unk__0", 4, 6], ["unk__0", 4, 3])


def test_tf2onnx_broadcast_to_own_shape_adapts(tmp_path):
    import onnx
    path = tmp_path / "keras_ln.onnx"
    onnx.save(tf2onnx_layernorm(), path)
    code, out, err = run_cli("prune", path, "--structured", "--ratio", "0.5", "--json", "-o", tmp_path / "p.onnx")
    assert code == 0, err  # was: "cannot rewrite the run-time target shape of Expand ln/BroadcastTo"
    assert json.loads(out)["macs_reduction"] > 1.5
    pruned = onnx.load(tmp_path / "p.onnx")
    expand = next(n for n in pruned.graph.node if n.name == "ln/BroadcastTo")
    assert expand.input[1] == "shp"  # still read at run time, not rewritten
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)}
    assert run_ort(pruned, feeds)[0].shape == (3, 4, 3)


def test_expand_to_shape_of_same_channels_is_exact():
    prep = prepare(tf2onnx_layernorm(ln=False))
    an = analyze_channels(prep.view)
    g = next(g for g in an.groups if any(m.tensor == "w1" for m in g.members))
    assert g.prunable and g.exact and an.adaptive == {"ln/BroadcastTo": {2}}
    _oracle(prep, an, batches=(None, 3))


def _shape_chain_model(tail_nodes, tail_inits, out_shape):
    """MatMul -> h [N, 4, 8], ``C = Shape(h)[2]`` as a scalar, then ``tail_nodes``."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Shape", ["h"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "i2"], ["c"], axis=0, name="gather_c"),
             helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0, name="gather_n")] + tail_nodes
    inits = {"w1": W(6, 8), "i2": np.array(2, np.int64), "i0": np.array(0, np.int64), **tail_inits}
    return _model(nodes, inits, ["N", 4, 6], out_shape)


def test_channel_count_as_data_is_pinned():
    """``x * C ** -0.5`` with C read at run time (attention's scale): C keeps its original value,
    which is what the zeroed original computes."""
    tail = [helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT, name="cast"),
            helper.make_node("Sqrt", ["cf"], ["sc"], name="sqrt"),
            helper.make_node("Reciprocal", ["sc"], ["scale"], name="recip"),
            helper.make_node("Relu", ["h"], ["hr"], name="relu"),
            helper.make_node("Mul", ["hr", "scale"], ["hs"], name="mul"),
            helper.make_node("MatMul", ["hs", "w2"], ["out"], name="mm2")]
    prep = prepare(_shape_chain_model(tail, {"w2": W(8, 3)}, ["N", 4, 3]))
    an = analyze_channels(prep.view)
    assert np.isclose(float(an.pins[("mul", 1)]), 8 ** -0.5)
    g = next(g for g in an.groups if any(m.tensor == "w1" and m.role == "out" for m in g.members))
    assert g.prunable and g.exact
    pruned = _oracle(prep, an, batches=(None, 2))
    assert not any(n.op_type == "Reciprocal" for n in pruned.graph.node)  # the pinned chain is gone


@pytest.mark.parametrize("case, op", [("range", "Range"), ("batch_times_c", "Reshape"),
                                      ("zeros", "ConstantOfShape")])
def test_unfit_run_time_channel_counts_are_refused(case, op):
    """Channel counts read at run time into something that neither adapts nor can keep its value."""
    if case == "range":  # arange(C) added to another tensor's channels
        tail = [helper.make_node("Range", ["zero", "c", "one"], ["r"], name="rng"),
                helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT, name="cast"),
                helper.make_node("MatMul", ["h", "w2"], ["k"], name="mm2"),
                helper.make_node("Add", ["k", "rf"], ["out"], name="add")]
        inits = {"zero": np.array(0, np.int64), "one": np.array(1, np.int64), "w2": W(8, 8)}
        out_shape = ["N", 4, 8]
    elif case == "batch_times_c":  # view(N * C, -1): the count mixed with the batch size
        tail = [helper.make_node("Mul", ["n", "c"], ["nc"], name="mul"),
                helper.make_node("Unsqueeze", ["nc", "ax0"], ["nc1"], name="unsq"),
                helper.make_node("Concat", ["nc1", "m1"], ["tgt"], axis=0, name="cat"),
                helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="tr"),
                helper.make_node("Reshape", ["ht", "tgt"], ["flat"], name="reshape"),
                helper.make_node("ReduceMax", ["flat"], ["out"], axes=[1], keepdims=0, name="max")]
        inits = {"ax0": np.array([0], np.int64), "m1": np.array([-1], np.int64)}
        out_shape = ["NC"]
    else:  # zeros(C) added to another producer's channels
        tail = [helper.make_node("Unsqueeze", ["c", "ax0"], ["c1"], name="unsq_c"),
                helper.make_node("ConstantOfShape", ["c1"], ["z"], name="zeros",
                                 value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
                helper.make_node("MatMul", ["h", "w2"], ["k"], name="mm2"),
                helper.make_node("Add", ["k", "z"], ["out"], name="add")]
        inits = {"ax0": np.array([0], np.int64), "w2": W(8, 8)}
        out_shape = ["N", 4, 8]
    prep = prepare(_shape_chain_model(tail, inits, out_shape))
    an = analyze_channels(prep.view)
    g = next(g for g in an.groups if any(m.tensor == "w1" and m.role == "out" for m in g.members))
    assert not g.prunable and "read at run time" in g.reason and op in g.reason, g.reason


def test_rewriter_folds_run_time_targets_with_the_constants_it_already_rewrote():
    """Without the provenance above, the rewriter folds the pruned model's shape computations to
    check a run-time target; that folding must see the Reshape target it rewrote earlier (it saw
    the stale one, failed, and reported "cannot rewrite the run-time target shape of Expand")."""
    prep = prepare(tf2onnx_layernorm(ln=False))
    an = analyze_channels(prep.view)
    an.adaptive.clear()
    g = next(g for g in an.groups if any(m.tensor == "w1" for m in g.members))
    pruned = apply_plan(prep.model, an, {g.id: np.array([0, 3, 5])})
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)}
    assert run_ort(pruned, feeds)[0].shape == (2, 4, 3)
