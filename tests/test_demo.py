"""``onnxprune demo --quick``: the embedded default job, end to end (trains, prunes, retrains, profiles)."""
from __future__ import annotations

import json

import pytest

from cli_util import run_cli


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run_cli("demo", "--quick", "-o", str(out))
    assert code == 0, err
    assert "report.html" in stdout and "structured-l1" in stdout
    for f in ("report.json", "report.md", "report.html", "state.json", "digits_cnn.onnx", "models/dense.onnx"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    dense = rep["dense"]
    kinds = [p["kind"] for p in rep["points"]]
    assert kinds.count("structured") == 2 and kinds.count("unstructured") == 2
    assert rep["retraining"]["config"]["epochs"] == 1  # --quick
    for p in rep["points"]:
        assert (out / p["models"][0]).is_file()
        assert 0.0 <= p["accuracy"]["test"]["top1"]["mean"] <= 1.0
        assert p["profiles"]["ci-cpu"][0]["latency_ms"]["p50"] > 0
        prune = p["runs"][0]["prune"]
        if p["kind"] == "structured":
            # fewer MACs and params than dense, close to the MACs target
            assert p["macs"] < dense["macs"] and p["params"] < dense["params"]
            target = p["settings"]["target"]["macs"]
            assert p["macs"] / dense["macs"] == pytest.approx(target, abs=0.1)
        else:
            # same MACs executed; nonzero params match the stated sparsity of the prunable weights
            assert p["macs"] == dense["macs"] and p["params"] == dense["params"]
            target = p["settings"]["target"]["sparsity"]
            assert prune["achieved_sparsity"] == pytest.approx(target, abs=1e-3)
            assert p["runs"][0]["train"]["sparsity"]["preserved"] is True  # retraining kept the zeros
            removed = dense["nonzero_params"] - p["nonzero_params"]
            assert removed >= 0.99 * target * prune.get("prunable_params", removed / target)
    # the report says unstructured points do not get faster on the CPU
    assert any("unstructured" in g for g in rep["guidance"])
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # a re-run takes everything from state.json
    code, stdout, err = run_cli("demo", "--quick", "-o", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["steps"]["executed"] == 0


@pytest.mark.slow
def test_api_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "api_example.py"
    spec = importlib.util.spec_from_file_location("api_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(str(tmp_path / "ex"))
    out = capsys.readouterr().out
    assert "dense:" in out and "structured-l1-2x-macs-macs0.5" in out
    assert (tmp_path / "ex" / "run" / "report.html").is_file()
