"""Calibration on small *trained* models (trained here, seconds): a digits classifier CNN, a
dense-prediction net with two outputs (BatchNorm folded), a two-input model, and an MLP whose input
features span 400x in scale. At 2x fewer MACs the least-squares re-fit must cut the output error
against the dense model by a large factor and restore the classifier with no training."""
from __future__ import annotations

import numpy as np
import pytest

from calib_models import train_dense_prediction, train_digits_cnn, train_scaled_mlp, train_two_input
from onnxprune.calibration import StructuredCalibration
from onnxprune.calibration.collect import run
from onnxprune.calibration.weights import WeightCalibration
from onnxprune.sparsity.nm import satisfies_nm
from onnxprune.sparsity.prune import prune_nm, prune_unstructured
from onnxprune.structured.prune import prune_structured

pytestmark = pytest.mark.slow


def _rel(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _structured(model, inputs, method, **kw):
    return prune_structured(model, target_macs=0.5, calibration=StructuredCalibration(inputs, method=method), **kw)


@pytest.fixture(scope="module")
def digits_cnn():
    return train_digits_cnn()


def test_classifier_recovers_at_half_the_macs_without_training(digits_cnn):
    model, xtr, xte, yte = digits_cnn
    dense = run(model, {"x": xte})["y"]
    dense_acc = (dense.argmax(1) == yte).mean()
    assert dense_acc > 0.95
    res = {m: _structured(model, {"x": xtr[:256]}, m) for m in ("none", "bn", "refit")}
    assert res["refit"].summary["target"]["achieved"] <= 0.5
    out = {m: run(r.model, {"x": xte})["y"] for m, r in res.items()}
    err = {m: _rel(o, dense) for m, o in out.items()}
    acc = {m: (o.argmax(1) == yte).mean() for m, o in out.items()}
    assert err["refit"] < err["none"] / 4, err
    assert err["bn"] < err["none"], err
    assert acc["none"] < dense_acc - 0.3, acc  # pruning alone breaks it ...
    assert acc["refit"] >= dense_acc - 0.04, acc  # ... calibration restores it, no labels, no training
    cal = res["refit"].summary["calibration"]
    assert cal["layers"] and all(l["error_after"] < l["error_before"] / 2 for l in cal["layers"]), cal["layers"]
    assert cal["outputs"]["y"]["rel_l2_after"] < cal["outputs"]["y"]["rel_l2_before"] / 4


def test_activation_criterion_with_calibration(digits_cnn):
    model, xtr, xte, yte = digits_cnn
    r = prune_structured(model, target_macs=0.5, criterion="activation",
                         calibration=StructuredCalibration({"x": xtr[:256]}))
    assert r.summary["criterion"] == "activation" and r.summary["groups"]
    acc = (run(r.model, {"x": xte})["y"].argmax(1) == yte).mean()
    assert acc > 0.9


def test_dense_prediction_two_outputs_bn_folded():
    model, xc, xt, mask = train_dense_prediction()
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    dense = run(model, {"x": xt})
    res = {m: _structured(model, {"x": xc}, m) for m in ("none", "bn", "refit")}
    out = {m: run(r.model, {"x": xt}) for m, r in res.items()}
    for k in ("seg", "count"):
        err = {m: _rel(o[k], dense[k]) for m, o in out.items()}
        assert err["refit"] < err["none"] / 4, (k, err)
        assert err["bn"] < err["none"], (k, err)  # folded graph: the consumers' bias absorbs the shift
    assert all(l["method"] == "bias_shift" for l in res["bn"].summary["calibration"]["layers"])
    seg = {m: (o["seg"].argmax(1) == mask).mean() for m, o in out.items()}
    assert seg["refit"] > seg["none"] and seg["refit"] > 0.97, seg


def test_two_input_model():
    model, xc, xt = train_two_input()
    dense = run(model, xt)["y"]
    res = {m: _structured(model, xc, m) for m in ("none", "refit")}
    err = {m: _rel(run(r.model, xt)["y"], dense) for m, r in res.items()}
    assert err["refit"] < err["none"] / 3, err


def _zeros(model):
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) == 0 for t in model.graph.initializer if len(t.dims) >= 2}


def test_reconstruct_keeps_masks_and_cuts_error(digits_cnn):
    model, xtr, xte, _ = digits_cnn
    dense = run(model, {"x": xte})["y"]
    cal = WeightCalibration(model, {"x": xtr[:256]})
    for pruned in (prune_unstructured(model, sparsity=0.5, scope="layer").model, prune_nm(model, n=2, m=4).model):
        rec, summary = cal.reconstruct(pruned)
        zr, zp = _zeros(rec), _zeros(pruned)
        assert zr.keys() == zp.keys() and all(np.array_equal(zr[k], zp[k]) for k in zp)  # exactly the same zeros
        before, after = _rel(run(pruned, {"x": xte})["y"], dense), _rel(run(rec, {"x": xte})["y"], dense)
        assert after < before / 1.5, (before, after)
        assert summary["outputs"]["y"]["rel_l2_after"] < summary["outputs"]["y"]["rel_l2_before"]
    from onnx import numpy_helper

    for t in rec.graph.initializer:  # the last one is N:M
        if t.name in {p.input[1] for p in rec.graph.node if p.op_type == "Conv"} and t.dims[1] % 4 == 0:
            assert satisfies_nm(numpy_helper.to_array(t), 2, 4, 1)


def test_wanda_beats_magnitude_on_features_of_different_scales():
    model, xc, xt = train_scaled_mlp()
    dense = run(model, {"x": xt})["y"]
    cal = WeightCalibration(model, {"x": xc})
    norms = cal.norms()
    err = {}
    for crit in ("magnitude", "wanda"):
        r = prune_unstructured(model, sparsity=0.5, scope="layer", criterion=crit,
                               activations=norms if crit == "wanda" else None)
        err[crit] = _rel(run(r.model, {"x": xt})["y"], dense)
    assert err["wanda"] < err["magnitude"] * 0.9, err
