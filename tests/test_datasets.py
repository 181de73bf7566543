"""Dataset specs, splits, preprocessing, and ONNX Runtime accuracy (``onnxprune eval``)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli, subprocess_env
from onnxprune.datasets import Preprocess, evaluate_onnx, load_dataset, parse_spec, stratified_split
from onnxprune.core.errors import OnnxPruneError


# --------------------------------------------------------------------------- digits and splits

def test_digits_splits_sizes_range_and_stratification():
    d = load_dataset("digits")
    n = {k: len(getattr(d, k)) for k in ("train", "val", "test")}
    assert sum(n.values()) == 1797 and n == {"train": 1079, "val": 359, "test": 359}
    assert d.num_classes == 10 and d.input_shape == (1, 8, 8)
    for s in (d.train, d.val, d.test):
        assert s.x.dtype == np.float32 and s.y.dtype == np.int64 and s.x.shape[1:] == (1, 8, 8)
        assert 0.0 <= s.x.min() and s.x.max() <= 1.0
    # stratified: every class contributes round(20%) of its samples to val and to test
    counts = np.bincount(np.concatenate([d.train.y, d.val.y, d.test.y]), minlength=10)
    np.testing.assert_array_equal(np.bincount(d.val.y, minlength=10), np.round(counts * 0.2).astype(int))
    np.testing.assert_array_equal(np.bincount(d.test.y, minlength=10), np.round(counts * 0.2).astype(int))
    # no sample in two splits (rows of digits are unique enough to check via bytes + label)
    keys = [{(r.tobytes(), int(l)) for r, l in zip(s.x, s.y)} for s in (d.train, d.val, d.test)]
    assert not (keys[1] & keys[2])


def test_digits_split_is_deterministic_and_seeded():
    a, b, c = load_dataset("digits"), load_dataset("digits"), load_dataset("digits", seed=1)
    np.testing.assert_array_equal(a.val.x, b.val.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.val.x, c.val.x)


def test_stratified_split_partitions_indices():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, va, te = stratified_split(y, (0.2, 0.1), seed=3)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(60))
    assert np.bincount(y[va]).tolist() == [2, 4, 6] and np.bincount(y[te]).tolist() == [1, 2, 3]


def test_split_fractions_from_spec():
    d = load_dataset("digits?val=0.1&test=0.3")
    assert abs(len(d.val) - 180) <= 5 and abs(len(d.test) - 539) <= 5


def test_describe_is_json_ready():
    desc = load_dataset("digits?normalize=0.5,0.25").describe()
    json.dumps(desc)
    assert desc["samples"]["train"] == 1079 and desc["preprocess"]["mean"] == [0.5]


# --------------------------------------------------------------------------- preprocessing

def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    for size in ((16, 16), (5, 7), (8, 12)):
        ours = Preprocess(resize=size).apply(x)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_normalize_and_layout():
    d0 = load_dataset("digits")
    d = load_dataset("digits?resize=16x16&normalize=0.5,0.25&layout=nhwc")
    assert d.input_shape == (16, 16, 1) and d.train.x.shape[1:] == (16, 16, 1)
    back = Preprocess(resize=(16, 16)).apply(d0.train.x[:4]).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(d.train.x[:4], (back - 0.5) / 0.25, atol=1e-5)
    rgb = Preprocess(mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0)).apply(np.ones((1, 3, 2, 2), np.float32))
    np.testing.assert_allclose(rgb[0, :, 0, 0], [0.9, 0.4, 0.175], rtol=1e-6)
    # recipe mapping form, overriding the string
    m = load_dataset({"spec": "digits?resize=4x4", "resize": [10, 10], "normalize": {"mean": [0.5], "std": [0.5]}})
    assert m.input_shape == (1, 10, 10) and m.train.x.min() < 0


# --------------------------------------------------------------------------- npz / cifar10 / imagefolder / python

def test_npz_round_trip_with_explicit_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrs = {k: rng.random((n, 2, 4, 4), dtype=np.float32) for k, n in (("x", 30), ("x_val", 8), ("x_test", 6))}
    arrs.update({k: rng.integers(0, 3, n) for k, n in (("y", 30), ("y_val", 8), ("y_test", 6))})
    np.savez(tmp_path / "d.npz", **arrs)
    d = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    np.testing.assert_array_equal(d.train.x, arrs["x"])
    np.testing.assert_array_equal(d.val.y, arrs["y_val"])
    np.testing.assert_array_equal(d.test.x, arrs["x_test"])
    assert d.num_classes == 3 and d.input_shape == (2, 4, 4)


def test_npz_carves_splits_scales_integers_and_reads_nhwc(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (50, 6, 6, 3)).astype(np.uint8)
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_dataset(f"npz:{tmp_path / 'd.npz'}?stored=nhwc")
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 10)
    assert d.input_shape == (3, 6, 6)
    allx = np.concatenate([d.train.x, d.val.x, d.test.x])
    ref = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    assert sorted(map(bytes, allx.reshape(50, -1).view(np.uint8))) == sorted(map(bytes, ref.reshape(50, -1).view(np.uint8)))


def _write_cifar(root, n=20, seed=0):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in np.arange(n) % 10]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_pickle_batches(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset(f"cifar10:{tmp_path}")
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32)
    assert len(d.train) + len(d.val) == 100 and len(d.val) == 10 and len(d.test) == 20
    data, labels = batches["test_batch"]
    # rows are R(1024) G(1024) B(1024), each 32x32 row-major
    np.testing.assert_allclose(d.test.x[3, 1, 2, 5], data[3, 1024 + 2 * 32 + 5] / 255, rtol=1e-6)
    np.testing.assert_array_equal(d.test.y, labels)


def test_imagefolder_pngs(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = {}
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(5):
            a = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / c / f"{i}.png")
            pixels[(c, i)] = a
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    d = load_dataset(f"imagefolder:{tmp_path}?val=0.2&test=0.2")
    assert d.num_classes == 2 and d.input_shape == (3, 6, 6)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 2)
    allx = np.concatenate([d.train.x, d.val.x, d.test.x])
    target = pixels[("dog", 3)].transpose(2, 0, 1).astype(np.float32) / 255
    assert any(np.array_equal(a, target) for a in allx)
    g = load_dataset(f"imagefolder:{tmp_path}?color=grey&resize=4x4")
    assert g.input_shape == (1, 4, 4)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "cat" / "big.png")
    with pytest.raises(OnnxPruneError, match="resize"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_python_spec_arrays_kwargs_and_module_path(tmp_path, monkeypatch):
    mod = tmp_path / "mydata.py"
    mod.write_text(textwrap.dedent("""
        import numpy as np
        def make(n="40", seed=0):
            rng = np.random.default_rng(seed)
            n = int(n)
            return {"train": (rng.random((n, 1, 4, 4), dtype=np.float32), np.arange(n) % 4),
                    "val": (rng.random((8, 1, 4, 4), dtype=np.float32), np.arange(8) % 4)}
        def broken():
            raise RuntimeError("no data here")
        def wrong():
            return 42
    """))
    d = load_dataset(f"python:{mod}:make?n=60")
    assert (len(d.train), len(d.val)) == (48, 8) and len(d.test) == 12 and d.num_classes == 4
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(load_dataset("python:mydata:make").train) == 32
    with pytest.raises(OnnxPruneError, match="RuntimeError: no data here"):
        load_dataset("python:mydata:broken")
    with pytest.raises(OnnxPruneError, match="must return"):
        load_dataset("python:mydata:wrong")
    with pytest.raises(OnnxPruneError, match="has no callable"):
        load_dataset("python:mydata:nope")


def test_python_spec_with_torch_dataloaders(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "loaders.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        def make():
            g = torch.Generator().manual_seed(0)
            ds = lambda n: TensorDataset(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 3)
            return {"train": DataLoader(ds(20), batch_size=8), "val": DataLoader(ds(9), batch_size=4),
                    "test": DataLoader(ds(6), batch_size=4), "num_classes": 3}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_dataset("python:loaders:make?resize=8x8")
    assert d.num_classes == 3 and d.input_shape == (1, 8, 8) and len(d.val) == 9
    xs = [x for x, _ in d.train.batches()]
    assert [len(x) for x in xs] == [8, 8, 4] and xs[0].shape[1:] == (1, 8, 8) and xs[0].dtype == np.float32


@pytest.mark.parametrize("spec, match", [
    ("", "empty data spec"),
    ("mnist", "unknown data spec"),
    ("npz", "needs an argument"),
    ("npz:/no/such/file.npz", "no such file"),
    ("cifar10:/no/such/dir", "no such folder"),
    ("digits:extra", "takes no argument"),
    ("digits?resize=abc", "bad resize"),
    ("digits?resize=0x4", "positive"),
    ("digits?normalize=0.5", "MEAN,STD"),
    ("digits?normalize=0.5,0", "std must be positive"),
    ("digits?layout=nwhc", "bad layout"),
    ("digits?colour=rgb", "unknown option"),
    ("digits?val=1.5", "fraction"),
    ("digits?val=0.5&test=0.5", "no training data"),
    ("digits?novalue", "KEY=VALUE"),
    ("python:nomodule_xyz_123:f", "cannot import"),
    ("python:justmodule", "module:function"),
])
def test_bad_specs_are_one_line_errors(spec, match):
    with pytest.raises(OnnxPruneError, match=match) as ei:
        load_dataset(spec)
    assert "\n" not in str(ei.value)


def test_bad_npz_contents(tmp_path):
    np.savez(tmp_path / "a.npz", inputs=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(OnnxPruneError, match="needs arrays 'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'a.npz'}")
    (tmp_path / "b.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxPruneError, match="not a readable"):
        load_dataset(f"npz:{tmp_path / 'b.npz'}")
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(OnnxPruneError, match="4 inputs but 3 labels"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}")
    (tmp_path / "cifar").mkdir()
    with pytest.raises(OnnxPruneError, match="data_batch_1..5"):
        load_dataset(f"cifar10:{tmp_path / 'cifar'}")


def test_parse_spec_parts():
    p = parse_spec("python:pkg.mod:fn?root=/data&resize=8x8")
    assert (p.kind, p.arg) == ("python", "pkg.mod:fn") and p.options == {"root": "/data", "resize": "8x8"}


# --------------------------------------------------------------------------- evaluate_onnx / eval CLI

def _linear_model(w: np.ndarray, batch: int | str = "N") -> onnx.ModelProto:
    """logits = flatten(x) @ w: the scores are known in closed form."""
    f, c = w.shape
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["xf"], axis=1), helper.make_node("MatMul", ["xf", "w"], ["logits"])],
        "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 1, f])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, c])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def scored(tmp_path):
    rng = np.random.default_rng(0)
    n, f, c = 103, 6, 8
    x = rng.standard_normal((n, 1, 1, f)).astype(np.float32)
    y = rng.integers(0, c, n)
    w = rng.standard_normal((f, c)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x[:5], y_val=y[:5], x_test=x, y_test=y)
    logits = x.reshape(n, f) @ w
    order = np.argsort(-logits, axis=1)
    top1 = float(np.mean(order[:, 0] == y))
    top5 = float(np.mean([y[i] in order[i, :5] for i in range(n)]))
    return tmp_path, w, top1, top5


def test_evaluate_onnx_matches_hand_computation(scored):
    tmp, w, top1, top5 = scored
    spec = f"npz:{tmp / 'd.npz'}"
    res = evaluate_onnx(_linear_model(w), spec, batch_size=16)
    assert res == {"top1": pytest.approx(top1), "top5": pytest.approx(top5), "samples": 103, "split": "test"}
    assert 0 < top1 < top5 < 1
    fixed = evaluate_onnx(_linear_model(w, batch=4), spec)  # fixed batch of 4: padded last batch
    assert fixed == res
    assert evaluate_onnx(_linear_model(w), spec, split="val")["samples"] == 5


def test_evaluate_top5_only_above_five_classes(tmp_path):
    x = np.eye(5, dtype=np.float32).reshape(5, 1, 1, 5)
    y = np.array([0, 1, 2, 3, 0])
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x, y_val=y, x_test=x, y_test=y)
    res = evaluate_onnx(_linear_model(np.eye(5, dtype=np.float32)), f"npz:{tmp_path / 'd.npz'}")
    assert res["top5"] is None and res["top1"] == pytest.approx(0.8)


def test_eval_cli_json_and_errors(scored, tmp_path):
    tmp, w, top1, top5 = scored
    onnx.save(_linear_model(w), str(tmp / "m.onnx"))
    code, out, err = run_cli("eval", tmp / "m.onnx", "--data", f"npz:{tmp / 'd.npz'}", "--json")
    assert code == 0, err
    assert json.loads(out) == {"top1": pytest.approx(top1), "top5": pytest.approx(top5), "samples": 103, "split": "test"}
    code, out, err = run_cli("eval", tmp / "m.onnx", "--data", f"npz:{tmp / 'd.npz'}")
    assert code == 0 and "top-1" in out
    code, _, err = run_cli("eval", tmp / "m.onnx", "--data", "digits")
    assert code == 1 and "expects samples of shape" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", tmp / "missing.onnx", "--data", "digits")
    assert code == 1 and "no such file" in err


def test_eval_reads_the_split_of_the_data_spec(scored):
    """``--data SPEC?split=val`` scores val (as ``--calibrate`` reads ``?split=``); ``--split`` that
    agrees is fine, one that disagrees is one error line, not a silent choice."""
    tmp, w, _, _ = scored
    onnx.save(_linear_model(w), str(tmp / "m.onnx"))
    spec = f"npz:{tmp / 'd.npz'}"
    for args in (["--data", f"{spec}?split=val"], ["--data", f"{spec}?split=val", "--split", "val"],
                 ["--data", spec, "--split", "val"]):
        code, out, err = run_cli("eval", tmp / "m.onnx", *args, "--json")
        assert code == 0, err
        assert json.loads(out)["split"] == "val" and json.loads(out)["samples"] == 5
    for args, words in ((["--data", f"{spec}?split=val", "--split", "test"], ("--split test", "split=val")),
                        (["--data", f"{spec}?split=all"], ("split=all",))):
        code, out, err = run_cli("eval", tmp / "m.onnx", *args, "--json")
        assert code == 1 and not out and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert all(w in err for w in words), err


def test_eval_path_does_not_import_torch(scored):
    tmp, w, _, _ = scored
    onnx.save(_linear_model(w), str(tmp / "m.onnx"))
    code = ("import sys; from onnxprune.cli import main\n"
            "try:\n    main(['eval', sys.argv[1], '--data', sys.argv[2], '--json'])\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'eval imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp / "m.onnx"), f"npz:{tmp / 'd.npz'}"],
                       capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert r.returncode == 0, r.stderr


def test_preprocess_argument_overrides_spec():
    d = load_dataset("digits?resize=4x4", preprocess={"resize": "16x16", "layout": "nhwc"})
    assert d.input_shape == (16, 16, 1)
    p = load_dataset("digits", preprocess=Preprocess(mean=(0.5,), std=(0.5,)))
    assert p.preprocess.mean == (0.5,) and p.train.x.min() < 0


def test_imagefolder_with_split_folders(tmp_path):
    from PIL import Image
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((5, 5), 40 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}?color=grey")
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 6) and d.input_shape == (1, 5, 5)
    assert sorted(d.test.y.tolist()) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "test" / "zebra" / "z.png")
    with pytest.raises(OnnxPruneError, match="not among the training classes"):
        load_dataset(f"imagefolder:{tmp_path}")
