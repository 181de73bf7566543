"""A dense-prediction net (per-pixel class scores + a count head, trained here on generated blobs)
pruned structured with ``--calibrate``, then ``finetune --teacher DENSE`` label-free on a few hundred
unlabeled images, all through the CLI: the bridge check accepts the calibrated model, and held-out
mask IoU improves over calibration alone (issue 22, item 6)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from cli_util import run_cli

pytest.importorskip("torch")


def _iou(seg: np.ndarray, mask: np.ndarray) -> float:
    p, t = seg.argmax(1) == 1, mask == 1
    return float((p & t).sum() / max((p | t).sum(), 1))


@pytest.mark.slow
def test_calibrated_dense_predictor_is_finetuned_label_free(tmp_path, one_torch_thread):
    from calib_models import blobs, train_dense_prediction

    from onnxprune.datasets.fidelity import run_onnx

    dense, _, x_test, mask_test = train_dense_prediction()
    onnx.save(dense, tmp_path / "dense.onnx")
    x_unl, _, _ = blobs(320, seed=5, size=12)  # unlabeled: images only
    np.savez(tmp_path / "unl.npz", x=x_unl)
    code, out, err = run_cli("prune", tmp_path / "dense.onnx", "-o", tmp_path / "cal.onnx", "--structured",
                             "--target-macs", "0.15", "--calibrate", f"npz:{tmp_path / 'unl.npz'}?split=all", "--json")
    assert code == 0, err
    summary = json.loads(out)
    reduction = summary["macs_before"] / summary["macs_after"]
    assert reduction > 5 and summary["calibration"]
    code, out, err = run_cli("finetune", tmp_path / "cal.onnx", "-o", tmp_path / "ft.onnx", "--teacher",
                             tmp_path / "dense.onnx", "--data", f"npz:{tmp_path / 'unl.npz'}", "--steps", "600",
                             "--no-progress", "--json")
    assert code == 0, err
    h = json.loads(out)
    assert h["objective"] == "distill" and h["function_matching"]
    assert h["bridge_check"]["status"] in ("ok", "borderline")  # the calibrated model is not refused
    np.savez(tmp_path / "test.npz", x=x_test)
    rel = {}
    for name in ("cal", "ft"):
        code, out, err = run_cli("eval", tmp_path / f"{name}.onnx", "--data", f"npz:{tmp_path / 'test.npz'}",
                                 "--split", "test", "--reference", tmp_path / "dense.onnx", "--json")
        assert code == 0, err
        rel[name] = json.loads(out)["mean_rel_l2"]
    iou = {n: _iou(run_onnx(str(tmp_path / f"{n}.onnx"), {"x": x_test})["seg"], mask_test)
           for n in ("dense", "cal", "ft")}
    print(f"\nblobs segmenter at {reduction:.2f}x fewer MACs: held-out IoU {iou}; mean rel_l2 to dense {rel}; bridge check "
          f"{h['bridge_check']['status']}; selected step {h['best_step']} of {h['steps']}")
    assert iou["dense"] > 0.8
    assert iou["ft"] > iou["cal"] and rel["ft"] < rel["cal"], (iou, rel)
