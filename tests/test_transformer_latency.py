"""Latency-aware allocation on a transformer encoder (issue 21.5): the per-layer latency tables time
the head and FFN MatMuls at the sequence length given by ``--input-shape`` (not at 1, not unknown),
whole heads prune under the profile's ``channel_multiple``, and ``prune --target-speedup`` runs end
to end on the ``ci-cpu`` profile with the measured speedup reported.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cli_util import run_cli
from conftest import run_ort
from transformer_models import BertLike, bert_feeds, export_bert, sequence_task
from onnxprune.channels import analyze_channels
from onnxprune.core.prepare import prepare
from onnxprune.structured import latency_table as lt
from onnxprune.structured.allocate import Limits, column_limits
from onnxprune.structured.latency_alloc import valid_counts

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, LAYERS, SEQ = 64, 8, 256, 2, 32
SHAPES = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, one_torch_thread):
    """A 2-layer encoder (hidden 64, 8 heads of 8, FFN 256), dynamic batch and sequence; latency does
    not depend on the weights, so it is not trained."""
    torch.manual_seed(0)
    return export_bert(BertLike(D, HEADS, FFN, LAYERS, max_len=64).eval(), tmp_path_factory.mktemp("enc") / "enc.onnx")


def _head_and_ffn_groups(an):
    return [g for g in an.prunable if g.size == HEADS], [g for g in an.prunable if g.size == FFN]


def test_table_layers_are_the_matmuls_at_the_given_sequence_length(encoder):
    """Every q/k/v/out and FFN MatMul is a table layer, and so are the two attention products
    (``Q @ K^T``, ``attn @ V``), whose widths are head counts; every timing model reads the given
    sequence length. (The exporter's run-time slice of the position ids leaves the batch of every
    activation symbolic in plain ONNX inference: without the shapes folded as for MACs no MatMul
    was timed at all.)"""
    prep = prepare(str(encoder), SHAPES)
    an = analyze_channels(prep.view)
    ids = [g.id for g in an.prunable]
    assert not lt.find_layers(prep.view, an, ids)  # the raw view: no static MatMul input
    view = lt.static_view(prep.view)
    layers = lt.find_layers(view, an, ids)
    weighted = [l for l in layers if l.head_axis is None]
    attention = [l for l in layers if l.head_axis is not None]
    assert len(weighted) == 6 * LAYERS and {l.op for l in weighted} == {"MatMul"}  # q, k, v, out, fc1, fc2
    assert {l.in_full for l in weighted if l.in_parts} == {D, FFN}  # out-projection and fc2 read the groups
    assert len(attention) == 2 * LAYERS
    heads, _ = _head_and_ffn_groups(an)
    assert {l.out_parts[0][0] for l in attention} == {g.id for g in heads}
    assert all(l.head_axis == 1 and l.out_full == HEADS and not l.in_parts for l in attention)
    assert {lt.layer_macs(view, l) for l in attention} == {HEADS * SEQ * SEQ * (D // HEADS)}
    opset = [o for o in view.model.opset_import if o.domain in ("", "ai.onnx")]
    variants = lt._plan_variants(layers)
    chunks = lt._chunks(view, layers, variants, opset)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for m, _ in chunks for i in m.graph.input}
    tags = {tag: layers[i] for _, t in chunks for tag, (i, _, _) in t.items()}
    for tag, layer in tags.items():
        if layer.head_axis is None:
            assert shapes[f"x_{tag}"][:2] == [1, SEQ], shapes[f"x_{tag}"]
        else:  # [1, heads, SEQ, head_dim] @ [1, heads, head_dim, SEQ] (or attn @ V) at fewer heads
            a, b = shapes[f"a_{tag}"], shapes[f"b_{tag}"]
            assert a[0] == b[0] == 1 and a[1] == b[1] <= HEADS and SEQ in a[2:] and SEQ in b[2:]
    assert {shapes[f"a_{t}"][1] for t, l in tags.items() if l.head_axis is not None} == {8, 6, 4, 2}


@pytest.fixture(scope="module")
def small(tmp_path_factory, one_torch_thread):
    """One layer, hidden 32, 8 heads of 4 columns."""
    torch.manual_seed(0)
    return export_bert(BertLike(32, 8, 256, 1).eval(), tmp_path_factory.mktemp("small") / "small.onnx")


def test_channel_multiple_counts_columns_so_whole_heads_prune(small):
    """With ``channel_multiple`` 8 an 8-head group could only stay whole if the head count were
    rounded; counted in columns (8 heads of 4 columns here: 2 heads = 8 columns) heads go two at a
    time, and an FFN's single columns still go 8 at a time."""
    prep = prepare(str(small), {"input_ids": (1, 8), "attention_mask": (1, 8)})
    heads, ffn = _head_and_ffn_groups(analyze_channels(prep.view))
    limits = Limits(max_ratio=0.9, round_to=8)
    for g in heads:
        assert column_limits(g, limits).round_to == 2
        assert valid_counts(g.size, g.blocks, column_limits(g, limits)) == [8, 6, 4, 2]
        assert valid_counts(g.size, g.blocks, limits) == [8]  # the head count rounded: nothing goes
    for g in ffn:
        assert column_limits(g, limits) is limits


@pytest.mark.parametrize("data_aware", [False, True], ids=["l1", "activation"])
def test_target_speedup_on_an_encoder_end_to_end(encoder, tmp_path, monkeypatch, data_aware):
    """``prune --structured --target-speedup 1.3 --hw ci-cpu`` with the sequence length from
    ``--input-shape``: measured (interleaved) speedup reported with where it was taken, heads pruned
    whole, the written model still takes any batch and sequence length. With ``--criterion
    activation --calibrate``, heads and FFN are scored on the data (padding left out) and the chosen
    model is re-fitted."""
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fast.onnx"
    extra = []
    if data_aware:
        ids, mask, _ = sequence_task(48, SEQ, seed=3)
        np.savez(tmp_path / "cal.npz", input_ids=ids, attention_mask=mask)
        extra = ["--criterion", "activation", "--calibrate", f"npz:{tmp_path / 'cal.npz'}"]
    code, stdout, err = run_cli("prune", encoder, "-o", out, "--structured", "--target-speedup", "1.3", "--hw", "ci-cpu",
                                "--input-shape", f"input_ids=1x{SEQ}", "--input-shape", f"attention_mask=1x{SEQ}",
                                *extra, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["criterion"] == ("activation" if data_aware else "l1")
    if data_aware:
        assert s["calibration"]["mask"] == "attention_mask" and s["calibration"]["method"] in ("refit", "bn", "none")
    la = s["latency_allocation"]
    assert s["target"]["kind"] == "speedup" and s["target"]["achieved"] == la["achieved"]["measured_speedup"]
    assert la["achieved"]["measured_on"] and la["table"]["measured_on"]
    assert la["table"]["layers"] == 8 * LAYERS and not la["table"]["untimed"]  # 6 MatMuls, 2 attention products
    assert s["macs_after"] < s["macs_before"]
    assert la["achieved"]["measured_speedup"] > 1.0  # fewer MACs on the same runtime: faster (1.3x here)
    # heads whole: q/k/v keep a multiple of head_dim columns, the out projection as many rows
    pruned = onnx.load(str(out))
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    dh = D // HEADS
    kept_heads = {g["kept"] for g in s["groups"] if g["total"] == HEADS}
    by_node = {n.name: n for n in pruned.graph.node}
    for layer in range(LAYERS):
        cols = {weights[by_node[f"/layers.{layer}/attn/{p}/MatMul"].input[1]].shape[1] for p in ("query", "key", "value")}
        rows = weights[by_node[f"/layers.{layer}/attn/dense/MatMul"].input[1]].shape[0]
        assert len(cols) == 1 and cols == {rows} and rows % dh == 0 and rows // dh in kept_heads
    for batch, seq in ((1, SEQ), (3, 20)):
        (emb,) = run_ort(pruned, bert_feeds(batch, seq))
        assert emb.shape == (batch, D) and np.isfinite(emb).all()


def test_target_speedup_without_the_sequence_length_says_which_input(encoder, tmp_path, monkeypatch):
    """Symbolic batch/sequence: nothing can be timed; the error names the inputs and --input-shape."""
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fast.onnx"
    code, _, err = run_cli("prune", encoder, "-o", out, "--structured", "--target-speedup", "1.3", "--hw", "ci-cpu")
    assert code != 0 and "Traceback" not in err
    assert "'input_ids'" in err and "--input-shape" in err
    assert not out.exists()
