"""A hardware profile's ``channel_multiple`` counts weight columns, not heads, under ``--ratio`` and
``--target-macs`` as under the latency targets (issue 21.2: heads are pruned whole): rounding the
head count of an 8-head layer to 8 left it whole; counted in columns, ``k`` heads of ``head_dim``
columns are kept where ``k * head_dim`` is a multiple of it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cli_util import run_cli
from conftest import run_ort
from transformer_models import BertLike, bert_feeds, export_bert
from onnxprune.pipeline.steps import prune_stage
from onnxprune.profiling.hw_profile import load_hw_profile
from onnxprune.recipes.schema import Stage

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, SEQ = 48, 8, 64, 8  # head_dim 6: with channel_multiple 8, heads go 4 at a time (24 columns)
SHAPES = ["--input-shape", f"input_ids=1x{SEQ}", "--input-shape", f"attention_mask=1x{SEQ}"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, one_torch_thread):
    """One layer, hidden 48, 8 heads of 6 columns, FFN 64; rounding does not depend on the weights."""
    torch.manual_seed(0)
    return export_bert(BertLike(D, HEADS, FFN, 1).eval(), tmp_path_factory.mktemp("enc") / "enc.onnx")


def _prune(encoder, out, *args):
    code, stdout, err = run_cli("prune", encoder, "-o", out, "--structured", *args, *SHAPES, "--json")
    assert code == 0, err
    return json.loads(stdout)


def _attention_columns(path) -> tuple[set[int], int]:
    """The q/k/v output columns and the out projection's input rows of the written model."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    cols = {weights[nodes[f"/layers.0/attn/{p}/MatMul"].input[1]].shape[1] for p in ("query", "key", "value")}
    return cols, weights[nodes["/layers.0/attn/dense/MatMul"].input[1]].shape[0]


@pytest.mark.parametrize("target", [["--ratio", "0.5"], ["--target-macs", "0.6"]], ids=["ratio", "target-macs"])
def test_hw_profile_multiple_counts_head_columns(encoder, tmp_path, target):
    multiple = load_hw_profile("ci-cpu").channel_multiple
    dh = D // HEADS
    assert multiple % dh and HEADS % multiple == 0  # rounding the head count to the multiple keeps all 8
    out = tmp_path / "p.onnx"
    s = _prune(encoder, out, *target, "--hw", "ci-cpu")
    assert s["limits"]["round_to"] == multiple and s["limits"]["round_columns"] is True
    heads = [g for g in s["groups"] if g["total"] == HEADS]
    assert len(heads) == 1 and heads[0]["kept"] < HEADS  # the head group prunes (it stayed whole before)
    kept = heads[0]["kept"]
    assert kept % (multiple // math.gcd(multiple, dh)) == 0 and (kept * dh) % multiple == 0
    cols, rows = _attention_columns(out)
    assert cols == {rows} == {kept * dh} and rows % multiple == 0  # whole heads, kernel-friendly width
    ffn = [g for g in s["groups"] if g["total"] == FFN]
    assert ffn and all(g["kept"] % multiple == 0 for g in ffn)  # single columns: still multiples of 8
    for batch, seq in ((1, SEQ), (2, 13)):  # the written model still takes any batch and length
        (emb,) = run_ort(onnx.load(str(out)), bert_feeds(batch, seq))
        assert emb.shape == (batch, D) and np.isfinite(emb).all()


def test_nearest_head_count_and_explicit_round_to(encoder, tmp_path):
    """``--ratio 0.3`` wants 5.6 -> 5 heads: the nearest count whose columns are a multiple of 8 is 4
    (24 columns); an explicit ``--round-to 8`` rounds the group's own channels (heads) as before."""
    s = _prune(encoder, tmp_path / "a.onnx", "--ratio", "0.3", "--hw", "ci-cpu")
    assert [g["kept"] for g in s["groups"] if g["total"] == HEADS] == [4]
    s = _prune(encoder, tmp_path / "b.onnx", "--ratio", "0.3", "--hw", "ci-cpu", "--round-to", "8")
    assert s["limits"]["round_columns"] is False
    assert [g["kept"] for g in s["groups"] if g["total"] == HEADS] == [HEADS]


def test_recipe_stage_with_hw_counts_head_columns(encoder):
    """A recipe stage naming ``hw:`` rounds as ``prune --hw`` does (whole heads, columns a multiple)."""
    res = prune_stage(str(encoder), Stage(kind="structured", hw="ci-cpu", target={"ratio": 0.5}), seed=0)
    assert res.summary["limits"]["round_columns"] is True
    assert [g["kept"] for g in res.summary["groups"] if g["total"] == HEADS] == [4]
