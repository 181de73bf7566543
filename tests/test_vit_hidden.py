"""The hidden size of a ViT (Hugging Face's ``ViTEmbeddings``): a conv patch stem, a class token
``cls_token.expand(batch, -1, -1)`` concatenated in front, a learned position table added, pre-LN
layers. It is the residual stream, so it prunes only with ``--prune-hidden`` (as embedding tables
do), and then the class token is cut in its parameter: the exported ``Expand`` is computed at run
time from the batch, though the analysis (batch fixed) folds it to a constant."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
import torch.nn.functional as F

from cli_util import run_cli
from conftest import run_ort
from transformer_models import BertSelfAttention
from onnxprune.channels import analyze_channels
from onnxprune.core.prepare import prepare

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")

D, HEADS, FFN, PATCH, IMAGE, CLASSES = 16, 4, 32, 4, 8, 3
SHAPE = f"pixel_values=1x3x{IMAGE}x{IMAGE}"


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), BertSelfAttention(D, HEADS)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x):
        x = x + self.attn(self.ln1(x), 0.0)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class HFViT(nn.Module):
    def __init__(self):
        super().__init__()
        n = (IMAGE // PATCH) ** 2
        self.patch = nn.Conv2d(3, D, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.randn(1, n + 1, D))
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, CLASSES)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    torch.onnx.export(HFViT().eval(), (torch.randn(1, 3, IMAGE, IMAGE),), str(path), input_names=["pixel_values"],
                      output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    return path


def _hidden(analysis):
    (g,) = [g for g in analysis.groups if any(m.tensor == "patch.weight" and m.role == "out" for m in g.members)]
    return g


def test_the_hidden_size_is_opt_in(vit):
    prep = prepare(str(vit), {"pixel_values": (1, 3, IMAGE, IMAGE)})
    default = analyze_channels(prep.view)
    hidden = _hidden(default)
    assert not hidden.prunable and "the hidden size" in hidden.reason and "--prune-hidden" in hidden.reason
    assert sorted(g.size for g in default.prunable) == [HEADS, HEADS, FFN, FFN]  # heads and FFN still prune
    opted = _hidden(analyze_channels(prep.view, prune_hidden=True))
    assert opted.prunable and not opted.exact  # LayerNorms normalize over it
    # the class token is read through a run-time Expand: the analysis puts its parameter in the group
    assert {("cls_token", 2), ("position_embeddings", 2)} <= {(m.tensor, m.axis) for m in opted.members}


def test_analyze_takes_prune_hidden(vit):
    for extra, prunable in (((), False), (("--prune-hidden",), True)):
        code, stdout, err = run_cli("analyze", vit, "--input-shape", SHAPE, "--json", *extra)
        assert code == 0, err
        (hidden,) = [g for g in json.loads(stdout)["groups"] if g["size"] == D]
        assert hidden["prunable"] is prunable and (prunable or "--prune-hidden" in hidden["reason"])


def test_prune_hidden_cuts_the_class_token_and_runs_at_any_batch(vit, tmp_path):
    out = tmp_path / "half.onnx"
    code, stdout, err = run_cli("prune", vit, "-o", out, "--structured", "--ratio", "0.5", "--prune-hidden",
                                "--input-shape", SHAPE, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert not s["dropped_groups"], s["dropped_groups"]  # was: "member '...Expand_output_0' is not a constant"
    assert {g["total"]: g["kept"] for g in s["groups"]} == {D: D // 2, HEADS: HEADS // 2, FFN: FFN // 2}
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    dense = {i.name: numpy_helper.to_array(i) for i in onnx.load(vit).graph.initializer}
    kept = np.flatnonzero(np.isin(dense["patch.bias"], inits["patch.bias"]))  # the columns the plan kept
    assert inits["cls_token"].shape == (1, 1, D // 2)
    np.testing.assert_array_equal(inits["cls_token"], dense["cls_token"][..., kept])
    assert inits["position_embeddings"].shape[-1] == D // 2
    for batch in (1, 3):
        (logits,) = run_ort(str(out), {"pixel_values": np.random.default_rng(batch).standard_normal(
            (batch, 3, IMAGE, IMAGE)).astype(np.float32)})
        assert logits.shape == (batch, CLASSES) and np.isfinite(logits).all()
    assert s["macs_reduction"] > 2.5
