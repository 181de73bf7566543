"""The sequential re-fit (each layer fitted on the calibrated pruned model's own activations), its
held-out check, padding rows left out under an attention mask, fixed-batch models, centred
statistics and the jittered Cholesky solve, and ``prune --calibrate``'s split."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib_models import train_deep_resnet, train_masked_encoder
from cli_util import run_cli
from onnxprune.calibration import StructuredCalibration, calibration_split
from onnxprune.calibration.collect import run
from onnxprune.calibration.fit import cholesky_solve, ridge_fit
from onnxprune.calibration.layers import layer_of
from onnxprune.calibration.sequential import depths, stages
from onnxprune.calibration.stats import RowStats
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.graph import build_view
from onnxprune.structured.prune import prune_structured


def _rel(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.slow
def test_sequential_refit_recovers_a_deep_net_where_the_one_pass_fit_does_not():
    """A 31-conv ResNet trained on digits, pruned to half its MACs: the one-pass fit (on the dense
    model's activations) barely moves the output error (1.09 -> 0.81 on test samples); the sequential
    fit cuts it to 0.49. Measured on held-out test samples, not the calibration ones."""
    model, xtr, xte = train_deep_resnet()
    assert sum(n.op_type == "Conv" for n in model.graph.node) >= 30
    dense = run(model, {"x": xte})["y"]
    err, cal = {}, {}
    for name, seq in (("one_pass", False), ("sequential", True)):
        r = prune_structured(model, target_macs=0.5, calibration=StructuredCalibration({"x": xtr[:256]}, sequential=seq))
        err[name], cal[name] = _rel(run(r.model, {"x": xte})["y"], dense), r.summary["calibration"]
    err["none"] = _rel(run(prune_structured(model, target_macs=0.5).model, {"x": xte})["y"], dense)
    assert err["one_pass"] > 0.6 * err["none"], err  # fitted on dense inputs: upstream errors compound
    assert err["sequential"] < 0.7 * err["one_pass"], err  # (0.49 vs 0.81 vs 1.09 when written)
    seq = cal["sequential"]
    assert seq["method"] == "refit" and seq["fit_on"].startswith("the pruned model's activations")
    assert seq["stages"] >= 15 and seq["check"] == "held_out"
    assert seq["fit_samples"] + seq["check_samples"] == seq["samples"] == 256
    assert all(np.isfinite(l["condition"]) for l in seq["layers"])
    out = seq["outputs"]["y"]
    assert out["rel_l2_after"] < 0.6 * out["rel_l2_before"]
    assert cal["one_pass"]["fit_on"].startswith("the dense model's")


def _chain(n_convs=4, width=6):
    """conv chain with a side branch: x -> c0 -> relu -> c1 -> relu -> ... and c1' reading r0 too."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n_convs):
        inits.append(numpy_helper.from_array(rng.normal(size=(width, width, 1, 1)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(rng.normal(size=(width, width, 1, 1)).astype(np.float32), "wb"))
    nodes += [helper.make_node("Conv", ["r0", "wb"], ["cb"], name="branch"),
              helper.make_node("Add", [prev, "cb"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width, 4, 4])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_stages_group_layers_by_depth():
    view = build_view(_chain())
    layers = [layer_of(n, view)[0] for n in view.nodes if n.op_type == "Conv"]
    dep = depths(view, layers)
    assert dep == {"conv0": 0, "conv1": 1, "branch": 1, "conv2": 2, "conv3": 3}
    assert [[l.node for l in g] for g in stages(view, layers, None)] == [["conv0"], ["conv1", "branch"], ["conv2"], ["conv3"]]
    assert [[l.node for l in g] for g in stages(view, layers, 2)] == [["conv0", "conv1", "branch"], ["conv2", "conv3"]]


@pytest.fixture(scope="module")
def encoder():
    return train_masked_encoder()


@pytest.mark.slow
def test_padding_rows_never_count(encoder):
    """A token model (embedding + position, per-token FFN, masked mean pooling) whose sequences are
    mostly padding: with the attention mask found by name, the FFN's re-fit ignores padded rows and
    the pooled output is closer to dense than when they count."""
    model, cal_in, test_in = encoder
    dense = run(model, test_in)["y"]
    res = {}
    for name, mask in (("unmasked", False), ("masked", None)):
        r = prune_structured(model, ratio=0.75, calibration=StructuredCalibration(cal_in, mask=mask))
        res[name] = (_rel(run(r.model, test_in)["y"], dense), r.summary["calibration"])
    (e_un, c_un), (e_m, c_m) = res["unmasked"], res["masked"]
    assert c_m["mask"] == "attention_mask" and "mask" not in c_un
    real = int(cal_in["attention_mask"][: c_m["fit_samples"]].sum())
    assert c_m["layers"][0]["rows"] <= real < c_un["layers"][0]["rows"]  # only real tokens were sampled
    assert e_m < 0.8 * e_un, (e_m, e_un)  # (0.041 vs 0.059 when written)
    with pytest.raises(OnnxPruneError, match="no input 'nope'"):
        prune_structured(model, ratio=0.75, calibration=StructuredCalibration(cal_in, mask="nope"))


@pytest.mark.slow
def test_cli_calibration_mask(encoder, tmp_path):
    model, cal_in, _ = encoder
    ids, mask = cal_in["input_ids"], cal_in["attention_mask"]
    onnx.save(model, str(tmp_path / "enc.onnx"))
    np.savez(tmp_path / "tok.npz", input_ids=ids, attention_mask=mask)
    code, out, err = run_cli("prune", tmp_path / "enc.onnx", "-o", tmp_path / "o.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", f"npz:{tmp_path / 'tok.npz'}?split=all", "--calibration-mask", "attention_mask",
                             "--json")
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    assert cal["mask"] == "attention_mask" and cal["split"] == "all" and cal["samples"] == len(ids)
    code, out, err = run_cli("prune", tmp_path / "enc.onnx", "-o", tmp_path / "p.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", f"npz:{tmp_path / 'tok.npz'}", "--calibration-mask", "input_ids")
    assert code == 1 and "must be a [batch, seq] array of 0/1" in err and "Traceback" not in err
    code, out, err = run_cli("prune", tmp_path / "enc.onnx", "-o", tmp_path / "q.onnx", "--structured", "--ratio", "0.5",
                             "--calibration-mask", "attention_mask")
    assert code == 1 and "--calibration-mask needs --calibrate SPEC" in err
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "q.onnx").exists()


def test_fixed_batch_models_are_padded():
    """A model whose batch dimension is fixed at 8 runs on 13 samples (the last batch padded, the
    padded rows dropped) and calibrates."""
    m = _chain()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 8
    x = np.random.default_rng(1).normal(size=(13, 6, 4, 4)).astype(np.float32)
    free = _chain()
    assert np.allclose(run(m, {"x": x})["y"], run(free, {"x": x})["y"], atol=1e-5)
    r = prune_structured(m, ratio=0.5, calibration=StructuredCalibration({"x": np.concatenate([x, x, x])}))
    assert r.summary["calibration"]["layers"]


def test_centred_statistics_fit_data_with_a_large_offset():
    """Inputs offset by 1e4 with unit spread: uncentred float32 sums lose the spread; the centred
    float64 statistics give the exact map, merged over many blocks."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 5)) + 1e4
    w, b = rng.normal(size=(2, 5)), rng.normal(size=2)
    st = RowStats(d=5, out=2)
    for i in range(0, len(x), 128):
        st.add(x[i:i + 128], x[i:i + 128] @ w.T + b)
    assert np.allclose(st.mx, x.mean(0)) and np.allclose(st.covariance(np.arange(5)), np.cov(x.T, bias=True), rtol=1e-6)
    a = ridge_fit(st, np.arange(5), np.arange(2), ridge=1e-12)
    assert np.allclose(a[:-1].T, w, atol=1e-4)


def test_cholesky_solve_adds_jitter_to_a_singular_matrix():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3))
    s = np.c_[z, z[:, :1]].T @ np.c_[z, z[:, :1]]  # a repeated column: singular
    x, info = cholesky_solve(s, np.ones((4, 1)))
    assert np.isfinite(x).all() and info["jitter"] > 0 and info["condition"] > 1e3
    x, info = cholesky_solve(np.eye(3) * 2, np.ones((3, 1)))
    assert info["jitter"] == 0 and info["condition"] == pytest.approx(1.0) and np.allclose(x, 0.5)


# ------------------------------------------------------------------------------ the calibration split

def test_non_finite_calibration_data_is_refused():
    from test_calibration import _cnn

    from onnxprune.calibration import calibration_inputs

    x = np.zeros((4, 3, 8, 8), np.float32)
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(OnnxPruneError, match="'x': 1 values are NaN or infinite"):
        calibration_inputs(x, _cnn(), None)


def test_calibration_split_from_the_spec():
    assert calibration_split("digits") == "train"
    assert calibration_split("digits?split=val") == "val"
    assert calibration_split({"spec": "digits", "split": "all"}) == "all"
    assert calibration_split(np.zeros((2, 3))) is None
    with pytest.raises(OnnxPruneError, match="split='dev' must be one of"):
        calibration_split("digits?split=dev")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    from calib_models import train_digits_cnn

    d = tmp_path_factory.mktemp("split")
    onnx.save(train_digits_cnn(epochs=1)[0], str(d / "m.onnx"))
    return d


def test_cli_calibrate_digits_reads_only_the_train_split(digits_model, monkeypatch):
    """``--calibrate digits`` names the split it used and never reads the test split (the dataset's
    test samples are poisoned here: reading them would fail the run)."""
    import onnxprune.datasets.core as core

    honest = core.load_dataset

    def poisoned(*a, **k):
        ds = honest(*a, **k)
        ds.test.x = np.full_like(ds.test.x, np.nan)
        ds.val.x = np.full_like(ds.val.x, np.nan)
        return ds

    monkeypatch.setattr(core, "load_dataset", poisoned)
    import onnxprune.datasets.inputs as inputs

    monkeypatch.setattr(inputs, "load_dataset", poisoned)
    d = digits_model
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "o.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", "digits", "--calibration-samples", "64", "--json")
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    assert np.isfinite(cal["outputs"]["y"]["rel_l2_after"]) and np.isfinite(cal["layers"][0]["error_after"])
    assert cal["split"] == "train" and cal["check"] == "held_out"
    monkeypatch.undo()
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "v.onnx", "--structured", "--ratio", "0.5",
                             "--calibrate", "digits?split=val", "--calibration-samples", "64")
    assert code == 0, err
    flat = " ".join(out.split())  # (long lines wrap at the console width)
    assert "64 samples from the val split (48 fitted, 16 held out for the check)" in flat, out


def test_layers_too_wide_for_a_fit_get_the_shift(monkeypatch):
    """Layers wider than MAX_FIT_COLUMNS keep diagonal statistics only and get the shift correction
    (their moments from the diagonal), in the sequential mode too."""
    import onnxprune.calibration.structured as structured
    from test_calibration import _cnn

    monkeypatch.setattr(structured, "MAX_FIT_COLUMNS", 50)  # conv1 reads 8 x 9 = 72 columns
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    cal = prune_structured(_cnn(), ratio=0.5, calibration=StructuredCalibration({"x": x})).summary["calibration"]
    by = {l["node"]: l for l in cal["layers"]}
    assert by["conv1"]["method"] in ("bn_shift", "bias_shift") and "shift correction" in by["conv1"]["note"]
    assert by["fc"]["method"] == "refit"
    assert cal["outputs"]["y"]["rel_l2_after"] <= cal["outputs"]["y"]["rel_l2_before"]
