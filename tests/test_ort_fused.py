"""Graphs of ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``): the
BERT-style encoder of :mod:`transformer_models` fused into com.microsoft ``Attention`` (packed q|k|v
weight, ``num_heads`` attribute), ``SkipLayerNormalization``, ``BiasGelu`` and
``EmbedLayerNormalization``. Heads and FFN prune exactly (zeroed-channel oracle), ``num_heads``
follows, MACs are counted (ONNX Runtime's symbolic shape inference knows the contrib ops) and
equal the unfused export's; a KV cache on the fused op fixes its heads."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from arch_zoo import random_plan, zero_removed_inputs
from cli_util import run_cli
from conftest import run_ort
from transformer_models import BertLike, bert_feeds, export_bert
from onnxprune.channels import analyze_channels, apply_plan
from onnxprune.core.prepare import prepare

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, LAYERS = 32, 4, 64, 2
SHAPES = {"input_ids": (1, 8), "attention_mask": (1, 8)}
SHAPE_ARGS = ["--input-shape", "input_ids=1x8", "--input-shape", "attention_mask=1x8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread):
    """(unfused TorchScript export, the same after ONNX Runtime's BERT optimizer)."""
    from onnxruntime.transformers.optimizer import optimize_model
    d = tmp_path_factory.mktemp("fused")
    torch.manual_seed(0)
    plain = export_bert(BertLike(D, HEADS, FFN, LAYERS).eval(), d / "bert.onnx")
    fused = optimize_model(str(plain), model_type="bert", num_heads=HEADS, hidden_size=D)
    fused.save_model_to_file(str(d / "bert_ort.onnx"))
    ops = {(n.domain, n.op_type) for n in onnx.load(d / "bert_ort.onnx").graph.node}
    assert {("com.microsoft", "Attention"), ("com.microsoft", "SkipLayerNormalization")} <= ops
    return plain, d / "bert_ort.onnx"


def test_fused_heads_and_ffn_prune_exactly(models):
    prep = prepare(str(models[1]), SHAPES)
    an = analyze_channels(prep.view)
    heads = [g for g in an.prunable if g.size == HEADS]
    assert len(heads) == LAYERS and len([g for g in an.prunable if g.size == FFN]) == LAYERS
    assert all(any(m.node.startswith("Attention") and m.role == "out" for m in g.members) for g in heads)
    plan = random_plan(an, np.random.default_rng(0), groups=[g for g in an.prunable if g.exact])
    pruned, zeroed = apply_plan(prep.model, an, plan), zero_removed_inputs(prep.model, an, plan)
    kept = {g.id: len(plan[g.id]) for g in heads}
    assert {attr.i for n in pruned.graph.node if n.op_type == "Attention" for attr in n.attribute
            if attr.name == "num_heads"} == set(kept.values()) and min(kept.values()) < HEADS
    for b, s in ((1, 8), (3, 13)):
        feeds = bert_feeds(b, s, seed=b)
        ref, out, dense = run_ort(zeroed, feeds)[0], run_ort(pruned, feeds)[0], run_ort(prep.model, feeds)[0]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        assert not np.allclose(out, dense, atol=1e-3)


def test_fused_macs_are_counted_and_match_the_unfused_export(models, tmp_path):
    figures = []
    for src in models:
        code, out, err = run_cli("prune", src, "-o", tmp_path / f"{src.stem}_half.onnx", "--structured", "--ratio", "0.5",
                                 "--json", *SHAPE_ARGS)
        assert code == 0, err
        s = json.loads(out)
        assert {g["total"]: g["kept"] for g in s["groups"]} == {HEADS: HEADS // 2, FFN: FFN // 2}
        figures.append((s["macs_before"], s["macs_after"]))
    assert figures[0] == figures[1] and figures[0][0] == 2 * figures[0][1]
    code, out, err = run_cli("inspect", models[1], "--json", *SHAPE_ARGS)
    assert code == 0, err
    assert json.loads(out)["macs"] == figures[0][0]  # was n/a: ONNX does not know the contrib ops' shapes


def test_a_kv_cache_on_the_fused_op_fixes_its_heads():
    """``past`` (input 4) holds ``[2, batch, heads, past, head_dim]``: the head count is part of the
    interface, so the heads stay whole, naming the input; the projection feeding it still prunes."""
    rng = np.random.default_rng(0)
    w = lambda name, *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)  # noqa: E731
    wi, wa, ba, wo = w("wi", D, D), w("wa", D, 3 * D), w("ba", 3 * D), w("wo", D, D)
    nodes = [helper.make_node("MatMul", ["x", "wi"], ["h"], name="proj"),
             helper.make_node("Attention", ["h", "wa", "ba", "", "past"], ["a", "present"], name="attn",
                              domain="com.microsoft", num_heads=HEADS, unidirectional=1),
             helper.make_node("MatMul", ["a", "wo"], ["y"], name="out")]
    g = helper.make_graph(nodes, "cached", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, D]),
                                            helper.make_tensor_value_info("past", TensorProto.FLOAT,
                                                                          [2, 1, HEADS, 3, D // HEADS])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("present", TensorProto.FLOAT, None)], [wi, wa, ba, wo])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    an = analyze_channels(prepare(m).view)
    (heads,) = [g for g in an.groups if any(mem.tensor == "wa" and mem.role == "out" for mem in g.members)]
    assert not heads.prunable and "'past'" in heads.reason
    assert any(g.prunable and any(mem.tensor == "wi" and mem.role == "out" for mem in g.members) for g in an.groups)
