"""``onnxprune prune``: JSON fields, the speed note, and one-line errors that write nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import zoo
from cli_util import run_cli
from conftest import random_feeds, run_ort
from onnxprune.sparsity import satisfies_nm
from onnxprune.core.graph import build_view
from onnxprune.sparsity.select import prunable_weights


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return zoo.export("tiny_resnet", tmp_path_factory.mktemp("zoo_cli"))


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_unstructured_json(model_path, tmp_path):
    out = tmp_path / "pruned.onnx"
    before = model_path.read_bytes()
    code, stdout, err = run_cli("prune", model_path, "-o", out, "--unstructured", "--sparsity", "0.6", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    for key in ("method", "criterion", "scope", "target_sparsity", "achieved_sparsity", "sparsity_all_params",
                "target_sparsity_all_params", "compression_ratio", "params", "nonzero_params", "layers", "skipped",
                "file_bytes", "gzip_bytes", "output", "guidance", "input_file_bytes", "input_gzip_bytes"):
        assert key in s, key
    assert s["method"] == "unstructured" and s["criterion"] == "magnitude" and s["scope"] == "global"
    assert s["target_sparsity"] == 0.6 and abs(s["achieved_sparsity"] - 0.6) * sum(x["size"] for x in s["layers"]) <= 1
    assert s["output"] == str(out) and s["file_bytes"] == os.path.getsize(out)
    assert s["gzip_bytes"] < s["input_gzip_bytes"]
    assert all({"node", "weight", "size", "sparsity"} <= set(x) for x in s["layers"])
    assert "will not make this model faster on ONNX Runtime CPU" in s["guidance"][0]
    assert model_path.read_bytes() == before  # the input is never touched
    feeds = random_feeds(onnx.load(str(out)))
    run_ort(out, feeds)


def test_human_output_prints_the_note(model_path, tmp_path):
    code, stdout, err = run_cli("prune", model_path, "-o", tmp_path / "p.onnx", "--unstructured", "--sparsity", "0.5",
                                "--scope", "layer", "--criterion", "lamp")
    assert code == 0, err
    flat = " ".join(stdout.split())
    assert "note: unstructured sparsity will not make this model faster on ONNX Runtime CPU" in flat
    assert "structured pruning" in flat and "gzip" in flat


def test_nm_json_and_tensorrt_note(model_path, tmp_path):
    out = tmp_path / "nm.onnx"
    code, stdout, err = run_cli("prune", model_path, "-o", out, "--nm", "2:4", "--hw", "tensorrt", "--json",
                                "--exclude-last")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["method"] == "nm" and s["pattern"] == "2:4"
    assert [x["node"] for x in s["skipped"]] == ["/stem/stem.0/Conv"] and "not divisible by 4" in s["skipped"][0]["reason"]
    assert [x["node"] for x in s["excluded"]] == ["/fc/Gemm"]
    assert "TensorRT" in s["guidance"][0]
    view = build_view(onnx.load(str(out)))
    for p in prunable_weights(view):
        if p.node not in ("/stem/stem.0/Conv", "/fc/Gemm"):
            assert satisfies_nm(view.const(p.weight), 2, 4, p.reduction_axis)


def test_hw_profile_file_sets_the_backend(model_path, tmp_path):
    prof = tmp_path / "orin.yaml"
    prof.write_text("name: orin\nbackend: tensorrt\nprecision: fp16\nsparse_weights: true\n"
                    "gpu: {compute_capability: '8.7'}\n")
    code, stdout, err = run_cli("prune", model_path, "-o", tmp_path / "nm.onnx", "--nm", "2:4", "--hw", prof, "--json")
    assert code == 0, err
    assert json.loads(stdout)["guidance"][0].startswith("2:4 sparsity can be faster on TensorRT on this GPU (compute capability 8.7)")


def test_sparse_storage_flag(model_path, tmp_path):
    out = tmp_path / "sp.onnx"
    code, stdout, err = run_cli("prune", model_path, "-o", out, "--unstructured", "--sparsity", "0.9", "--sparse-storage",
                                "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["storage"] == "sparse" and s["file_bytes"] < s["input_file_bytes"]
    feeds = random_feeds(onnx.load(str(model_path)))
    run_ort(out, feeds)


@pytest.mark.parametrize("args,message", [
    (["MISSING", "-o", "OUT", "--unstructured", "--sparsity", "0.5"], "no such file"),
    (["CORRUPT", "-o", "OUT", "--unstructured", "--sparsity", "0.5"], "not a valid ONNX"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "1"], "--sparsity must be in [0, 1)"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "half"], "--sparsity expects a number"),
    (["MODEL", "-o", "OUT", "--unstructured"], "needs --sparsity"),
    (["MODEL", "-o", "OUT", "--nm", "4:2"], "1 <= N < M"),
    (["MODEL", "-o", "OUT", "--nm", "2:2"], "1 <= N < M"),
    (["MODEL", "-o", "OUT", "--nm", "two:four"], "N:M"),
    (["MODEL", "-o", "MODEL", "--unstructured", "--sparsity", "0.5"], "overwrite the input"),
    (["MODEL", "--unstructured", "--sparsity", "0.5"], "missing -o"),
    (["MODEL", "-o", "OUT"], "exactly one of"),
    (["MODEL", "-o", "OUT", "--unstructured", "--nm", "2:4", "--sparsity", "0.5"], "exactly one of"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--scope", "local"], "--scope 'local' is not valid"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--criterion", "l1"], "--criterion 'l1' is not valid"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--ratio", "0.5"], "--ratio does not apply"),
    (["MODEL", "-o", "OUT", "--nm", "2:4", "--sparsity", "0.5"], "--sparsity does not apply"),
    (["MODEL", "-o", "OUT", "--structured", "--ratio", "0.5", "--scope", "layer"], "--scope 'layer' is not valid"),
    (["MODEL", "-o", "OUT", "--structured"], "exactly one of --ratio"),
    (["MODEL", "-o", "OUT", "--structured", "--ratio", "0.3", "--sparse-storage"], "--sparse-storage does not apply"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--criterion", "magnitude_x_gradient"], "--data"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--data", "digits"], "--data is used only"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.99", "--min-threshold", "0.2"], "cannot be reached"),
    (["MODEL", "-o", "OUT", "--unstructured", "--sparsity", "0.5", "--seed", "x"], "--seed expects an integer"),
])
def test_bad_input_is_one_line_and_writes_nothing(model_path, tmp_path, args, message):
    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.onnx"
    model.write_bytes(model_path.read_bytes())
    (work / "corrupt.onnx").write_bytes(b"\x08\x07garbage, not protobuf at all")
    subst = {"MODEL": model, "OUT": work / "out" / "pruned.onnx", "MISSING": work / "missing.onnx",
             "CORRUPT": work / "corrupt.onnx"}
    before = _listing(work)
    code, stdout, err = run_cli("prune", *[subst.get(a, a) for a in args])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert _listing(work) == before and not (work / "out").exists()
    assert model.read_bytes() == model_path.read_bytes()


def test_structured_branch(model_path, tmp_path):
    out = tmp_path / "s.onnx"
    code, stdout, err = run_cli("prune", model_path, "-o", out, "--structured", "--ratio", "0.5", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["method"] == "structured" and s["file_bytes"] == os.path.getsize(out)
    assert s["file_bytes"] < s["input_file_bytes"]
    assert "structured pruning" in s["guidance"][0]
    original = onnx.load(str(model_path))
    feeds = random_feeds(original)
    got = run_ort(out, feeds)
    assert got[0].shape == run_ort(original, feeds)[0].shape and np.isfinite(got[0]).all()


def test_gradient_criterion_with_data(tmp_path):
    torch = pytest.importorskip("torch")
    from onnxprune.bridge.torch_export import export_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10))
    path = export_torch(net, (torch.randn(1, 1, 8, 8),), tmp_path / "digits_cnn.onnx")
    code, stdout, err = run_cli("prune", path, "-o", tmp_path / "g.onnx", "--unstructured", "--sparsity", "0.5",
                                "--criterion", "magnitude_x_gradient", "--data", "digits", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["criterion"] == "magnitude_x_gradient" and s["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # a different criterion than plain magnitude: not the same weights
    code2, stdout2, _ = run_cli("prune", path, "-o", tmp_path / "m.onnx", "--unstructured", "--sparsity", "0.5", "--json")
    assert code2 == 0
    from onnxprune.sparsity import masks_of
    a, b = masks_of(onnx.load(str(tmp_path / "g.onnx"))), masks_of(onnx.load(str(tmp_path / "m.onnx")))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
