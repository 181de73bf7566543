"""Issue 14: gzip only where it means something, channel multiples from the hardware profile."""
from __future__ import annotations

import json

import pytest

import zoo
from cli_util import run_cli


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return zoo.export("tiny_resnet", tmp_path_factory.mktemp("hw_aware"))


def _prune(*args):
    code, stdout, err = run_cli("prune", *args, "--json")
    assert code == 0, err
    return json.loads(stdout)


def test_structured_skips_gzip_unless_asked(model_path, tmp_path):
    s = _prune(model_path, "-o", tmp_path / "a.onnx", "--structured", "--ratio", "0.5")
    assert s["gzip_bytes"] is None and s["input_gzip_bytes"] is None  # keys stay (stable JSON), no work done
    assert s["file_bytes"] == (tmp_path / "a.onnx").stat().st_size
    s = _prune(model_path, "-o", tmp_path / "b.onnx", "--structured", "--ratio", "0.5", "--gzip")
    assert 0 < s["gzip_bytes"] < s["input_gzip_bytes"]


def test_unstructured_gzips_by_default_and_no_gzip_skips(model_path, tmp_path):
    s = _prune(model_path, "-o", tmp_path / "a.onnx", "--unstructured", "--sparsity", "0.5")
    assert 0 < s["gzip_bytes"] < s["input_gzip_bytes"]
    s = _prune(model_path, "-o", tmp_path / "b.onnx", "--nm", "2:4", "--no-gzip")
    assert s["gzip_bytes"] is None


def test_human_structured_output_without_gzip(model_path, tmp_path):
    code, stdout, err = run_cli("prune", model_path, "-o", tmp_path / "a.onnx", "--structured", "--ratio", "0.5")
    assert code == 0, err
    assert "size:" in stdout and "gzip" not in stdout
