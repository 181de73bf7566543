"""Acceptance of retraining on ``digits`` (issue: Retraining in PyTorch).

A small CNN defined here is trained dense, then

* pruned structured to half its MACs (``prune_structured(..., target_macs=0.5)``) and retrained, and
* pruned unstructured to 90% global magnitude sparsity and retrained,

both with the *same* retraining budget (:data:`RETRAIN`: epochs, LR schedule, distillation from the
dense model). Each must end within 0.5 points of the dense model's test top-1, and the unstructured
one must keep exactly its zeros. Checkpoints are chosen on the validation split; the test split is
scored once per model with ONNX Runtime on the written file. The measured figures are printed
(``pytest -s``) and attached to the test report (``record_property``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
nn = torch.nn

from onnxprune.datasets import evaluate_onnx, load_dataset  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402
from onnxprune.training import TrainConfig, finetune, train_module  # noqa: E402

pytestmark = pytest.mark.slow

#: how the dense model is trained
DENSE = TrainConfig(epochs=30, lr=0.05, seed=0)
#: the one retraining budget both pruning methods get. Batch-norm statistics are re-estimated
#: (``train_bn``): removing channels or weights changes the distribution every later BN sees, and
#: digits' 1079 training samples are the whole training set, not a small fine-tuning subset.
RETRAIN = TrainConfig(epochs=30, lr=0.01, seed=0, distill_alpha=0.9, distill_temperature=4.0, train_bn=True)
#: "within 0.5 points"
TOLERANCE = 0.005


class DigitsCNN(nn.Module):
    """conv 1->16 -> BN -> ReLU -> conv 16->32 -> BN -> ReLU -> maxpool -> FC 512->64 -> ReLU -> FC 64->10."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_dataset("digits")
    torch.manual_seed(0)
    net = DigitsCNN()
    hist = train_module(net, data, DENSE, progress=False)
    path = tmp_path_factory.mktemp("acceptance") / "dense.onnx"
    export_torch(net, (torch.zeros(1, 1, 8, 8),), path)
    dense = evaluate_onnx(path, data)
    yield {"data": data, "dense_path": path, "dense": dense, "dense_hist": hist}
    torch.set_num_threads(prev)


def _report(record_property, name: str, figures: dict) -> None:
    record_property(name, json.dumps(figures))
    print(f"\n[acceptance] {name}: {json.dumps(figures)}")


def test_dense_accuracy_recorded(setup, record_property):
    d = setup["dense"]
    _report(record_property, "dense", {"test_top1": d["top1"], "samples": d["samples"],
                                       "best_val_top1": setup["dense_hist"]["best_val_top1"],
                                       "config": DENSE.to_dict()})
    assert d["samples"] == 359 and d["top1"] > 0.97


def test_structured_half_macs_recovers_within_half_a_point(setup, record_property):
    from onnxprune.structured.prune import prune_structured

    res = prune_structured(str(setup["dense_path"]), target_macs=0.5)
    assert res.summary["macs_after"] <= 0.5 * res.summary["macs_before"]  # at least 2x fewer MACs
    one_shot = evaluate_onnx(res.model, setup["data"])
    model, hist = finetune(res.model, setup["data"], RETRAIN, teacher=str(setup["dense_path"]), progress=False)
    top1, dense = hist["test"]["top1"], setup["dense"]["top1"]
    _report(record_property, "structured", {
        "macs_reduction": res.summary["macs_before"] / res.summary["macs_after"], "dense_test_top1": dense,
        "pruned_test_top1_before_retraining": one_shot["top1"], "retrained_test_top1": top1,
        "best_epoch": hist["best_epoch"], "best_val_top1": hist["best_val_top1"], "config": hist["config"]})
    assert hist["config"] == RETRAIN.to_dict()
    assert top1 >= dense - TOLERANCE, f"structured 2x MACs: {top1:.4f} vs dense {dense:.4f}"


def test_unstructured_90_percent_recovers_within_half_a_point_and_keeps_sparsity(setup, record_property):
    from onnxprune.sparsity.prune import prune_unstructured

    res = prune_unstructured(str(setup["dense_path"]), sparsity=0.9, scope="global", criterion="magnitude")
    pruned = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    one_shot = evaluate_onnx(res.model, setup["data"])
    model, hist = finetune(res.model, setup["data"], RETRAIN, teacher=str(setup["dense_path"]), progress=False)
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    masked = [k for k, v in pruned.items() if v.ndim > 1 and (v == 0).any()]
    zeros = sum(int((pruned[k] == 0).sum()) for k in masked)
    total = sum(pruned[k].size for k in masked)
    top1, dense = hist["test"]["top1"], setup["dense"]["top1"]
    _report(record_property, "unstructured", {
        "sparsity": zeros / total, "dense_test_top1": dense, "pruned_test_top1_before_retraining": one_shot["top1"],
        "retrained_test_top1": top1, "best_epoch": hist["best_epoch"], "best_val_top1": hist["best_val_top1"],
        "config": hist["config"]})
    assert zeros / total >= 0.9 - 1e-3
    for k in masked:  # sparsity preserved exactly: the very same zeros, no more, no fewer
        np.testing.assert_array_equal(after[k] == 0, pruned[k] == 0)
    assert hist["sparsity"]["preserved"] and hist["config"] == RETRAIN.to_dict()
    assert top1 >= dense - TOLERANCE, f"unstructured 90%: {top1:.4f} vs dense {dense:.4f}"
