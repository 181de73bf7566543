"""Real Hugging Face ``transformers`` models, exported by TorchScript and by the dynamo exporter,
prune as the hand-written transformers do: heads and FFN are groups, ``--ratio 0.5`` halves them,
the pruned model equals the zeroed-channel oracle and runs at other batch and sequence sizes.

Each dynamo case covers one fix: its shared (deduplicated) LayerNorm weights and zero biases are
copied per node, ``--input-shape input_ids=...`` alone binds the ``attention_mask`` dims of the
same name, and a shared ``[B, S, -1, dh]`` Reshape target keeps its ``-1`` (grouped-query attention).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

import hf_models as hf  # noqa: E402
from arch_zoo import random_plan, zero_removed_inputs  # noqa: E402
from cli_util import run_cli  # noqa: E402
from conftest import run_ort  # noqa: E402
from onnxprune.channels import analyze_channels, apply_plan  # noqa: E402
from onnxprune.core.prepare import prepare  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

CASES = [(name, dynamo) for name in ("bert", "vit", "llama") for dynamo in (False, True)]
#: prunable groups / all groups: per layer one head group and one FFN group; the residual stream
#: stays whole (and the LM head's vocabulary, fixed by the output, for Llama)
GROUPS = {"bert": (4, 5), "vit": (4, 5), "llama": (4, 6)}
#: MACs dense / pruned at --ratio 0.5 (the embeddings, the ViT's patch Conv and Llama's LM head stay)
MACS_REDUCTION = {"bert": (1.9, 2.1), "vit": (1.75, 2.0), "llama": (1.6, 1.9)}
SIZES = [(3, 5), (2, 11)]  # batch, sequence: other than the analysed 1x16


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in CASES])
def exported(request, tmp_path_factory, one_torch_thread):
    name, dynamo = request.param
    if dynamo:
        pytest.importorskip("onnxscript")
    path = hf.export(name, tmp_path_factory.mktemp(name) / f"{name}.onnx", dynamo=dynamo)
    prep = prepare(path, hf.shapes(name))
    return name, path, prep, analyze_channels(prep.view)


def test_heads_and_ffn_are_prunable_groups(exported):
    name, _, _, an = exported
    assert (len(an.prunable), len(an.groups)) == GROUPS[name], [g.reason for g in an.groups if not g.prunable]
    heads = hf.KV_HEADS if name == "llama" else hf.HEADS
    assert sorted(g.size for g in an.prunable) == [heads] * hf.LAYERS + [hf.FFN] * hf.LAYERS
    assert all(g.exact for g in an.prunable)


def test_pruned_model_equals_zeroed_original(exported):
    """The oracle at sizes other than the analysed one: removed channels contributed exactly what
    the pruned model lacks, and the dynamic batch and sequence axes still work."""
    name, _, prep, an = exported
    plan = random_plan(an, np.random.default_rng(0), groups=an.prunable)
    pruned, zeroed = apply_plan(prep.model, an, plan), zero_removed_inputs(prep.model, an, plan)
    for batch, seq in SIZES:
        feeds = hf.feeds(name, batch, seq, seed=batch)
        out, ref, dense = run_ort(pruned, feeds)[0], run_ort(zeroed, feeds)[0], run_ort(prep.model, feeds)[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert not np.allclose(out, dense, atol=1e-3)  # something was really removed


def test_prune_ratio_half_halves_macs(exported, tmp_path):
    """The CLI with one --input-shape: MACs fall about 2x and the written model runs at two sizes."""
    name, path, _, _ = exported
    out = tmp_path / "half.onnx"
    (shape_arg,) = [f"{k}={'x'.join(map(str, v))}" for k, v in hf.shapes(name).items()]
    code, stdout, err = run_cli("prune", path, "-o", out, "--structured", "--ratio", "0.5", "--json",
                                "--input-shape", shape_arg)
    assert code == 0, err
    summary = json.loads(stdout)
    low, high = MACS_REDUCTION[name]
    assert low <= summary["macs_reduction"] <= high, summary["macs_reduction"]
    for batch, seq in SIZES:
        y = run_ort(out, hf.feeds(name, batch, seq))[0]
        assert y.shape[0] == batch and (name == "vit" or y.shape[1] == seq)
