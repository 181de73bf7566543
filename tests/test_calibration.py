"""Calibration (onnxprune.calibration): fast checks on small random graphs — the im2col rows match
ONNX Runtime, the fits are the least-squares optimum, ratio 0 changes nothing, zeros stay zero —
and the ``prune --calibrate`` CLI. Trained-model recovery is in test_calibration_models.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from onnxprune.calibration import StructuredCalibration, calibration_inputs
from onnxprune.calibration.collect import collect_stats, run
from onnxprune.calibration.fit import as_affine, rel_error, ridge_fit, ridge_refit
from onnxprune.calibration.layers import dense_affine, layer_of
from onnxprune.calibration.weights import obs_update, refit_rows
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.graph import build_view
from onnxprune.structured.prune import prune_structured


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _graph_model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _layers_model():
    """conv (stride 2, asymmetric pads, dilation 2) -> relu -> conv 1x3 without bias -> MatMul on the last
    axis (rows are positions) -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 11, 9])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_s2", strides=[2, 1], pads=[2, 1, 1, 2],
                         dilations=[2, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_nobias", kernel_shape=[1, 3]),
        helper.make_node("MatMul", ["c2", "w3"], ["m3"], name="matmul"),  # [N, 5, 5, 8] @ [8, 4]
        helper.make_node("Flatten", ["m3"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="gemm", transB=1),
    ]
    inits = [_init("w1", rng.normal(size=(4, 3, 3, 3))), _init("b1", rng.normal(size=4)),
             _init("w2", rng.normal(size=(5, 4, 1, 3))), _init("w3", rng.normal(size=(8, 4))),
             _init("w4", rng.normal(size=(2, 5 * 5 * 4))), _init("b4", rng.normal(size=2))]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    return _graph_model(nodes, [x], [y], inits)


def test_sampled_rows_reproduce_onnxruntime_outputs():
    """Each layer's rows (im2col at sampled positions) times its weights give exactly its ORT output."""
    m = _layers_model()
    view = build_view(m)
    layers = [layer_of(n, view)[0] for n in view.nodes if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert all(layers)
    x = np.random.default_rng(1).normal(size=(7, 3, 11, 9)).astype(np.float32)
    shapes = {l.weight: tuple(view.initializers[l.weight].dims) for l in layers}
    stats, ref = collect_stats(m, {"x": x}, layers, shapes, rows=20, keep_outputs=3)
    assert ref["y"].shape == (3, 2)
    for l in layers:
        st = stats[l.node]
        b = np.zeros(st.out) if l.bias is None else view.const(l.bias)
        a = as_affine(l.matrix(view.const(l.weight)), b, np.arange(st.d), np.arange(st.out))
        assert st.n > 0
        assert rel_error(st, np.arange(st.d), np.arange(st.out), a) < 2e-3, l.node  # float32 products: ~1e-4
    # output rows computed from the input rows and the weights (what calibration uses): the same statistics
    fast, _ = collect_stats(m, {"x": x}, layers, shapes, rows=20, affine=dense_affine(layers, view))
    for l in layers:
        assert fast[l.node].n == stats[l.node].n
        scale = np.abs(stats[l.node].p).max()  # float32 rounding, relative to the largest entry
        assert np.allclose(fast[l.node].p, stats[l.node].p, rtol=0, atol=1e-5 * scale), l.node
        assert np.allclose(fast[l.node].yy, stats[l.node].yy, rtol=1e-4), l.node


def test_ridge_fit_finds_the_least_squares_map():
    from onnxprune.calibration.stats import RowStats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    st = RowStats(d=6, out=3)
    st.add(x, x @ w.T + b)
    cols, outs = np.arange(6), np.arange(3)
    a = ridge_fit(st, cols, outs, ridge=1e-9)
    assert np.allclose(a[:-1].T, w, atol=1e-3) and np.allclose(a[-1], b, atol=1e-3)
    # dropping a column: the fit is the least-squares optimum on the others, intercept included
    kept = np.array([0, 1, 2, 4, 5])
    a = ridge_fit(st, kept, outs, ridge=1e-9)
    z = np.c_[x[:, kept], np.ones(len(x))]
    best = np.linalg.lstsq(z, x @ w.T + b, rcond=None)[0]
    assert np.allclose(a, best, atol=1e-3)


def test_ridge_refit_error_from_the_normal_equations_is_the_direct_error():
    """The error ridge_refit derives from the solve equals rel_error's direct ``a'Sa - 2a'P + yy``,
    with a strong ridge (so the shrinkage term matters), with and without a prior."""
    from onnxprune.calibration.stats import RowStats

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    st = RowStats(d=8, out=4)
    st.add(x, np.tanh(x @ rng.normal(size=(8, 4))))
    cols, outs = np.array([0, 2, 3, 5, 7]), np.array([0, 1, 3])
    for prior in (None, rng.normal(size=(5, 3))):
        a, err = ridge_refit(st, cols, outs, ridge=0.3, prior=prior)
        assert err == pytest.approx(rel_error(st, cols, outs, a), rel=1e-6)
        assert np.array_equal(a, ridge_fit(st, cols, outs, ridge=0.3, prior=prior))


def test_reconstruction_keeps_zeros_and_is_the_per_row_optimum():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 12)) + 0.1 * rng.normal(size=(500, 12))
    z = np.c_[z, np.ones(500)]
    w = rng.normal(size=(5, 13))
    keep = rng.random(w.shape) > 0.5
    keep[:, -1] = True
    h = z.T @ z
    for fn in (refit_rows, obs_update):
        new = fn(w, keep, h, damp=1e-9)
        assert (new[~keep] == 0).all()
        err = np.linalg.norm(z @ (new - w).T) / np.linalg.norm(z @ w.T)
        assert err < np.linalg.norm(z @ (w * keep - w).T) / np.linalg.norm(z @ w.T)
    new = refit_rows(w, keep, h, damp=1e-9)
    for r in range(len(w)):
        k = keep[r]
        assert np.allclose(new[r, k], np.linalg.lstsq(z[:, k], z @ w[r], rcond=None)[0], atol=1e-4)


def _cnn(path=None, bn=True, seed=0):
    """An untrained conv net with BatchNorm (graph built here): x [N,3,8,8] -> y [N,5]."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, c = [], [], "x", 3
    for i, co in enumerate((8, 12)):
        inits += [_init(f"w{i}", rng.normal(size=(co, c, 3, 3)) / np.sqrt(9 * c)), _init(f"b{i}", rng.normal(size=co) * 0.1)]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        out = f"c{i}"
        if bn:
            inits += [_init(f"g{i}", 1 + 0.2 * rng.normal(size=co)), _init(f"be{i}", 0.1 * rng.normal(size=co)),
                      _init(f"m{i}", 0.1 * rng.normal(size=co)), _init(f"v{i}", 1 + rng.random(co))]
            nodes.append(helper.make_node("BatchNormalization", [out, f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"))
            out = f"n{i}"
        nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
        prev, c = f"r{i}", co
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits += [_init("wf", rng.normal(size=(5, c))), _init("bf", rng.normal(size=5))]
    m = _graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    if path is not None:
        onnx.save(m, str(path))
    return m


@pytest.mark.parametrize("method", ["refit", "bn", "none"])
def test_ratio_zero_leaves_outputs_unchanged_whatever_the_data(method):
    m = _cnn()
    x = (np.random.default_rng(3).normal(size=(40, 3, 8, 8)) * 7 + 5).astype(np.float32)  # far off any training data
    r = prune_structured(m, ratio=0.0, calibration=StructuredCalibration({"x": x}, method=method))
    probe = np.random.default_rng(4).normal(size=(6, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(run(r.model, {"x": probe})["y"], run(m, {"x": probe})["y"])
    assert r.summary["calibration"]["layers"] == []


def test_calibration_cuts_error_on_a_random_net():
    """Even untrained, the re-fit makes the pruned net's output closer to the dense one."""
    m = _cnn()
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    errs = {}
    for method in ("none", "bn", "refit"):
        r = prune_structured(m, ratio=0.5, calibration=StructuredCalibration({"x": x}, method=method))
        cal = r.summary["calibration"]
        errs[method] = cal["outputs"]["y"]["rel_l2_after"]
        for layer in cal["layers"]:
            assert layer["error_after"] <= layer["error_before"] + 1e-9
    assert errs["refit"] < errs["none"] / 3 and errs["bn"] < errs["none"], errs


def _refit_only(edited):
    """``_edited`` whose shift and no-change candidates are the refit's (so the refit's entries are kept)."""
    def only(self, pruned, touched, view, cuts, method):
        return edited(self, pruned, touched, view, cuts, "refit")
    return only


def test_a_fit_that_moves_the_outputs_away_from_dense_is_not_used(monkeypatch):
    """Each layer's fit is checked on the whole model: a re-fit that makes the outputs worse (collinear
    inputs amplified layer after layer, here forced) falls back to the shift, then to no change. The
    sequential re-fit also checks each layer on its held-out rows: a wild fit is not written at all."""
    import onnxprune.calibration.sequential as sequential
    import onnxprune.calibration.structured as structured

    m = _cnn()
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    honest = structured.ridge_refit

    def wild(*args, **kwargs):
        a, err = honest(*args, **kwargs)
        return a * 50.0, err

    monkeypatch.setattr(structured, "ridge_refit", wild)
    monkeypatch.setattr(sequential, "ridge_refit", wild)
    cal = prune_structured(m, ratio=0.5, calibration=StructuredCalibration({"x": x})).summary["calibration"]
    assert "rejected" not in cal and cal["method"] == "bn", cal  # the shift does better than no re-fit
    before = cal["outputs"]["y"]["rel_l2_before"]
    assert cal["candidates"]["refit"] == pytest.approx(before) and cal["candidates"]["bn"] < before
    monkeypatch.setattr(StructuredCalibration, "_edited", _refit_only(StructuredCalibration._edited))
    cal = prune_structured(m, ratio=0.5, calibration=StructuredCalibration({"x": x})).summary["calibration"]
    assert {layer["method"] for layer in cal["layers"]} == {"none"}, cal  # no wild layer written
    assert all(layer["check_error_after"] == layer["check_error_before"] for layer in cal["layers"])
    monkeypatch.undo()
    monkeypatch.setattr(structured, "ridge_refit", wild)
    one_pass = StructuredCalibration({"x": x}, sequential=False)
    cal = prune_structured(m, ratio=0.5, calibration=one_pass).summary["calibration"]
    assert [r["method"] for r in cal["rejected"]] == ["refit"] and cal["method"] == "bn", cal
    assert "held-out check samples" in cal["rejected"][0]["reason"]
    out = cal["outputs"]["y"]
    assert out["rel_l2_after"] < out["rel_l2_before"]
    monkeypatch.setattr(structured, "shift_fit", lambda st, cols, outs, a0, scale: (a0 * 50.0, 50.0, 0.0))
    cal = prune_structured(m, ratio=0.5, calibration=StructuredCalibration({"x": x}, sequential=False)).summary["calibration"]
    assert [r["method"] for r in cal["rejected"]] == ["refit", "bn"] and cal["method"] == "none", cal
    assert cal["outputs"]["y"]["rel_l2_after"] == cal["outputs"]["y"]["rel_l2_before"]


def test_calibration_inputs_checks_shapes():
    m = _cnn()
    with pytest.raises(OnnxPruneError, match=r"shape \[3, 9, 9\].*expects \[3, 8, 8\]"):
        calibration_inputs(np.zeros((4, 3, 9, 9), np.float32), m, 2)
    got = calibration_inputs(np.zeros((10, 3, 8, 8), np.float64), m, 4)
    assert got["x"].shape == (4, 3, 8, 8) and got["x"].dtype == np.float32


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    _cnn(d / "m.onnx")
    x = np.random.default_rng(0).random((48, 3, 8, 8)).astype(np.float32)
    np.savez(d / "cal.npz", x=x, y=np.zeros(len(x), np.int64))
    np.savez(d / "bad.npz", x=x[:, :, :7], y=np.zeros(len(x), np.int64))
    return d


def test_cli_structured_calibrate_json(cnn_files):
    d = cnn_files
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "o.onnx", "--structured", "--ratio", "0.5",
                             "--criterion", "activation", "--calibrate", f"npz:{d / 'cal.npz'}",
                             "--calibration-samples", "32", "--json")
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    assert cal["method"] == "refit" and cal["samples"] <= 32
    assert {layer["node"] for layer in cal["layers"]} == {"conv1", "fc"}
    for layer in cal["layers"]:
        assert layer["error_after"] < layer["error_before"]
    assert cal["outputs"]["y"]["rel_l2_after"] < cal["outputs"]["y"]["rel_l2_before"]
    assert "calibration: collecting" not in err  # no progress bar under --json
    onnx.checker.check_model(onnx.load(str(d / "o.onnx")))


def test_a_reconstruction_that_moves_the_outputs_away_from_dense_is_not_used(cnn_files, monkeypatch):
    import onnxprune.calibration.weights as weights

    honest = weights.refit_rows
    monkeypatch.setattr(weights, "refit_rows", lambda *a, **k: honest(*a, **k) * 50.0)
    d = cnn_files
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "r.onnx", "--unstructured", "--sparsity", "0.5",
                             "--reconstruct", "--calibrate", f"npz:{d / 'cal.npz'}", "--json")
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    assert cal["method"] == "none" and [r["method"] for r in cal["rejected"]] == ["reconstruct"], cal
    assert cal["outputs"]["y"]["rel_l2_after"] == cal["outputs"]["y"]["rel_l2_before"]


def test_cli_unstructured_wanda_reconstruct_keeps_zeros(cnn_files):
    d = cnn_files
    args = ("--calibrate", f"npz:{d / 'cal.npz'}", "--json")
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "u0.onnx", "--unstructured", "--sparsity", "0.5",
                             "--criterion", "wanda", *args[:2], "--reconstruct", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["criterion"] == "wanda" and s["calibration"]["method"] == "reconstruct"
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "u1.onnx", "--unstructured", "--sparsity", "0.5",
                             "--criterion", "wanda", *args)
    assert code == 0, err
    rec = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(d / "u0.onnx")).graph.initializer}
    plain = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(d / "u1.onnx")).graph.initializer}
    for name in ("w0", "w1", "wf"):
        assert np.array_equal(rec[name] == 0, plain[name] == 0), name
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "n.onnx", "--nm", "2:4", "--reconstruct", *args)
    assert code == 0, err
    from onnxprune.sparsity.nm import satisfies_nm

    w1 = numpy_helper.to_array(next(t for t in onnx.load(str(d / "n.onnx")).graph.initializer if t.name == "w1"))
    assert satisfies_nm(w1, 2, 4, 1)


@pytest.mark.parametrize("args, message", [
    (("--structured", "--ratio", "0.5", "--criterion", "activation"), "criterion activation needs calibration data"),
    (("--unstructured", "--sparsity", "0.5", "--reconstruct"), "--reconstruct needs calibration data"),
    (("--structured", "--ratio", "0.5", "--calibration-samples", "8"), "--calibration-samples needs --calibrate"),
    (("--unstructured", "--sparsity", "0.5", "--calibrate", "CAL"), "pass one of them"),
    (("--structured", "--ratio", "0.5", "--reconstruct"), "--reconstruct does not apply to --structured"),
    (("--structured", "--ratio", "0.5", "--calibrate", "BAD"), "expects [N, 3, 8, 8]"),
    (("--nm", "2:4", "--criterion", "lamp"), "choose one of magnitude, wanda"),
])
def test_cli_calibration_errors(cnn_files, args, message):
    d = cnn_files
    args = tuple(a.replace("CAL", f"npz:{d / 'cal.npz'}").replace("BAD", f"npz:{d / 'bad.npz'}") for a in args)
    code, out, err = run_cli("prune", d / "m.onnx", "-o", d / "e.onnx", *args)
    assert code != 0 and code != 70
    assert err.startswith("error:") and message in err, err
    assert not (d / "e.onnx").exists()


@pytest.mark.parametrize("method", ["refit", "bn"])
def test_constant_of_a_removed_channel_moves_into_the_consumer_bias(method):
    """A channel that is constant after its activation (zero filter, bias 2 -> ReLU gives 2) carries no
    information but still adds ``2 * w`` to the next layer: removing it must leave the outputs exact."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w0[3] = 0
    b0 = np.array([0.1, -0.2, 0.3, 2.0], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["y"], name="conv1")]  # no bias: one is added
    m = _graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])],
                     [_init("w0", w0), _init("b0", b0), _init("w1", rng.normal(size=(5, 4, 1, 1)))])
    x = rng.normal(size=(32, 3, 6, 6)).astype(np.float32)
    plain = prune_structured(m, ratio=0.25)
    r = prune_structured(m, ratio=0.25, calibration=StructuredCalibration({"x": x}, method=method))
    assert [g["kept"] for g in r.summary["groups"]] == [3]
    assert "w0" in {t.name for t in r.model.graph.initializer}
    probe = rng.normal(size=(8, 3, 6, 6)).astype(np.float32)
    dense = run(m, {"x": probe})["y"]
    def rel(model):
        return np.linalg.norm(run(model, {"x": probe})["y"] - dense) / np.linalg.norm(dense)

    assert rel(plain.model) > 0.05
    assert rel(r.model) < (1e-5 if method == "bn" else 3e-3)  # refit: only the ridge's slight shrinkage


def test_refit_keeps_the_original_weights_of_a_channel_dead_on_the_data():
    """The ridge shrinks toward the layer's original weights, not zero: a channel that is zero on the
    calibration data (ReLU of a very negative bias) keeps its consumer weights exactly, so the
    calibrated model still uses it where it fires (and finetune does not take those weights for a
    pruning mask)."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w0[3] = 0  # constant channel (ReLU(2)): the one magnitude pruning removes
    b0 = np.array([0.1, -0.2, -100.0, 2.0], np.float32)  # channel 2: dead on N(0, 1) inputs
    w1 = rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1"], ["y"], name="conv1")]
    m = _graph_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])],
                     [_init("w0", w0), _init("b0", b0), _init("w1", w1)])
    x = rng.normal(size=(32, 3, 6, 6)).astype(np.float32)
    r = prune_structured(m, ratio=0.25, calibration=StructuredCalibration({"x": x}, method="refit"))
    assert [g["kept"] for g in r.summary["groups"]] == [3]
    new = numpy_helper.to_array(next(t for t in r.model.graph.initializer if t.name == "w1"))
    assert new.shape == (5, 3, 1, 1)
    np.testing.assert_allclose(new[:, 2], w1[:, 2], rtol=1e-6)  # the dead channel: as it was
    fires = (30 * rng.normal(size=(8, 3, 6, 6))).astype(np.float32)  # inputs where channel 2 is alive
    dense = run(m, {"x": fires})["y"]
    got = run(r.model, {"x": fires})["y"]
    assert np.linalg.norm(got - dense) / np.linalg.norm(dense) < 3e-3


def test_recipe_recover_stage_calibrates_structured_points(tmp_path):
    """``recover: {calibrate: true}`` in a recipe: the structured point is calibrated on the data's inputs
    (labels unused) and its report entry carries the before/after output error."""
    import torch

    from onnxprune.commands.demo_model import build_digits_cnn
    from onnxprune.pipeline.run import run_recipe
    from onnxprune.recipes import load_recipe
    from onnxprune.bridge.torch_export import export_torch

    torch.manual_seed(0)
    model = tmp_path / "m.onnx"
    export_torch(build_digits_cnn(width=4), [torch.zeros(1, 1, 8, 8)], model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: rec\ndata: digits\nrecover: {calibrate: true, samples: 64}\n"
                      "sweep: {methods: [{name: l1, kind: structured, points: [{ratio: 0.5}]}]}\n")
    assert load_recipe(recipe).recover.samples == 64
    rep = run_recipe(recipe, model, tmp_path / "out")
    (point,) = rep["points"]
    found = []

    def walk(o):
        if isinstance(o, dict):
            if "calibration" in o and isinstance(o["calibration"], dict) and "outputs" in o["calibration"]:
                found.append(o["calibration"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(point)
    assert found and found[0]["samples"] == 64
    for out in found[0]["outputs"].values():
        assert out["rel_l2_after"] < out["rel_l2_before"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nrecover: {calibrate: true, samplez: 3}\nstages: [{kind: structured, target: {ratio: 0.5}}]\n")
    with pytest.raises(OnnxPruneError, match="samplez"):
        load_recipe(bad)
