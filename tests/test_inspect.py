"""MACs are exact for Conv (groups, dilation, padding, stride), ConvTranspose, Gemm and batched MatMul."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import onnx_graphs
from cli_util import run_cli
from onnxprune.metrics.inspection import inspect_model
from onnxprune.bridge.torch_export import export_torch


def _export(module, shape, tmp_path, name="m"):
    path = tmp_path / f"{name}.onnx"
    export_torch(module, (torch.randn(*shape),), path, dynamic_batch=False)
    return path


@pytest.mark.parametrize("kw", [
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=1, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=0, dilation=2),
    dict(in_channels=8, out_channels=16, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), groups=4),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
])
def test_conv_macs_exact(kw, tmp_path):
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, 8, 15, 17)
    out = conv(x)
    k = np.prod(conv.kernel_size)
    expected = out.numel() * (conv.in_channels // conv.groups) * k
    info = inspect_model(_export(conv, x.shape, tmp_path))
    assert info["macs"] == expected
    assert info["params"] == sum(p.numel() for p in conv.parameters())


def test_conv_transpose_macs(tmp_path):
    m = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = torch.randn(1, 6, 5, 7)
    expected = x.numel() * (4 // 2) * 9
    assert inspect_model(_export(m, x.shape, tmp_path))["macs"] == expected


def test_linear_and_batched_matmul_macs(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 7)

        def forward(self, x):  # x: [B, T, 12]
            h = self.fc(x)  # MatMul with constant weight, batched
            return h @ h.transpose(1, 2)  # activation x activation batched matmul

    x = torch.randn(3, 5, 12)
    info = inspect_model(_export(M(), x.shape, tmp_path))
    assert info["macs"] == 3 * 5 * 7 * 12 + 3 * 5 * 5 * 7


def test_gemm_macs(tmp_path):
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    info = inspect_model(_export(m, (4, 3, 4, 4), tmp_path))
    assert info["macs"] == 4 * 48 * 10
    assert info["op_histogram"].get("Gemm") == 1


def test_resnet50_reference_figures(tmp_path, monkeypatch):
    """The issue's reference: ResNet-50 at 1x3x224x224 is about 4.1 GMACs and 25.56 M parameters.
    (bench/nets.py's ResNet-50, the model the benchmarks measure.)"""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from nets import resnet50
    info = inspect_model(_export(resnet50(), (1, 3, 224, 224), tmp_path, "r50"))
    assert info["params"] == 25_557_032  # torchvision's exact count (BN running stats are buffers)
    assert abs(info["macs"] - 4.089e9) / 4.089e9 < 0.005


def test_symbolic_dims_and_input_shape_override():
    path_model = onnx_graphs.dynamic_dims()
    info = inspect_model(path_model)
    assert info["macs"] is None and any("--input-shape" in n for n in info["notes"])
    info = inspect_model(path_model, {"x": (2, 3, 10, 10)})
    assert info["macs"] == 2 * 6 * 10 * 10 * 27 + 2 * 6 * 5
    assert info["inputs"][0]["shape"] == ["batch", 3, "H", "W"]


def test_input_shape_binds_same_named_dims_of_other_inputs():
    """Exporters name a shared dim the same on every input (``batch``, ``sequence``): fixing one
    input fixes that dim of the others too, so their MACs resolve without a flag for each."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.core.prepare import resolve_input_shapes

    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims + [4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims + [3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shapes, notes = resolve_input_shapes(model, {"a": (2, 5, 4)})
    assert shapes == {"a": (2, 5, 4), "b": (2, 5, 4)} and not notes
    assert inspect_model(model, {"a": (2, 5, 4)})["macs"] == 2 * 5 * 4 * 3
    shapes, notes = resolve_input_shapes(model, {"a": (1, 5, 4), "b": (3, 5, 4)})  # given ones are kept
    assert shapes == {"a": (1, 5, 4), "b": (3, 5, 4)}


def test_cli_json_fields(tmp_path):
    path = _export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 8, 8), tmp_path)
    code, out, _ = run_cli("inspect", path, "--json")
    assert code == 0
    info = json.loads(out)
    for key in ("params", "nonzero_params", "macs", "file_bytes", "opset", "inputs", "outputs", "op_histogram", "nodes"):
        assert key in info
    node = next(n for n in info["nodes"] if n["op_type"] == "Conv")
    assert set(node) >= {"name", "op_type", "macs", "params", "output_shape"}
    assert info["file_bytes"] == path.stat().st_size


def test_cli_human_table(tmp_path):
    path = _export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 8, 8), tmp_path)
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "Conv" in out and "MACs" in out


def test_macs_through_runtime_shape_arithmetic(tmp_path):
    """torch.chunk exports Shape->Gather->Div->Slice; with a concrete input the MACs are still exact."""
    class Chunky(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.branch = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a, b = self.stem(x).chunk(2, dim=1)
            return torch.cat([a, self.branch(b)], 1)

    path = tmp_path / "chunky.onnx"
    export_torch(Chunky(), (torch.randn(1, 3, 8, 8),), path)
    info = inspect_model(path)
    assert info["macs"] == 8 * 64 * 3 + 4 * 64 * 4 * 9
