"""Recovering accuracy without labels: unlabeled data specs (npz x-only / per-input, images:DIR,
python:), data bound to model inputs (load_inputs, bad-data errors), fidelity (eval --reference,
--metric) and label-free distillation (finetune --teacher on unlabeled data) on three small models
trained here: a digits classifier, a two-output dense-prediction network on generated shapes, and a
two-input model."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from onnxprune.datasets import load_dataset, load_inputs
from onnxprune.datasets.fidelity import (compare_outputs, cosine, max_abs_diff, output_fidelity, rel_l2,
                                         top1_agreement)
from onnxprune.errors import OnnxPruneError


# --------------------------------------------------------------------------- tiny graphs (no torch)

def _two_input_linear(scale: float = 1.0, *, int_input: bool = False) -> onnx.ModelProto:
    """o = a @ W (+ b): inputs a [N, 4] and b [N, 3] (int64 when ``int_input``); outputs o2 = o + b, o."""
    w = numpy_helper.from_array((np.arange(12, dtype=np.float32).reshape(4, 3) / 10 * scale), "W")
    nodes = [helper.make_node("MatMul", ["a", "W"], ["o"])]
    if int_input:
        nodes.append(helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Add", ["o", "bf"], ["o2"]))
    else:
        nodes.append(helper.make_node("Add", ["o", "b"], ["o2"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                                       helper.make_tensor_value_info("b", TensorProto.INT64 if int_input else TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("o2", TensorProto.FLOAT, ["N", 3]),
                           helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 3])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _image_model(h: int | str = "H", w: int | str = "W", c: int = 3) -> onnx.ModelProto:
    """y = global-average-pool(x): input [N, c, h, w] (symbolic h, w by default)."""
    g = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 1, 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# --------------------------------------------------------------------------- fidelity math

def test_fidelity_measures_by_hand():
    ref = np.array([[3.0, 4.0], [0.0, 1.0]])
    out = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert rel_l2(ref, ref) == 0.0 and cosine(ref, ref) == pytest.approx(1.0)
    assert rel_l2(ref, out) == pytest.approx(np.sqrt(2) / np.sqrt(26))
    assert cosine(ref, out) == pytest.approx(25 / 26)
    assert max_abs_diff(ref, out) == 1.0
    assert top1_agreement(ref, out) == 0.5  # row 0 agrees (class 1), row 1 does not
    assert top1_agreement(np.zeros((4, 1, 8, 8)), np.zeros((4, 1, 8, 8))) is None  # a map, not class scores
    assert set(output_fidelity(ref, out)) == {"rel_l2", "cosine", "max_abs_diff", "top1_agreement"}
    assert "top1_agreement" not in output_fidelity(np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 4)))
    assert rel_l2(np.zeros(3), np.zeros(3)) == 0.0 and rel_l2(np.zeros(3), np.ones(3)) == float("inf")
    assert rel_l2(2 * ref, 2 * out) == pytest.approx(rel_l2(ref, out))  # scale-free
    res = compare_outputs({"a": ref, "b": ref[:, :1]}, {"a": out, "b": ref[:, :1]})
    assert res["b"]["rel_l2"] == 0.0 and "top1_agreement" not in res["b"]
    with pytest.raises(OnnxPruneError, match="shapes differ"):
        rel_l2(ref, out[:1])


# --------------------------------------------------------------------------- unlabeled specs

def test_npz_x_only_is_unlabeled_and_split(tmp_path):
    x = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    d = load_dataset(f"npz:{tmp_path / 'x.npz'}?resize=4x4")
    assert not d.labeled and d.num_classes == 0 and d.describe()["labeled"] is False
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 10)
    assert d.train.y is None and d.train.x.shape[1:] == (1, 4, 4)
    xb, yb = next(d.val.batches(4))
    assert xb.shape == (4, 1, 4, 4) and yb is None
    a = load_dataset(f"npz:{tmp_path / 'x.npz'}")
    np.testing.assert_array_equal(np.sort(np.concatenate([a.train.x, a.val.x, a.test.x]).ravel()), np.sort(x.ravel()))
    # uint8 pixels scale to [0, 1] by default, by scale= when given
    np.savez(tmp_path / "u.npz", x=np.full((10, 1, 2, 2), 255, np.uint8))
    assert load_dataset(f"npz:{tmp_path / 'u.npz'}").train.x.max() == pytest.approx(1.0)
    assert load_dataset(f"npz:{tmp_path / 'u.npz'}?scale=1").train.x.max() == pytest.approx(255.0)


def test_npz_per_input_arrays_bind_to_a_two_input_model(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 4)).astype(np.float32), rng.integers(0, 5, (20, 3)).astype(np.int32)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    m = _two_input_linear(int_input=True)
    arrays = load_inputs(f"npz:{tmp_path / 'two.npz'}", m)
    assert list(arrays) == ["a", "b"] and arrays["b"].dtype == np.int64 and arrays["a"].dtype == np.float32
    assert len(arrays["a"]) == 20  # every sample: train, val and test
    np.testing.assert_array_equal(np.sort(arrays["b"].ravel()), np.sort(b.ravel()))  # integers kept as stored
    sub = load_inputs(f"npz:{tmp_path / 'two.npz'}", m, n=7, seed=3)
    assert len(sub["a"]) == len(sub["b"]) == 7
    # rows stay paired across inputs
    pairs = {(r.tobytes()) for r in a}
    assert all(r.tobytes() in pairs for r in sub["a"])
    again = load_inputs(f"npz:{tmp_path / 'two.npz'}", m, n=7, seed=3)
    np.testing.assert_array_equal(again["a"], sub["a"])


def test_images_dir_recursive_with_preprocessing(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    pix = {}
    for i, sub in enumerate(["a", "a/deep", "b", "b", "a"]):
        arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        pix[f"{sub}/im{i}.png"] = arr
        Image.fromarray(arr).save(root / sub / f"im{i}.png")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(root / ".hidden" / "skip.png")
    (root / "notes.txt").write_text("not an image")
    d = load_dataset(f"images:{root}?val=0.2&test=0")
    assert not d.labeled and len(d.train) + len(d.val) == 5 and d.train.x.shape[1:] == (3, 6, 5)
    # all the files, in sorted path order, as NCHW in [0, 1]
    x = load_inputs(f"images:{root}", _image_model())["x"]
    want = np.stack([pix[k] for k in sorted(pix, key=lambda k: str(root / k))]).transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(np.sort(x.ravel()), np.sort(want.ravel().astype(np.float32)), atol=1e-6)
    # bgr, mean/std, scale, layout
    ordered = sorted(str(root / k) for k in pix)
    first = pix[next(k for k in pix if str(root / k) == ordered[0])]
    d2 = load_dataset(f"images:{root}?color=bgr&scale=1&mean=10&std=2&layout=nhwc&val=0&test=0")
    got = d2.train.x[0]
    np.testing.assert_allclose(got, (first[:, :, ::-1].astype(np.float32) - 10) / 2, atol=1e-5)
    # size= resizes; without it, a model with a fixed H x W decides the size
    assert load_dataset(f"images:{root}?size=4x4").train.x.shape[1:] == (3, 4, 4)
    assert load_inputs(f"images:{root}", _image_model(2, 3))["x"].shape == (5, 3, 2, 3)
    assert load_inputs(f"images:{root}", _image_model(2, 3), n=2)["x"].shape == (2, 3, 2, 3)
    grey = load_dataset(f"images:{root}?color=grey&val=0&test=0")
    assert grey.train.x.shape[1:] == (1, 6, 5)


def test_python_spec_returning_arrays(tmp_path, monkeypatch):
    (tmp_path / "udata.py").write_text(textwrap.dedent("""
        import numpy as np
        def one(n="10"):
            return np.random.default_rng(0).random((int(n), 4)).astype(np.float32)
        def per_input():
            r = np.random.default_rng(1)
            return {"a": r.random((10, 4)).astype(np.float32), "b": r.random((10, 3)).astype(np.float32)}
    """))
    monkeypatch.chdir(tmp_path)
    d = load_dataset("python:udata:one?n=20")
    assert not d.labeled and len(d.train) + len(d.val) + len(d.test) == 20
    arrays = load_inputs("python:udata:per_input", _two_input_linear())
    assert set(arrays) == {"a", "b"} and arrays["a"].shape == (10, 4)
    with pytest.raises(OnnxPruneError, match="one array for a model with 2 inputs"):
        load_inputs("python:udata:one", _two_input_linear())


# --------------------------------------------------------------------------- bad data

def test_bad_data_errors_name_the_file_and_the_expected_shape(tmp_path):
    from PIL import Image

    m = _two_input_linear()
    np.savez(tmp_path / "shape.npz", a=np.zeros((5, 5), np.float32), b=np.zeros((5, 3), np.float32))
    with pytest.raises(OnnxPruneError, match=r"shape\.npz.*input 'a' has shape \[N, 5\], the model expects \[N, 4\]"):
        load_inputs(f"npz:{tmp_path / 'shape.npz'}", m)
    np.savez(tmp_path / "missing.npz", a=np.zeros((5, 4), np.float32))
    with pytest.raises(OnnxPruneError, match=r"missing\.npz.*no array for model input\(s\) 'b'.*b \[N, 3\]"):
        load_inputs(f"npz:{tmp_path / 'missing.npz'}", m)
    np.savez(tmp_path / "dtype.npz", a=np.zeros((5, 4), np.float32), b=np.zeros((5, 3), np.float32))
    with pytest.raises(OnnxPruneError, match=r"dtype\.npz.*input 'b' is float32, the model expects int64 of shape \[N, 3\]"):
        load_inputs(f"npz:{tmp_path / 'dtype.npz'}", _two_input_linear(int_input=True))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32))
    with pytest.raises(OnnxPruneError, match=r"empty\.npz.*no samples"):
        load_dataset(f"npz:{tmp_path / 'empty.npz'}")
    (tmp_path / "none").mkdir()
    with pytest.raises(OnnxPruneError, match=r"none: no image files found"):
        load_dataset(f"images:{tmp_path / 'none'}")
    (tmp_path / "broken").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "broken" / "ok.png")
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(OnnxPruneError, match=r"bad\.png: cannot read image"):
        load_dataset(f"images:{tmp_path / 'broken'}")
    (tmp_path / "sizes").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "sizes" / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "sizes" / "b.png")
    with pytest.raises(OnnxPruneError, match=r"b\.png: image is 5x4 but a\.png is 4x4; add size=HxW"):
        load_dataset(f"images:{tmp_path / 'sizes'}")
    # images of the wrong size for a fixed-size model, through the CLI: one error line, exit 1
    onnx.save(_image_model(4, 4, c=1), str(tmp_path / "img.onnx"))
    code, out, err = run_cli("eval", tmp_path / "img.onnx", "--data", f"images:{tmp_path / 'sizes'}?size=3x3&color=grey",
                             "--reference", tmp_path / "img.onnx", "--split", "train")
    assert code == 1 and err.count("\n") == 1 and "the model expects [N, 1, 4, 4]" in err and "sizes" in err


# --------------------------------------------------------------------------- eval --reference / --metric

def test_eval_reference_and_metric_cli(tmp_path, monkeypatch):
    ref, mod = _two_input_linear(), _two_input_linear(scale=1.1)
    onnx.save(ref, str(tmp_path / "ref.onnx"))
    onnx.save(mod, str(tmp_path / "mod.onnx"))
    rng = np.random.default_rng(0)
    a, b = rng.random((40, 4)).astype(np.float32), rng.random((40, 3)).astype(np.float32)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    (tmp_path / "umetric.py").write_text(textwrap.dedent("""
        import numpy as np
        def score(outputs, labels):
            assert labels is None
            return {"mean_o": float(np.mean(outputs["o"])), "n": len(outputs["o2"])}
    """))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("eval", "mod.onnx", "--data", "npz:two.npz", "--reference", "ref.onnx",
                             "--metric", "python:umetric:score", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res["fidelity"]) == {"o2", "o"} and res["samples"] == 8 and res["split"] == "test"
    for f in res["fidelity"].values():
        assert {"rel_l2", "cosine", "max_abs_diff", "top1_agreement"} <= set(f)
    # o = a @ W scales exactly with W: rel_l2 is the 10% scale error, direction unchanged
    assert res["fidelity"]["o"]["rel_l2"] == pytest.approx(0.1, rel=1e-5)
    assert res["fidelity"]["o"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert 0 < res["fidelity"]["o2"]["rel_l2"] < 0.1
    # the user's metric saw the model's outputs on the same test split
    d = load_dataset("npz:two.npz")
    want = float(np.mean(d.test.x["a"] @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10 * 1.1)))
    assert res["metric"] == {"mean_o": pytest.approx(want, rel=1e-5), "n": 8.0}
    code, out, _ = run_cli("eval", "mod.onnx", "--data", "npz:two.npz", "--reference", "ref.onnx")
    assert code == 0 and "rel_l2" in out and "o2" in out
    # unlabeled without --reference/--metric, and a metric that returns garbage: one error line each
    code, _, err = run_cli("eval", "mod.onnx", "--data", "npz:two.npz")
    assert code == 1 and "no labels" in err and err.count("\n") == 1
    (tmp_path / "badmetric.py").write_text("def f(outputs, labels):\n    return 3\n")
    code, _, err = run_cli("eval", "mod.onnx", "--data", "npz:two.npz", "--metric", "python:badmetric:f")
    assert code == 1 and "dict of named numbers" in err


def test_eval_metric_gets_labels_on_labeled_data(tmp_path, monkeypatch):
    w = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "lin.onnx"))
    (tmp_path / "acc.py").write_text("import numpy as np\ndef acc(outputs, labels):\n"
                                     "    return {'acc': float((outputs['y'].argmax(1) == labels).mean())}\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("eval", "lin.onnx", "--metric", "python:acc:acc", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["metric"]["acc"] == pytest.approx(res["top1"])  # the user's accuracy is eval's top-1
