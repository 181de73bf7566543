"""Transformers as exporters write them: heads and FFN prune exactly, dynamic axes stay, MACs count
attention at the given sequence length.

Exactness is the zeroed-channel oracle (see :mod:`arch_zoo`): the original with a removed head's
output-projection rows (and a removed FFN column's down-projection rows) zeroed gives the pruned
model's outputs, at sequence lengths and batch sizes other than the analysed one.
"""
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
from transformer_models import BertLike, PackedViT, bert_feeds, export_bert, export_vit, train_bert
from onnxprune.channels import analyze_channels, apply_plan
from onnxprune.metrics.inspection import inspect_model
from onnxprune.core.prepare import prepare
from onnxprune.structured.prune import prune_structured

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, LAYERS = 16, 4, 32, 2
SHAPES = {"input_ids": (1, 8), "attention_mask": (1, 8)}


@pytest.fixture(scope="module")
def bert(tmp_path_factory, one_torch_thread):
    """A trained 2-layer BERT-style encoder, TorchScript export, dynamic batch and sequence."""
    torch.manual_seed(0)
    return export_bert(train_bert(BertLike(D, HEADS, FFN, LAYERS)), tmp_path_factory.mktemp("bert") / "bert.onnx")


@pytest.fixture(scope="module")
def vit(tmp_path_factory, one_torch_thread):
    torch.manual_seed(0)
    return export_vit(PackedViT(D, HEADS, FFN, LAYERS), tmp_path_factory.mktemp("vit") / "vit.onnx")


def _role_tensors(group, role):
    return {m.node.split("/")[-2] for m in group.members_with_role(role)}


def _oracle(prep, an, feeds_list, seed=0):
    """Prune about half of every exact prunable group; the pruned model equals the zeroed original
    on every feed (other batch sizes and lengths than the analysed ones)."""
    plan = random_plan(an, np.random.default_rng(seed), groups=[g for g in an.prunable if g.exact])
    pruned = apply_plan(prep.model, an, plan)
    zeroed = zero_removed_inputs(prep.model, an, plan)
    for feeds in feeds_list:
        ref, out, dense = run_ort(zeroed, feeds), run_ort(pruned, feeds), run_ort(prep.model, feeds)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)
        assert not np.allclose(out[0], dense[0], atol=1e-3)  # something was really removed
    return pruned, plan


# ------------------------------------------------------------------------- BERT-style, TorchScript
@pytest.mark.parametrize("shapes", [SHAPES, {"input_ids": (2, 12), "attention_mask": (2, 12)}, None],
                         ids=["1x8", "2x12", "symbolic"])
def test_bert_heads_and_ffn_are_groups(bert, shapes):
    """The head split reads its target at run time (Shape -> Gather -> Concat -> Reshape): with the
    input shapes it is evaluated, without them the constant part (heads, head_dim) is still read
    between the symbolic batch and sequence dims. Each layer: one group of whole heads (q, k, v
    produce, the output projection consumes) and one FFN group."""
    an = analyze_channels(prepare(bert, shapes).view)
    heads = [g for g in an.prunable if g.size == HEADS]
    ffn = [g for g in an.prunable if g.size == FFN]
    assert len(heads) == LAYERS and len(ffn) == LAYERS
    for g in heads:
        assert g.exact and _role_tensors(g, "out") == {"query", "key", "value"} and _role_tensors(g, "in") == {"dense"}
        q = next(m for m in g.members_with_role("out") if "query" in m.node)
        assert [len(p) for p in q.positions] == [D // HEADS] * HEADS  # a group channel is a whole head
    hidden = [g for g in an.groups if not g.prunable]  # the residual stream, from the embedding tables
    assert len(hidden) == 1 and "embedding table 'tok.weight'" in hidden[0].reason and "--prune-hidden" in hidden[0].reason


@pytest.mark.parametrize("shapes", [SHAPES, None], ids=["1x8", "symbolic"])
def test_bert_prunes_exactly_and_keeps_dynamic_axes(bert, shapes):
    prep = prepare(bert, shapes)
    an = analyze_channels(prep.view)
    pruned, _ = _oracle(prep, an, [bert_feeds(1, 8), bert_feeds(3, 5, seed=2), bert_feeds(2, 13, seed=3)])
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [d.dim_param or d.dim_value for d in pruned.graph.output[0].type.tensor_type.shape.dim] == ["batch", D]


def _encoder_macs(batch, seq, heads=HEADS, ffn=FFN):
    """q/k/v/out projections, Q @ K^T and attention @ V, and the FFN, per token of every layer."""
    width = heads * (D // HEADS)
    per_layer = 3 * seq * D * width + seq * width * D + 2 * seq * seq * width + 2 * seq * D * ffn
    return batch * LAYERS * per_layer


def test_bert_macs_at_the_given_sequence_length(bert):
    assert inspect_model(bert, SHAPES)["macs"] == _encoder_macs(1, 8)
    assert inspect_model(bert, {"input_ids": (2, 16), "attention_mask": (2, 16)})["macs"] == _encoder_macs(2, 16)
    info = inspect_model(bert)
    assert info["macs"] is None and "--input-shape" in info["macs_unknown_reason"]


def test_bert_prune_halves_heads_and_ffn_and_macs(bert, tmp_path):
    """The CLI at --ratio 0.5: half the heads and FFN columns go, MACs at the given length follow."""
    out = tmp_path / "half.onnx"
    code, stdout, err = run_cli("prune", bert, "-o", out, "--structured", "--ratio", "0.5", "--json",
                                "--input-shape", "input_ids=1x8", "--input-shape", "attention_mask=1x8")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["macs_before"] == _encoder_macs(1, 8)
    assert summary["macs_after"] == _encoder_macs(1, 8, heads=HEADS // 2, ffn=FFN // 2)
    feeds = bert_feeds(2, 11)
    assert run_ort(out, feeds)[0].shape == (2, D)
    assert inspect_model(out, {"input_ids": (1, 8), "attention_mask": (1, 8)})["macs"] == summary["macs_after"]


def test_round_to_never_splits_a_head(bert):
    """--round-to counts group channels, and a head group's channel is a whole head: the query
    projection keeps a multiple of head_dim columns whatever the rounding."""
    res = prune_structured(bert, ratio=0.3, round_to=3, input_shapes=SHAPES)
    inits = {i.name: i for i in res.model.graph.initializer}
    dh = D // HEADS
    for node in res.model.graph.node:
        if node.op_type == "MatMul" and "/attn/query/" in node.name:
            cols = inits[node.input[1]].dims[1]
            assert cols % dh == 0 and cols < D
    assert run_ort(res.model, bert_feeds(2, 6))[0].shape == (2, D)


# ------------------------------------------------------------------------- nn.MultiheadAttention
def test_packed_multihead_attention_prunes_whole_heads(vit):
    """torchvision's ViT: one packed in-projection [D, 3D] split into q/k/v, viewed [S, B*H, dh]:
    a head's q, k and v columns go together; the batch stays free (2 and 3 run)."""
    prep = prepare(vit, {"x": (1, 1, 8, 8)})
    an = analyze_channels(prep.view)
    heads = [g for g in an.prunable if g.size == HEADS]
    assert len(heads) == LAYERS
    for g in heads:
        (w,) = g.members_with_role("out")[:1]
        assert w.axis == 1 and sorted(len(p) for p in w.positions) == [3 * D // HEADS] * HEADS
    rng = np.random.default_rng(0)
    _oracle(prep, an, [{"x": rng.standard_normal((b, 1, 8, 8)).astype(np.float32)} for b in (1, 3)])


# ------------------------------------------------------------------------- ORT contrib ops
def test_fused_attention_projection_input_is_a_row_member():
    """ONNX Runtime's fused com.microsoft Attention (packed weights, heads as an attribute) has a
    rule (``tests/test_ort_fused.py``): its input's channels are the packed weight's rows, so the
    projection feeding it prunes; here its output is a model output, which fixes its heads."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{len(s)}_{s}")  # noqa: E731
    wi, bi, wa, ba = w(D, D), w(D), w(D, 3 * D), w(3 * D)
    nodes = [helper.make_node("MatMul", ["x", wi.name], ["h0"], name="proj"),
             helper.make_node("Add", ["h0", bi.name], ["h"], name="proj_bias"),
             helper.make_node("Attention", ["h", wa.name, ba.name], ["y"], name="attn", domain="com.microsoft",
                              num_heads=HEADS)]
    g = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [wi, bi, wa, ba])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    an = analyze_channels(prepare(m).view)
    (g,) = [g for g in an.groups if any(mem.tensor == wi.name for mem in g.members)]
    assert g.prunable and (wa.name, 0, "in") in {(mem.tensor, mem.axis, mem.role) for mem in g.members}
    (heads,) = [g for g in an.groups if any(mem.tensor == wa.name and mem.role == "out" for mem in g.members)]
    assert heads.size == HEADS and not heads.prunable and "reaches model output 'y'" in heads.reason


# ------------------------------------------------------------------------- Llama/Qwen-style decoder
KV = 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory, one_torch_thread):
    """Decoder-only, grouped-query attention (4 query heads sharing 2 KV heads), RoPE, SwiGLU."""
    from transformer_models import TinyLlama, export_llama
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    plain = export_llama(TinyLlama(D, HEADS, KV, FFN, LAYERS).eval(), d / "llama.onnx")
    torch.manual_seed(0)
    cached = export_llama(TinyLlama(D, HEADS, KV, FFN, LAYERS, cache=True).eval(), d / "llama_kv.onnx")
    return plain, cached


def _llama_feeds(model, batch, seq, past=3, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(1, 12, (batch, seq)).astype(np.int64)}
    for i in model.graph.input[1:]:
        feeds[i.name] = rng.standard_normal((batch, KV, past, D // HEADS)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("shapes", [{"input_ids": (1, 6)}, None], ids=["1x6", "symbolic"])
def test_gqa_kv_head_goes_with_the_query_heads_sharing_it(llama, shapes):
    """A group channel is one KV head together with the query heads that read it (repeat_kv), so
    removing it removes k/v columns of one head and q columns of HEADS // KV heads; RoPE's
    rotate-half (run-time Slice bounds on head_dim) and the run-time expand/reshape follow."""
    prep = prepare(llama[0], shapes)
    an = analyze_channels(prep.view)
    heads = [g for g in an.prunable if g.size == KV]
    assert len(heads) == LAYERS and len([g for g in an.prunable if g.size == FFN]) == LAYERS
    dh, rep = D // HEADS, HEADS // KV
    for g in heads:
        cols = {m.node.split("/")[-2]: sorted(len(p) for p in m.positions) for m in g.members_with_role("out")}
        assert cols == {"q": [rep * dh] * KV, "k": [dh] * KV, "v": [dh] * KV}
        assert {m.node.split("/")[-2] for m in g.members_with_role("in")} == {"o"}
    pruned, plan = _oracle(prep, an, [_llama_feeds(prep.model, b, s) for b, s in ((1, 6), (3, 4), (2, 9))])
    q = next(n for n in pruned.graph.node if n.name.endswith("/q/MatMul"))
    kept = len(plan[next(g.id for g in heads if any("layers.0/q/" in m.node for m in g.members))])
    assert next(i for i in pruned.graph.initializer if i.name == q.input[1]).dims[1] == kept * rep * dh


def test_kv_cache_inputs_fix_the_kv_heads(llama):
    """With past keys/values as graph inputs (and presents as outputs) the KV head count is part of
    the interface: those head groups stay whole, the reason names the cache input; the FFN prunes."""
    shapes = {"input_ids": (1, 6), **{f"past_key_values.{i}.{t}": (1, KV, 3, D // HEADS)
                                      for i in range(LAYERS) for t in ("key", "value")}}
    prep = prepare(llama[1], shapes)
    an = analyze_channels(prep.view)
    heads = [g for g in an.groups if g.size == KV]
    assert len(heads) == LAYERS and not any(g.prunable for g in heads)
    assert all("reaches model input 'past_key_values." in g.reason for g in heads)
    assert len([g for g in an.prunable if g.size == FFN]) == LAYERS
    _oracle(prep, an, [_llama_feeds(prep.model, b, s) for b, s in ((1, 6), (2, 1))])


@pytest.mark.parametrize("gelu", ["BiasGelu", "FastGelu"])
def test_ort_fused_ffn_and_skip_layernorm_prune(gelu):
    """An FFN after ONNX Runtime's transformer optimizer: MatMul -> com.microsoft BiasGelu/FastGelu
    (bias fused in) -> MatMul -> SkipLayerNormalization (residual Add + bias + LayerNorm fused). The
    FFN group prunes exactly (the fused bias is sliced with it); the residual stream, a model input
    here, stays."""
    rng = np.random.default_rng(0)
    arr = {"w1": (D, FFN), "b1": (FFN,), "w2": (FFN, D), "gamma": (D,), "beta": (D,), "b2": (D,)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in arr.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node(gelu, ["h", "b1"], ["a"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["a", "w2"], ["f"], name="fc2"),
             helper.make_node("SkipLayerNormalization", ["f", "x", "gamma", "beta", "b2"], ["y"], name="skip_ln",
                              domain="com.microsoft", epsilon=1e-5)]
    g = helper.make_graph(nodes, "fused_ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    prep = prepare(m)
    an = analyze_channels(prep.view)
    (ffn,) = an.prunable
    assert ffn.size == FFN and ffn.exact and {(mm.tensor, mm.role) for mm in ffn.members if mm.role != "act"} == {
        ("w1", "out"), ("b1", "param"), ("w2", "in")}
    feeds = {"x": rng.standard_normal((3, 8, D)).astype(np.float32)}
    _oracle(prep, an, [feeds])


def test_allow_io_change_prunes_kv_heads_through_the_cache(llama, tmp_path):
    """--allow-io-change: the cache inputs and outputs shrink with the KV heads; the summary lists
    every changed input/output shape. The pruned model, fed the kept heads' cache, gives the zeroed
    original's logits and the kept heads' presents."""
    shapes = {"input_ids": (1, 6), **{f"past_key_values.{i}.{t}": (1, KV, 3, D // HEADS)
                                      for i in range(LAYERS) for t in ("key", "value")}}
    prep = prepare(llama[1], shapes)
    an = analyze_channels(prep.view, allow_io_change=True)
    heads = [g for g in an.prunable if g.size == KV]
    assert len(heads) == LAYERS and set(an.io) == {i.name for i in prep.model.graph.input[1:]} | {
        o.name for o in prep.model.graph.output[1:]}
    plan = {g.id: np.array([1]) for g in heads}
    pruned = apply_plan(prep.model, an, plan)
    zeroed = zero_removed_inputs(prep.model, an, plan)
    kept = {m.tensor: m.positions.of_channels([1]) for g in heads for m in g.members if m.tensor in an.io}
    for b, s in ((1, 6), (2, 3)):
        feeds = _llama_feeds(prep.model, b, s, seed=b)
        ref = run_ort(zeroed, feeds)
        small = {k: (v[:, kept[k]] if k in kept else v) for k, v in feeds.items()}
        out = run_ort(pruned, small)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)
        for o, r, p in zip(prep.model.graph.output[1:], ref[1:], out[1:]):
            np.testing.assert_allclose(p, r[:, kept[o.name]], rtol=1e-5, atol=1e-5)

    code, stdout, err = run_cli("prune", llama[1], "-o", tmp_path / "kv.onnx", "--structured", "--ratio", "0.5",
                                "--allow-io-change", "--json",
                                *[a for k, v in shapes.items() for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}")])
    assert code == 0, err
    changes = {c["name"]: c for c in json.loads(stdout)["io_changes"]}
    assert set(changes) == set(an.io)
    assert changes["past_key_values.0.key"]["after"] == ["batch", 1, "past_sequence", D // HEADS]
    assert changes["present.1.value"]["kind"] == "output" and changes["present.1.value"]["after"][1] == 1
    shape_args = [a for k, v in shapes.items() for a in ("--input-shape", f"{k}={'x'.join(map(str, v))}")]
    for extra, prunable_kv in (((), 0), (("--allow-io-change",), LAYERS)):  # analyze sees what prune sees
        code, stdout, err = run_cli("analyze", llama[1], "--json", *shape_args, *extra)
        assert code == 0, err
        a = json.loads(stdout)
        assert sum(g["prunable"] and g["size"] == KV for g in a["groups"]) == prunable_kv
        assert set(a.get("io", {})) == (set(an.io) if extra else set())


def test_prune_hidden_is_opt_in(llama, tmp_path):
    """The hidden size starts at the embedding table's columns and runs through every layer (RMSNorm
    statistics span it: inexact). Left whole, saying so, unless --prune-hidden; then the table, every
    projection and norm weight and the LM head's rows shrink, and the model runs at any length."""
    prep = prepare(llama[0])
    (hidden,) = [g for g in analyze_channels(prep.view).groups if g.size == D]
    assert not hidden.prunable and "--prune-hidden" in hidden.reason
    (hidden,) = [g for g in analyze_channels(prep.view, prune_hidden=True).groups if g.size == D]
    assert hidden.prunable and not hidden.exact and ("embed.weight", 1, "out") in {
        (m.tensor, m.axis, m.role) for m in hidden.members}
    out = tmp_path / "hidden.onnx"
    code, stdout, err = run_cli("prune", llama[0], "-o", out, "--structured", "--ratio", "0.5", "--prune-hidden",
                                "--json", "--input-shape", "input_ids=1x8")
    assert code == 0, err
    summary = json.loads(stdout)
    assert any(g["total"] == D and g["kept"] == D // 2 and g["inexact"] for g in summary["groups"])
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["embed.weight"] == [12, D // 2]
    for b, s in ((1, 8), (2, 3)):
        assert run_ort(out, _llama_feeds(prep.model, b, s))[0].shape == (b, s, 12)


class _BertClassifier(torch.nn.Module):
    """BertLike with a linear head: the hidden size reaches no model output."""

    def __init__(self):
        super().__init__()
        self.bert, self.head = BertLike(D, HEADS, FFN, LAYERS), torch.nn.Linear(D, 3)

    def forward(self, input_ids, attention_mask):  # BertLike's forward, classifying the first token
        b = self.bert
        x = b.ln(b.tok(input_ids) + b.pos(b.position_ids[:, :input_ids.size(1)]))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in b.layers:
            x = layer(x, mask_bias)
        return self.head(x[:, 0])


@pytest.mark.parametrize("shape_args", [[], ["--input-shape", "input_ids=1x8"]], ids=["symbolic", "1x8"])
def test_prune_hidden_takes_the_position_table_with_the_input_shapes_given(tmp_path, shape_args, one_torch_thread):
    """The position table is read by a Gather of ``position_ids[:, :S]``: with the input shapes given
    that Gather folds to a constant in the analysed view, but the table is still indexed at run time
    in the model, so its columns go with the hidden size (before: "computed at run time", left whole)."""
    torch.manual_seed(0)
    path = export_bert(_BertClassifier().eval(), tmp_path / "cls.onnx")
    out = tmp_path / "hidden.onnx"
    code, stdout, err = run_cli("prune", path, "-o", out, "--structured", "--ratio", "0.5", "--prune-hidden", "--json",
                                *shape_args)
    assert code == 0, err
    assert any(g["total"] == D and g["kept"] == D // 2 for g in json.loads(stdout)["groups"])
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["bert.pos.weight"][1] == dims["bert.tok.weight"][1] == D // 2
    for b, s in ((1, 8), (3, 13)):
        assert run_ort(out, bert_feeds(b, s))[0].shape == (b, 3)
