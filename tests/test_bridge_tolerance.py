"""The bridge check's tolerance fits the model's own float32 noise: a deep net with a sharp head,
where a fixed rtol of 1e-4 refuses a correct bridge, now passes with its noise floor reported; a
broken op is still refused and named; a difference between the tolerance and its refusal bound
warns and proceeds (API, ``bridge-check``, ``finetune``)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cli_util import run_cli  # noqa: E402
from onnxprune.bridge import TABLE, assert_bridge_faithful, check_bridge  # noqa: E402
from onnxprune.bridge.check import BORDERLINE, NOISE_OK, BridgeToleranceWarning  # noqa: E402
from onnxprune.core.errors import OnnxPruneError  # noqa: E402
from onnxprune.core.model_io import load_model  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 3, 48, 48)


class DeepSharp(torch.nn.Module):
    """34 convolutions: a stem, 32 conv-BN-ReLU blocks (every other one residual) and a 1x1 head
    into a sigmoid, like a text detector's probability map; the head's logits have a spread of
    about 200 (DBNet's binarization multiplies a difference of maps by k = 50), which is what turns
    float32 rounding deep in the net into ~1e-4 of the output."""

    def __init__(self, depth: int = 32, c: int = 16):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
                                    for _ in range(depth))
        self.head = nn.Conv2d(c, 1, 1)

    def logits(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = x + block(x) if i % 2 else block(x)
        return self.head(x)

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The net with batch-norm statistics calibrated on data (train-mode passes) and its head scaled
    to logits of spread 200 around 0; exported to ONNX (path)."""
    torch.manual_seed(0)
    m = DeepSharp()
    with torch.no_grad():
        for block in m.blocks:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.2, 0.2)
        m.train()
        for _ in range(5):
            m(torch.randn(8, *SHAPE[1:]))
        m.eval()
        z = m.logits(torch.randn(8, *SHAPE[1:]))
        k = 200.0 / float(z.std())
        m.head.weight.mul_(k)
        m.head.bias.mul_(k).sub_(float(z.mean()) * k)
    path = tmp_path_factory.mktemp("deep") / "deep_sharp.onnx"
    export_torch(m, (torch.randn(*SHAPE),), path)
    return path


def _shapes():
    return {"input": SHAPE}


def test_deep_model_passes_where_a_fixed_rtol_refused(deep):
    model = load_model(deep)
    assert sum(n.op_type == "Conv" for n in model.graph.node) >= 30
    report = check_bridge(model, _shapes())
    out = report["outputs"][0]
    assert out["max_abs_diff"] > 1e-5 + 1e-4 * out["scale"], "the old fixed check (rtol 1e-4, atol 1e-5) must refuse this"
    assert report["status"] == "ok" and report["ok"] and report["first_diverging_node"] is None
    # the figures: ONNX Runtime against itself is as far apart as the bridge is from it
    sources = out["noise_sources"]
    assert out["noise_floor"] == max(sources.values()) and sources["ort_optimizations"] > 1e-5
    assert out["max_abs_diff"] < 5 * out["noise_floor"]
    assert out["tolerance"] == pytest.approx(NOISE_OK * out["noise_floor"])
    assert report["tolerance_rel"] == pytest.approx(out["tolerance"] / out["scale"])
    assert report["noise_floor_rel"] == pytest.approx(out["noise_floor"] / out["scale"])
    assert_bridge_faithful(model, _shapes())  # no warning either: it is within the tolerance


def test_a_broken_op_is_still_refused_and_named(deep, monkeypatch):
    model = load_model(deep)
    original = TABLE["Conv"]
    monkeypatch.setitem(TABLE, "Conv", lambda n, *xs: original(n, *xs) + 1e-2)  # a wrong bias
    report = check_bridge(model, _shapes())
    assert report["status"] == "diverges" and not report["ok"]
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert report["first_diverging_node"] == first_conv and report["first_diverging_op"] == "Conv"
    with pytest.raises(OnnxPruneError, match=rf"at node {first_conv} \(op Conv\): max rel diff .* \(tolerance "):
        assert_bridge_faithful(model, _shapes())


def _offset_sigmoid(monkeypatch, by: float) -> None:
    original = TABLE["Sigmoid"]
    monkeypatch.setitem(TABLE, "Sigmoid", lambda n, x: original(n, x) + by)


@pytest.mark.parametrize("times,status", [(2.5, "borderline"), (2 * BORDERLINE, "diverges")])
def test_status_follows_the_measured_tolerance(deep, monkeypatch, times, status):
    """An output offset by a multiple of the tolerance measured on this machine: between the
    tolerance and BORDERLINE times it warns, beyond it is refused."""
    model = load_model(deep)
    tolerance = check_bridge(model, _shapes())["outputs"][0]["tolerance"]
    _offset_sigmoid(monkeypatch, times * tolerance)
    report = check_bridge(model, _shapes())
    assert report["status"] == status
    if status == "borderline":
        with pytest.warns(BridgeToleranceWarning, match="above the tolerance .* float32 noise floor .*: proceeding"):
            assert assert_bridge_faithful(model, _shapes())["status"] == "borderline"
    else:
        assert report["first_diverging_node"] == next(n.name for n in model.graph.node if n.op_type == "Sigmoid")
        with pytest.raises(OnnxPruneError):
            assert_bridge_faithful(model, _shapes())


def test_cli_reports_the_figures_and_warns_on_borderline(deep, monkeypatch):
    args = ("bridge-check", deep, "--input-shape", "input=" + "x".join(map(str, SHAPE)))
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "noise floor" in out and "ort optimizations" in out and "within the model's float32 noise" in out
    code, out, _ = run_cli(*args, "--json")
    data = json.loads(out)
    tolerance = data["outputs"][0]["tolerance"]
    assert data["status"] == "ok" and data["noise_floor_rel"] > 0 and data["tolerance_rel"] >= 1e-4
    _offset_sigmoid(monkeypatch, 2.5 * tolerance)
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "BORDERLINE" in out
    assert err.strip().splitlines() == [err.strip()] and err.startswith("warning: the bridge differs from ONNX Runtime")


def test_finetune_proceeds_on_the_deep_model(deep, tmp_path):
    """finetune's pre-training check (model and teacher) passes, and its figures go into the history."""
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((16, *SHAPE[1:])).astype(np.float32))
    out, hist = tmp_path / "tuned.onnx", tmp_path / "hist.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", BridgeToleranceWarning)
        code, _, err = run_cli("finetune", deep, "-o", out, "--teacher", deep, "--data", f"npz:{tmp_path / 'x.npz'}",
                               "--epochs", "1", "--batch-size", "8", "--no-progress", "--history", hist)
    assert code == 0, err
    check = json.loads(hist.read_text())["bridge_check"]
    assert check["status"] == "ok" and check["max_rel_diff"] > 1e-4 and check["tolerance_rel"] > check["max_rel_diff"]


def test_a_model_without_noise_keeps_the_fixed_floor(tmp_path):
    """Where ONNX Runtime agrees with itself exactly, the tolerance is the rtol/atol floor."""
    import zoo

    report = check_bridge(load_model(zoo.export("conv_chain", tmp_path)), {"input": (2, 3, 16, 16)})
    out = report["outputs"][0]
    assert report["status"] == "ok"
    assert out["tolerance"] == pytest.approx(max(1e-5 + 1e-4 * out["scale"], NOISE_OK * out["noise_floor"]))
    assert out["noise_floor"] < 1e-5 * out["scale"]
