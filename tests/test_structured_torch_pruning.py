"""Cross-check with torch-pruning: on the same PyTorch models, local L1 pruning at the same ratio
keeps the same number of channels in every layer and gives the same MACs.

torch-pruning: ``MagnitudePruner(importance=MagnitudeImportance(p=1), global_pruning=False)`` with the
classifier ignored keeps ``int(C * (1 - r))`` channels per group, as onnxprune does (onnxprune adds
1e-9 before flooring so float noise such as 10 * (1 - 0.7) = 2.9999999999999996 keeps 3, not 2;
the ratios below are exact either way). Which channels are kept may differ (torch-pruning normalizes
the reduced group score, onnxprune each member before reducing), not how many.

Other deliberate differences, outside these cases: ``round_to`` rounds kept counts to the *nearest*
multiple (torch-pruning: down, possibly to 0) and never below ``min_keep``/``max_ratio``; a group is
never emptied (torch-pruning skips groups with a 1-channel layer but can prune others to 0 at
``max_pruning_ratio=1``); Split/Slice windows keep channels in every window.
"""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn as nn

import zoo
from onnxprune.metrics.inspection import inspect_model
from onnxprune.structured.prune import prune_structured
from onnxprune.bridge.torch_export import export_torch

tp = pytest.importorskip("torch_pruning")

CASES = [("conv_chain", 0.5), ("conv_chain", 0.25), ("tiny_resnet", 0.5), ("tiny_resnet", 0.375)]


def _weight_shapes_by_module(model: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Conv/Gemm weight shape per PyTorch module name, found through node names (which pruning keeps)
    and the original's weight names (``features.0.weight`` -> ``features.0``)."""
    module_of = {n.name: n.input[1].rsplit(".", 1)[0] for n in original.graph.node if n.op_type in ("Conv", "Gemm")}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {module_of[n.name]: inits[n.input[1]] for n in model.graph.node if n.name in module_of}


@pytest.mark.parametrize("name, ratio", CASES)
def test_same_counts_and_macs_as_torch_pruning(name, ratio, tmp_path):
    model = zoo.build(name)
    shape = zoo.ZOO[name][1]
    example = torch.randn(*shape)
    path = export_torch(model, (example,), tmp_path / "dense.onnx")

    ours = prune_structured(path, ratio=ratio, criterion="l1", scope="local", max_ratio=0.99)

    theirs = copy.deepcopy(model)
    classifier = [m for m in theirs.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(theirs, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[classifier], global_pruning=False)
    pruner.step()
    tp_path = export_torch(theirs, (example,), tmp_path / "tp.onnx")

    original = onnx.load(str(path))
    expected = {n: tuple(m.weight.shape) for n, m in theirs.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert _weight_shapes_by_module(ours.model, original) == expected
    assert ours.summary["macs_after"] == inspect_model(tp_path)["macs"]
    assert ours.summary["params_after"] == inspect_model(tp_path)["params"]
