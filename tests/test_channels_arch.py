"""Channel analysis + rewrite on every test architecture, proven with the equivalence oracle.

Oracle: pick channels to remove in every prunable group (seeded, about half), zero every "in"
member slice of those channels in the ORIGINAL model (so the removed channels contribute nothing to
any output — residual adds, BN shifts and biases feeding ReLUs included, since whatever flows in a
removed channel's lane only ever reaches outputs through a consumer weight), then prune exactly those
channels: the pruned model's outputs must match the zeroed original's.

Groups whose normalization computes statistics across the channels (``exact=False``: LayerNorm over
C in ConvNeXt/transformers, GroupNorm) cannot be equivalent by construction — removing a channel
changes the mean/variance of the others — so the oracle prunes only exact groups, and a second plan
that prunes every prunable group is checked for validity, names and output shapes instead.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from arch_zoo import ARCHS, HELPER_GRAPHS, export_arch, random_plan, zero_removed_inputs
from conftest import random_feeds, run_ort
from onnxprune.channels.analyze import analyze_channels
from onnxprune.channels.rewrite import apply_plan
from onnxprune.core.prepare import prepare

ALL = list(ARCHS) + list(HELPER_GRAPHS)
INEXACT_ONLY = {"groupnorm"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> (Prepared, Analysis), exported once for the module."""
    d = tmp_path_factory.mktemp("arch")
    cache = {}

    def get(name):
        if name not in cache:
            path = export_arch(name, d) if name in ARCHS else HELPER_GRAPHS[name](d)
            prep = prepare(path)
            cache[name] = (prep, analyze_channels(prep.view))
        return cache[name]
    return get


def _feeds(model, batch=None, seed=0):
    from onnxprune.core.shapes import graph_inputs
    shapes = None
    if batch is not None:
        shapes = {i.name: [batch] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]] for i in graph_inputs(model)}
    return random_feeds(model, shapes, seed=seed)


def _assert_close(ref, out):
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_oracle_equivalence(prepared, name):
    prep, an = prepared(name)
    assert an.prunable, f"{name}: nothing prunable: {[g.reason for g in an.groups]}"
    assert not [g.reason for g in an.groups if g.reason and "could not be analysed" in g.reason]
    if not [g for g in an.prunable if g.exact]:
        assert name in INEXACT_ONLY  # every group normalizes over channels: validity checked below
        return
    for seed, fraction in ((0, 0.5), (1, 0.3)):
        plan = random_plan(an, np.random.default_rng(seed), fraction, groups=[g for g in an.prunable if g.exact])
        assert any(len(k) < an.group(gid).size for gid, k in plan.items())
        pruned = apply_plan(prep.model, an, plan)
        batches = [None, 2] if _dynamic_batch(prep.model) else [None]
        for batch in batches:
            feeds = _feeds(prep.model, batch, seed)
            _assert_close(run_ort(zero_removed_inputs(prep.model, an, plan), feeds), run_ort(pruned, feeds))


def _dynamic_batch(model):
    from onnxprune.core.shapes import graph_inputs
    return all(not i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in graph_inputs(model))


@pytest.mark.parametrize("name", ALL)
def test_pruning_every_group_is_valid_and_keeps_interface(prepared, name):
    prep, an = prepared(name)
    plan = random_plan(an, np.random.default_rng(3), fraction=0.6)
    pruned = apply_plan(prep.model, an, plan)
    onnx.checker.check_model(pruned, full_check=True)
    g0, g1 = prep.model.graph, pruned.graph
    assert [i.name for i in g1.input] == [i.name for i in g0.input]
    assert [o.name for o in g1.output] == [o.name for o in g0.output]
    assert [str(i.type) for i in g1.input] == [str(i.type) for i in g0.input]
    assert {n.name for n in g1.node} <= {n.name for n in g0.node}
    for batch in ([None, 2] if _dynamic_batch(prep.model) else [None]):
        feeds = _feeds(prep.model, batch)
        ref, out = run_ort(prep.model, feeds), run_ort(pruned, feeds)
        assert [a.shape for a in ref] == [b.shape for b in out]
        assert all(np.isfinite(b).all() for b in out)
    n0 = sum(int(np.prod(i.dims)) for i in g0.initializer)
    n1 = sum(int(np.prod(i.dims)) for i in g1.initializer)
    assert n1 < n0


def test_plan_keeping_everything_changes_nothing(prepared):
    prep, an = prepared("resnet_basic")
    pruned = apply_plan(prep.model, an, {g.id: np.arange(g.size) for g in an.prunable})
    feeds = _feeds(prep.model)
    _assert_close(run_ort(prep.model, feeds), run_ort(pruned, feeds))


# ------------------------------------------------------------------------------ group structure


def _out_layers(group):
    return {m.tensor.rsplit(".weight", 1)[0] for m in group.members_with_role("out")}


def _group_with_out(an, layer):
    return next(g for g in an.groups if layer in _out_layers(g))


def test_resnet_residual_chain_is_one_group(prepared):
    _, an = prepared("resnet_basic")
    g = _group_with_out(an, "stem.0")
    assert _out_layers(g) == {"stem.0", "layers.0.c2"}
    assert {m.tensor for m in g.members_with_role("in")} == {
        "layers.0.c1.weight", "layers.1.c1.weight", "layers.1.short.0.weight"}
    g2 = _group_with_out(an, "layers.1.c2")
    assert _out_layers(g2) == {"layers.1.c2", "layers.1.short.0", "layers.2.c2"}
    assert "fc.weight" in {m.tensor for m in g2.members_with_role("in")}
    assert g.prunable and g2.prunable and g.exact


def test_classifier_output_is_unprunable(prepared):
    for name in ("resnet_basic", "mobilenet_v2", "transformer_mlp", "caffe2_sum"):
        _, an = prepared(name)
        heads = [g for g in an.groups if not g.prunable and g.reason.startswith("reaches model output")]
        assert len(heads) == 1, name


def test_depthwise_conv_couples_input_and_output(prepared):
    _, an = prepared("mobilenet_v2")
    g = _group_with_out(an, "blocks.0.block.0")
    assert _out_layers(g) == {"blocks.0.block.0", "blocks.0.block.3"}  # expansion + depthwise
    dw = next(m for m in g.members if m.tensor == "blocks.0.block.3.weight")
    assert dw.axis == 0 and dw.positions == tuple((k,) for k in range(16))


def test_concat_offsets(prepared):
    _, an = prepared("densenet")
    stem = _group_with_out(an, "stem")
    l0 = _group_with_out(an, "layers.0.2")
    w_stem = next(m for m in stem.members if m.tensor == "layers.1.2.weight")
    w_l0 = next(m for m in l0.members if m.tensor == "layers.1.2.weight")
    assert w_stem.positions == tuple((k,) for k in range(6))
    assert w_l0.positions == tuple((6 + k,) for k in range(4))
    bn = next(m for m in l0.members if m.tensor == "trans.0.weight")
    assert bn.role == "param" and bn.positions == tuple((6 + k,) for k in range(4))


def test_flatten_expands_channels_into_linear(prepared):
    _, an = prepared("flatten_head")
    g = _group_with_out(an, "conv")
    fc = next(m for m in g.members if m.tensor == "fc1.weight")
    assert fc.role == "in" and fc.axis == 1
    assert fc.positions == tuple(tuple(range(16 * c, 16 * (c + 1))) for c in range(6))


def test_grouped_conv_groups_have_blocks(prepared):
    _, an = prepared("resnext")
    g = _group_with_out(an, "layers.0.c1")
    assert g.blocks == 4 and g.prunable
    m = next(m for m in g.members if m.tensor == "layers.0.c2.weight")
    assert m.role == "in" and m.groups == 4


def test_channel_shuffle_is_exact_and_prunable(prepared):
    _, an = prepared("shufflenet")
    g = _group_with_out(an, "stem.0")
    assert g.prunable and _out_layers(g) == {"stem.0", "units.0.branch.5", "units.1.branch.5"}


def test_convnext_layernorm_group_is_prunable_but_inexact(prepared):
    _, an = prepared("convnext")
    g = _group_with_out(an, "stem")
    assert g.prunable and not g.exact and "LayerNormalization" in g.inexact_reason
    hidden = [x for x in an.prunable if x.exact]
    assert len(hidden) == 2 and all(x.size == 32 for x in hidden)  # the two MLP hidden dims


def test_attention_heads_are_pruned_whole(prepared):
    """Q/K/V are split into (heads, head_dim): whole heads go together through Q @ K^T and attn @ V
    (batch axes of the MatMuls), which is exact; the out-projection reads them as blocks of head_dim."""
    _, an = prepared("attention")
    heads = _group_with_out(an, "/q/Transpose_output_0")
    assert heads.size == 2 and heads.prunable and heads.exact
    assert {"/q/Transpose_output_0", "/k/Transpose_output_0", "/v/Transpose_output_0"} == _out_layers(heads)
    o = next(m for m in heads.members if m.tensor == "/o/Transpose_output_0")
    assert o.role == "in" and o.positions == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert sorted(g.size for g in an.prunable) == [2, 8, 16]  # heads, residual stream, MLP hidden


def test_fpn_lateral_adds_and_upsample_couple(prepared):
    _, an = prepared("fpn")
    g = _group_with_out(an, "lat3")
    assert _out_layers(g) == {"lat1", "lat2", "lat3"} and g.prunable
    assert not _group_with_out(an, "smooth1").prunable


def test_squeeze_excite_scale_joins_the_gated_group(prepared):
    _, an = prepared("squeeze_excite")
    g = _group_with_out(an, "c1")
    assert {"c1", "se1.fc2", "c2", "se2.fc2"} <= _out_layers(g)
    # the 1-channel spatial gate is broadcast over the channels: its own (unprunable) group
    sp = _group_with_out(an, "spatial")
    assert sp is not g and not sp.prunable and "broadcast" in sp.reason


def test_caffe2_decomposed_bn_and_sum(prepared):
    _, an = prepared("caffe2_sum")
    g = next(g for g in an.groups if {"w0", "w1", "w2"} <= {m.tensor for m in g.members_with_role("out")})
    params = {m.tensor for m in g.members_with_role("param")}
    assert {"s0", "t0", "s1", "t1", "b0", "b2"} <= params
    assert g.prunable


def test_paddle_hardswish_split_slice(prepared):
    _, an = prepared("paddle_hardswish")
    g = next(g for g in an.groups if "w0" in {m.tensor for m in g.members_with_role("out")})
    assert g.prunable and {"dw", "sew2"} <= {m.tensor for m in g.members_with_role("out")}
    assert {"s1", "t1"} <= {m.tensor for m in g.members_with_role("param")}
    wa = next(m for m in g.members if m.tensor == "wa")
    wb = next(m for m in g.members if m.tensor == "wb")
    assert [p for p in wa.positions if p] == [(k,) for k in range(5)]
    assert [p for p in wb.positions if p] == [(k,) for k in range(3)]
    assert (tuple(range(5)) in g.keep_one_of) and (tuple(range(5, 8)) in g.keep_one_of)


def test_decomposed_groupnorm_blocks(prepared):
    _, an = prepared("groupnorm")
    g1, g2 = _group_with_out(an, "stem"), _group_with_out(an, "c1")
    assert (g1.blocks, g2.blocks) == (2, 4) and g1.prunable and g2.prunable
    assert not g1.exact and "GroupNorm" in g1.inexact_reason


def test_tf_nhwc_channels_last(prepared):
    _, an = prepared("tf_nhwc")
    g0 = next(g for g in an.groups if "w0" in {m.tensor for m in g.members_with_role("out")})
    assert g0.prunable and {"bias0", "scale0"} <= {m.tensor for m in g0.members_with_role("param")}
    g1 = next(g for g in an.groups if "w1" in {m.tensor for m in g.members_with_role("out")})
    fc = next(m for m in g1.members if m.tensor == "fc")
    assert fc.positions == tuple(tuple(range(c, 80, 5)) for c in range(5))  # channels minor: stride 5
