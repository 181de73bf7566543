"""report.json schema, Pareto front, plots, md/html rendering, ``onnxprune report`` and ``compare-runs``."""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError
from onnxprune.report.schema import SCHEMA_VERSION, pareto_front, stat, validate_report
from test_pipeline import TINY, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from onnxprune.pipeline.run import run_recipe

    d = tmp_path_factory.mktemp("rep")
    model = tiny_model(d / "m.onnx")
    (d / "tiny.yaml").write_text(TINY)
    run_recipe(d / "tiny.yaml", model, d / "run", overrides=["sweep.seeds=[0,1]", "sweep.methods.1.criterion=random"])
    return d / "run"


def test_pareto_front_known_points():
    # (latency, accuracy): minimize latency, maximize accuracy
    pts = [(10.0, 0.90), (5.0, 0.85), (6.0, 0.80), (2.0, 0.50), (5.0, 0.85), (1.0, None), (12.0, 0.90), (3.0, 0.40)]
    assert pareto_front(pts) == [3, 1, 4, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [0]


def test_pareto_front_gain_inside_the_noise_is_no_gain():
    # dense (index 0) at 2.0 ms; a sparse point 2% faster (timing noise) with the same accuracy; a
    # structured point 30% faster but less accurate; a point 2% faster and more accurate
    pts = [(2.0, 0.95), (2.0 / 1.02, 0.95), (2.0 / 1.3, 0.90), (2.0 / 1.02, 0.96)]
    assert pareto_front(pts[:3]) == [2, 1]  # without a reference, 2% is a gain over dense
    assert pareto_front(pts[:3], reference=0, rel_tol=0.03) == [2, 0]
    assert pareto_front(pts, reference=0, rel_tol=0.03) == [2, 3]  # more accurate: on the front


def test_stat():
    s = stat([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414213, rel=1e-5) and s["n"] == 2
    assert stat([0.9])["std"] == 0.0
    assert stat([None])["mean"] is None


def test_report_from_real_run_validates(run_dir):
    data = json.loads((run_dir / "report.json").read_text())
    rep = validate_report(data)
    assert rep.schema_version == SCHEMA_VERSION
    assert data["retraining"] is None  # epochs 0: stated as no retraining
    ids = [p["id"] for p in data["points"]]
    assert ids == ["l1-ratio0.5", "mag-sparsity0.6", "mag-c3"]
    for p in data["points"]:
        assert p["seeds"] == [0, 1] and len(p["models"]) == 2
        top1 = p["accuracy"]["test"]["top1"]
        assert top1["n"] == 2 and len(top1["values"]) == 2 and top1["std"] >= 0
        rec = p["profiles"]["ci-cpu"][0]
        assert rec["latency_ms"]["p50"] > 0 and rec["speedup_vs_dense"] > 0 and rec["provenance"] in ("real", "emulated")
        assert p["compression_ratio"] == pytest.approx(data["dense"]["params"] / p["nonzero_params"])
    # random criterion + 2 seeds: the seeds pruned different weights
    mag = data["points"][1]
    assert mag["runs"][0]["model"] != mag["runs"][1]["model"]
    assert data["pareto"]["ci-cpu"]
    assert any("do not get faster" in g or "will not make" in g for g in data["guidance"])
    assert data["versions"]["onnxruntime"]


def test_report_md_html_and_plots(run_dir):
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    data = json.loads((run_dir / "report.json").read_text())
    assert "| point | method |" in md and "l1-ratio0.5" in md and "Pareto front" in md
    for name, rel in data["plots"].items():
        assert (run_dir / rel).read_bytes().startswith(PNG)
        assert f"]({rel})" in md
    assert {"accuracy_vs_latency_ci-cpu", "accuracy_vs_compression", "accuracy_vs_macs", "per_layer"} <= set(data["plots"])
    assert html.count("data:image/png;base64,") == len(data["plots"])
    assert "<table>" in html and "src='plots/" not in html  # self-contained


def test_report_rerender(run_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    for f in ("report.md", "report.html"):
        (d / f).unlink()
    shutil.rmtree(d / "plots")
    code, out, err = run_cli("report", str(d), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert (d / "report.md").is_file() and (d / "report.html").is_file() and len(res["plots"]) >= 4
    assert all((d / p).read_bytes().startswith(PNG) for p in res["plots"].values())


def test_report_errors(tmp_path):
    code, _, err = run_cli("report", str(tmp_path / "nope"))
    assert code == 1 and "no such run directory" in err
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 1 and "no report.json" in err
    (tmp_path / "report.json").write_text("{")
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 1 and "not valid JSON" in err
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 99}))
    code, _, err = run_cli("report", str(tmp_path))
    assert code == 1 and "schema_version 99" in err


def test_validate_report_names_field(run_dir):
    data = json.loads((run_dir / "report.json").read_text())
    bad = copy.deepcopy(data)
    del bad["points"][0]["macs"]
    with pytest.raises(OnnxPruneError, match=r"points\.0\.macs"):
        validate_report(bad)


def test_compare_runs(run_dir, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(run_dir, other)
    data = json.loads((other / "report.json").read_text())
    data["points"][0]["accuracy"]["test"]["top1"]["mean"] += 0.05
    data["points"].pop()
    (other / "report.json").write_text(json.dumps(data))
    code, out, err = run_cli("compare-runs", str(run_dir), str(other), "--json")
    assert code == 0, err
    res = json.loads(out)
    rows = {r["id"]: r for r in res["rows"]}
    assert rows["l1-ratio0.5"]["delta"]["top1"] == pytest.approx(0.05)
    assert rows["mag-c3"]["b"] is None and "delta" not in rows["mag-c3"]
    assert res["same_retraining"] is True and res["profiles"] == ["ci-cpu"]
    code, out, err = run_cli("compare-runs", str(run_dir), str(other))
    assert code == 0 and "l1-ratio0.5" in out and "+5.00 pt" in out
    code, _, err = run_cli("compare-runs", str(run_dir), str(tmp_path / "missing"))
    assert code == 1 and "no such run directory" in err
