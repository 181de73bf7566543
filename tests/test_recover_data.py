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
from onnxprune.core.errors import OnnxPruneError


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
    for f in res["fidelity"].values():  # two 2-D outputs, no Softmax: values, not class scores
        assert set(f) == {"rel_l2", "cosine", "max_abs_diff"}
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
    from onnxprune import api

    assert api.evaluate("mod.onnx", "npz:two.npz", reference="ref.onnx")["fidelity"] == res["fidelity"]
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


# --------------------------------------------------------------------------- label-free distillation (trained models)

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _export(module, example, path, input_names, output_names, dynamic: dict | None = None):
    import warnings

    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, input_names=input_names,
                          output_names=output_names, do_constant_folding=False,
                          dynamic_axes=dynamic or {n: {0: "N"} for n in input_names + output_names})
    return path


def _fit(module, batches, loss_fn, epochs: int, lr: float = 3e-3, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(epochs):
        for b in batches():
            opt.zero_grad()
            loss = loss_fn(module, *b)
            loss.backward()
            opt.step()
    module.eval()
    return module


def _shapes(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated dense-prediction data: one bright rectangle per noisy image; returns images
    (N x 1 x S x S), the rectangle's mask and its box (cx, cy, w, h as fractions)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.15, (n, 1, size, size)).astype(np.float32)
    mask = np.zeros((n, 1, size, size), np.float32)
    box = np.zeros((n, 4), np.float32)
    for i in range(n):
        h, w = rng.integers(3, size // 2 + 1, 2)
        r, c = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        mask[i, 0, r:r + h, c:c + w] = 1.0
        box[i] = ((c + w / 2) / size, (r + h / 2) / size, w / size, h / size)
    return x + mask, mask, box


class _SegNet(nn.Module):
    """Two outputs: per-pixel mask logits (N x 1 x H x W) and a box (N x 4); any H, W."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.mask = nn.Conv2d(c, 1, 1)
        self.box = nn.Linear(c, 4)

    def forward(self, x):
        f = self.body(x)
        return self.mask(f), self.box(f.mean(dim=(2, 3)))


def _iou(mask_logits: np.ndarray, mask: np.ndarray) -> float:
    p, t = mask_logits > 0, mask > 0.5
    return float((p & t).sum() / max((p | t).sum(), 1))


@pytest.fixture(scope="module")
def seg_models(tmp_path_factory):
    """The trained dense model (symbolic N, H, W) and a copy pruned to half its channels."""
    from onnxprune import api

    torch.manual_seed(0)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    x, mask, box = _shapes(512, seed=0)
    xt, mt, bt = (torch.from_numpy(a) for a in (x, mask, box))

    def batches():
        for i in range(0, len(xt), 32):
            yield xt[i:i + 32], mt[i:i + 32], bt[i:i + 32]

    def loss(m, xb, mb, bb):
        ml, bo = m(xb)
        return nn.functional.binary_cross_entropy_with_logits(ml, mb) + 10 * nn.functional.mse_loss(bo, bb)

    net = _fit(_SegNet(), batches, loss, epochs=12)
    torch.set_num_threads(prev)
    d = tmp_path_factory.mktemp("seg")
    dense = _export(net, (torch.zeros(1, 1, 16, 16),), d / "dense.onnx", ["x"], ["mask", "box"],
                    {"x": {0: "N", 2: "H", 3: "W"}, "mask": {0: "N", 2: "H", 3: "W"}, "box": {0: "N"}})
    api.prune(dense, d / "pruned.onnx", method="structured", ratio=0.5, input_shapes={"x": (1, 1, 16, 16)})
    return dense, d / "pruned.onnx"


def _seg_scores(model_path, x, mask, box) -> tuple[float, float]:
    """The task metrics: mask IoU and mean absolute box error."""
    from onnxprune.datasets.fidelity import run_onnx

    out = run_onnx(str(model_path), {"x": x})
    return _iou(out["mask"], mask), float(np.abs(out["box"] - box).mean())


@pytest.mark.slow
def test_label_free_distillation_restores_a_two_output_dense_predictor(seg_models, tmp_path, one_thread):
    from onnxprune.datasets.fidelity import evaluate_fidelity, mean_rel_l2

    dense, pruned = seg_models
    x_unl, _, _ = _shapes(400, seed=1)  # unlabeled: images only
    np.savez(tmp_path / "unl.npz", x=x_unl)
    code, out, err = run_cli("finetune", pruned, "-o", tmp_path / "ft.onnx", "--teacher", dense,
                             "--data", f"npz:{tmp_path / 'unl.npz'}", "--epochs", "6", "--optimizer", "adamw",
                             "--lr", "0.003", "--batch-size", "32", "--no-progress", "--json",
                             "--history", tmp_path / "h.json")
    assert code == 0, err
    h = json.loads(out)
    assert h["objective"] == "distill" and h["selection"] == "val_fidelity" and h["test"] is None
    assert set(h["test_fidelity"]) == {"mask", "box"}
    assert h["best_val_rel_l2"] < h["initial_val_rel_l2"]
    # held-out generated images with their ground truth: fidelity and the task metrics both improve
    x, mask, box = _shapes(300, seed=2)
    before, _ = evaluate_fidelity(str(pruned), str(dense), {"x": x})
    after, _ = evaluate_fidelity(str(tmp_path / "ft.onnx"), str(dense), {"x": x})
    mb, ma = mean_rel_l2(before["outputs"]), mean_rel_l2(after["outputs"])
    assert ma < 0.6 * mb, (mb, ma)
    iou_dense, box_dense = _seg_scores(dense, x, mask, box)
    iou_before, box_before = _seg_scores(pruned, x, mask, box)
    iou_after, box_after = _seg_scores(tmp_path / "ft.onnx", x, mask, box)
    assert iou_dense > 0.8
    assert iou_after > iou_before and box_after < box_before, (iou_before, iou_after, box_before, box_after)
    # the written model is the pruned graph with new weights (names, structure, symbolic dims kept)
    a, b = onnx.load(str(pruned)), onnx.load(str(tmp_path / "ft.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [i.name for i in a.graph.initializer] == [i.name for i in b.graph.initializer]
    print(f"seg: mean rel_l2 {mb:.4f} -> {ma:.4f}; IoU dense {iou_dense:.3f}, pruned {iou_before:.3f} -> "
          f"{iou_after:.3f}; box L1 {box_before:.4f} -> {box_after:.4f} (dense {box_dense:.4f})")


class _DigitsCNN(nn.Module):
    def __init__(self, c1: int = 12, c2: int = 16):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU())
        self.h = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, 10))

    def forward(self, x):
        return self.h(self.f(x))


class _TwoInput(nn.Module):
    """An 8x8 image and a 3-vector in; class scores and a fused embedding out."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.a = nn.Linear(3, 8)
        self.emb = nn.Linear(c * 16 + 8, 16)
        self.cls = nn.Linear(16, 10)

    def forward(self, img, aux):
        e = torch.relu(self.emb(torch.cat([self.f(img), torch.relu(self.a(aux))], 1)))
        return self.cls(e), e


def _digits_arrays():
    d = load_dataset("digits")
    return d, np.concatenate([d.train.x, d.val.x]), d.test.x, d.test.y


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    """A digits classifier trained here (5 epochs), and a copy with half its channels removed."""
    from onnxprune import api

    d, x_tr, _, _ = _digits_arrays()
    y_tr = np.concatenate([d.train.y, d.val.y])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)

    def batches():
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            yield xt[perm[i:i + 64]], yt[perm[i:i + 64]]

    net = _fit(_DigitsCNN(), batches, lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb), epochs=5)
    torch.set_num_threads(prev)
    p = tmp_path_factory.mktemp("cls")
    dense = _export(net, (torch.zeros(1, 1, 8, 8),), p / "dense.onnx", ["x"], ["logits"])
    api.prune(dense, p / "pruned.onnx", method="structured", ratio=0.6)
    np.savez(p / "unl.npz", x=x_tr)  # the same images without their labels
    return dense, p / "pruned.onnx", p / "unl.npz"


@pytest.mark.slow
def test_label_free_distillation_restores_a_classifier(digits_models, tmp_path, one_thread):
    from onnxprune.datasets import evaluate_onnx

    dense, pruned, unl = digits_models
    code, out, err = run_cli("finetune", pruned, "-o", tmp_path / "ft.onnx", "--teacher", dense,
                             "--data", f"npz:{unl}", "--epochs", "4", "--lr", "0.05", "--no-progress", "--json")
    assert code == 0, err
    h = json.loads(out)
    assert h["objective"] == "distill" and h["selection"] == "val_fidelity"
    acc = {k: evaluate_onnx(str(p), "digits")["top1"] for k, p in
           (("dense", dense), ("pruned", pruned), ("ft", tmp_path / "ft.onnx"))}
    fid = {}
    for k, p in (("pruned", pruned), ("ft", tmp_path / "ft.onnx")):
        code, out, err = run_cli("eval", p, "--data", "digits", "--reference", dense, "--json")
        assert code == 0, err
        fid[k] = json.loads(out)
        assert fid[k]["top1"] == pytest.approx(acc[k])  # labeled data: accuracy next to fidelity
    f0, f1 = fid["pruned"]["fidelity"]["logits"], fid["ft"]["fidelity"]["logits"]
    assert f1["rel_l2"] < 0.5 * f0["rel_l2"] and f1["top1_agreement"] > f0["top1_agreement"]
    assert acc["ft"] > acc["pruned"] + 0.05 and acc["ft"] > acc["dense"] - 0.05, acc
    print(f"digits: top-1 dense {acc['dense']:.3f}, pruned {acc['pruned']:.3f} -> distilled without labels "
          f"{acc['ft']:.3f}; rel_l2 {f0['rel_l2']:.3f} -> {f1['rel_l2']:.3f}; agreement "
          f"{f0['top1_agreement']:.3f} -> {f1['top1_agreement']:.3f}")


@pytest.mark.slow
def test_distill_features_at_the_pruned_layers_keeps_sparsity(digits_models, tmp_path, one_thread):
    from onnxprune import api
    from onnxprune.datasets.fidelity import evaluate_fidelity

    dense, _, unl = digits_models
    api.prune(dense, tmp_path / "sparse.onnx", method="unstructured", sparsity=0.85)
    code, out, err = run_cli("finetune", tmp_path / "sparse.onnx", "-o", tmp_path / "ft.onnx", "--teacher", dense,
                             "--data", f"npz:{unl}", "--epochs", "2", "--lr", "0.02", "--no-progress", "--json",
                             "--distill-features", "--output-kind", "logits=scores")
    assert code == 0, err
    h = json.loads(out)
    # masked layers keep their output shapes: their outputs are matched (the last one is the graph output)
    assert h["distill_features"] == ["/f/f.0/Conv_output_0", "/f/f.4/Conv_output_0"]
    assert h["sparsity"]["preserved"] and h["sparsity"]["pruned_weights"] > 0
    x = {"x": load_dataset("digits").test.x}
    kinds = {"logits": "scores"}  # unlabeled arrays: the classifier is declared (output kinds)
    before, _ = evaluate_fidelity(str(tmp_path / "sparse.onnx"), str(dense), x, output_kinds=kinds)
    after, _ = evaluate_fidelity(str(tmp_path / "ft.onnx"), str(dense), x, output_kinds=kinds)
    b, a = before["outputs"]["logits"], after["outputs"]["logits"]
    print(f"unstructured 85% + --distill-features: agreement {b['top1_agreement']:.3f} -> {a['top1_agreement']:.3f}, "
          f"rel_l2 {b['rel_l2']:.3f} -> {a['rel_l2']:.3f}")
    assert a["top1_agreement"] > max(0.85, b["top1_agreement"] + 0.2)


@pytest.mark.slow
def test_label_free_distillation_on_a_two_input_two_output_model(tmp_path, one_thread):
    from onnxprune import api

    d, x_tr, x_te, y_te = _digits_arrays()
    y_tr = np.concatenate([d.train.y, d.val.y])
    rng = np.random.default_rng(0)
    aux_tr = rng.standard_normal((len(x_tr), 3)).astype(np.float32)
    aux_tr[:, 0] += y_tr / 5.0  # a weak hint of the class in the side input
    xt, at, yt = torch.from_numpy(x_tr), torch.from_numpy(aux_tr), torch.from_numpy(y_tr)

    def batches():
        for i in range(0, len(xt), 64):
            yield xt[i:i + 64], at[i:i + 64], yt[i:i + 64]

    net = _fit(_TwoInput(), batches, lambda m, xb, ab, yb: nn.functional.cross_entropy(m(xb, ab)[0], yb), epochs=4)
    dense = _export(net, (torch.zeros(1, 1, 8, 8), torch.zeros(1, 3)), tmp_path / "dense.onnx", ["img", "aux"],
                    ["logits", "emb"])
    api.prune(dense, tmp_path / "pruned.onnx", method="structured", ratio=0.6)
    np.savez(tmp_path / "two.npz", img=x_tr, aux=aux_tr)  # one array per input, no labels
    code, out, err = run_cli("finetune", tmp_path / "pruned.onnx", "-o", tmp_path / "ft.onnx", "--teacher", dense,
                             "--data", f"npz:{tmp_path / 'two.npz'}", "--epochs", "3", "--lr", "0.05",
                             "--no-progress", "--json")
    assert code == 0, err
    h = json.loads(out)
    assert set(h["test_fidelity"]) == {"logits", "emb"} and h["best_val_rel_l2"] < h["initial_val_rel_l2"]
    aux_te = rng.standard_normal((len(x_te), 3)).astype(np.float32)
    aux_te[:, 0] += y_te / 5.0
    np.savez(tmp_path / "test.npz", img=x_te, aux=aux_te)
    res = {}
    for k in ("pruned", "ft"):
        code, out, err = run_cli("eval", tmp_path / f"{k}.onnx", "--data", f"npz:{tmp_path / 'test.npz'}?val=0&test=0",
                                 "--split", "train", "--reference", dense, "--json")
        assert code == 0, err
        res[k] = json.loads(out)["fidelity"]
    for name in ("logits", "emb"):
        assert res["ft"][name]["rel_l2"] < 0.6 * res["pruned"][name]["rel_l2"], (name, res)
    # the logits sit next to another output, so they were matched by value; their arg-max follows
    from onnxprune.datasets.fidelity import run_onnx

    feeds = {"img": x_te, "aux": aux_te}
    ref = run_onnx(str(dense), feeds)["logits"]
    agree = {k: top1_agreement(ref, run_onnx(str(tmp_path / f"{k}.onnx"), feeds)["logits"]) for k in ("pruned", "ft")}
    assert agree["ft"] > agree["pruned"] + 0.15, agree


@pytest.mark.slow
def test_ddp_label_free_ranks_end_identical(digits_models, tmp_path):
    from onnxprune.training import TrainConfig
    from onnxprune.training.ddp import launch_local

    dense, pruned, unl = digits_models
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64).to_dict()
    out = launch_local(pruned, f"npz:{unl}", cfg, tmp_path / "ddp", nprocs=2, teacher_path=dense)
    r0, r1 = np.load(out / "rank0.npz"), np.load(out / "rank1.npz")
    assert r0.files == r1.files and len(r0.files) > 4
    for k in r0.files:
        np.testing.assert_array_equal(r0[k], r1[k])
    h = json.loads((out / "history.json").read_text())
    assert h["world_size"] == 2 and h["objective"] == "distill" and h["selection"] == "val_fidelity"


# --------------------------------------------------------------------------- losses and objectives (fast)

def test_outputs_distill_loss_kl_for_scores_smooth_l1_for_the_rest():
    from onnxprune.training.distill import distillation_loss, outputs_distill_loss, regression_distill_loss

    g = torch.Generator().manual_seed(0)
    s_cls, t_cls = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    s_map, t_map = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    assert float(outputs_distill_loss((t_cls, t_map), (t_cls, t_map))) == pytest.approx(0.0, abs=1e-6)
    got = outputs_distill_loss((s_cls, s_map), (t_cls, t_map), temperature=2.0)
    want = (distillation_loss(s_cls, t_cls, 2.0) + regression_distill_loss(s_map, t_map)) / 2
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # the regression term is scale-free: the same relative error weighs the same at any scale
    assert float(regression_distill_loss(1000 * s_map, 1000 * t_map)) == pytest.approx(
        float(regression_distill_loss(s_map, t_map)), rel=1e-5)
    # a probability output (index in probs) is distilled through its log: same as its logits
    p_s, p_t = torch.softmax(s_cls, 1), torch.softmax(t_cls, 1)
    assert float(outputs_distill_loss((p_s,), (p_t,), probs={0})) == pytest.approx(
        float(distillation_loss(s_cls, t_cls)), rel=1e-4)
    with pytest.raises(ValueError, match="shape"):
        outputs_distill_loss((s_cls,), (t_cls[:, :3],))


def test_class_score_outputs_rule():
    from onnxprune.datasets.fidelity import class_score_outputs
    from onnxprune.training.distill import outputs_distill_loss, regression_distill_loss

    assert class_score_outputs(_image_model()) == ["y"]  # a single output: a classifier's scores
    assert class_score_outputs(_two_input_linear()) == []  # 2-D outputs side by side: boxes as often as classes
    m = _two_input_linear()
    m.graph.node.append(helper.make_node("Softmax", ["o2"], ["p"], axis=1))
    m.graph.node.append(helper.make_node("Flatten", ["p"], ["pf"]))
    m.graph.output.append(helper.make_tensor_value_info("pf", TensorProto.FLOAT, ["N", 3]))
    assert class_score_outputs(m) == ["pf"]
    # a 2-D output outside ``classes`` is distilled by value (smooth-L1), not KL
    g = torch.Generator().manual_seed(1)
    s_box, t_box = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert float(outputs_distill_loss((s_box,), (t_box,), classes=set())) == pytest.approx(
        float(regression_distill_loss(s_box, t_box)))


def test_objective_resolution_and_cli_errors(tmp_path):
    from onnxprune.training.config import TrainConfig, resolve_objective

    assert resolve_objective("auto", True, True) == "both"
    assert resolve_objective("auto", True, False) == "labels"
    assert resolve_objective("auto", False, True) == "distill"
    with pytest.raises(OnnxPruneError, match="no labels: pass --teacher"):
        resolve_objective("auto", False, False)
    with pytest.raises(OnnxPruneError, match="needs labels"):
        resolve_objective("both", False, True)
    with pytest.raises(OnnxPruneError, match="needs a teacher"):
        resolve_objective("distill", True, False)
    with pytest.raises(OnnxPruneError, match="objective must be one of"):
        TrainConfig(objective="kl")
    onnx.save(_two_input_linear(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "two.npz", a=np.zeros((20, 4), np.float32), b=np.zeros((20, 3), np.float32))
    code, _, err = run_cli("finetune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--data",
                           f"npz:{tmp_path / 'two.npz'}", "--no-progress")
    assert code == 1 and "no labels: pass --teacher" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- recipes on unlabeled data

UNLABELED_RECIPE = """
name: unlabeled
sweep:
  methods:
    - {name: l1, kind: structured, criterion: l1, points: [{ratio: 0.5}]}
  seeds: [0, 1]
hw: [ci-cpu]
retrain: {epochs: 1, lr: 0.05}
evaluation: {splits: [test], metric: "python:rmetric:score"}
profiling: {min_runs: 3, warmup_runs: 1, min_duration_s: 0.0, memory: false}
"""


@pytest.mark.slow
def test_recipe_on_unlabeled_data_reports_fidelity_and_the_user_metric(digits_models, tmp_path, monkeypatch):
    from onnxprune.pipeline.run import run_recipe

    dense, _, unl = digits_models
    (tmp_path / "rmetric.py").write_text("import numpy as np\ndef score(outputs, labels):\n"
                                         "    assert labels is None\n"
                                         "    return {'mean_max_logit': float(outputs['logits'].max(1).mean())}\n")
    (tmp_path / "r.yaml").write_text(UNLABELED_RECIPE)
    monkeypatch.chdir(tmp_path)
    rep = run_recipe(tmp_path / "r.yaml", dense, tmp_path / "out", data=f"npz:{unl}")
    d_acc, p_acc = rep["dense"]["accuracy"]["test"], rep["points"][0]["accuracy"]["test"]
    assert d_acc["top1"]["mean"] is None and d_acc["mean_rel_l2"]["mean"] == 0.0  # the dense model is the reference
    rel = p_acc["mean_rel_l2"]
    assert rel["n"] == 2 and 0 < rel["mean"] < 1  # aggregated over seeds
    # unlabeled data and no Softmax: the logits are not declared class scores (output kinds), so no agreement
    assert p_acc.get("top1_agreement") is None
    assert p_acc["metric"]["mean_max_logit"]["n"] == 2
    # retraining without labels distilled from the dense model
    assert all(r["train"]["teacher"] for r in rep["points"][0]["runs"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "test rel_l2 vs dense" in md and "test mean_max_logit" in md
