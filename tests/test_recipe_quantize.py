"""Recipe stage ``quantize:``: every final model (the dense control's too) gets a quantized twin,
evaluated and timed like its float model, reported beside it; the step is cached like every other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError
from onnxprune.recipes import load_recipe
from onnxprune.pipeline.cache import STATE_FILE
from test_pipeline import tiny_model

RECIPE = """
name: tinyq
sweep:
  methods:
    - {name: l1, kind: structured, criterion: l1, scope: global, points: [{ratio: 0.5}]}
  seeds: [0]
data: digits
hw: [ci-cpu]
evaluation: {splits: [val, test]}
profiling: {min_runs: 3, warmup_runs: 1, min_duration_s: 0.0, memory: false}
quantize: {enabled: true, samples: 128, check_samples: 64}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's digits CNN trained for a few epochs (seconds): quantization error shows on real weights."""
    pytest.importorskip("torch")
    from onnxprune.commands.demo_model import train_demo_model

    d = tmp_path_factory.mktemp("rq")
    train_demo_model(d / "m.onnx", epochs=3, width=8)
    (d / "r.yaml").write_text(RECIPE)
    return d, d / "m.onnx", d / "r.yaml"


@pytest.fixture(scope="module")
def first_run(trained):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = trained
    return run_recipe(recipe, model, d / "out")


def _steps(out: Path) -> list[str]:
    return [r["step"] for r in json.loads((out / STATE_FILE).read_text())["steps"].values()]


def test_each_point_has_its_quantized_twin_beside_it(trained, first_run):
    d, _, _ = trained
    out, rep = d / "out", first_run
    for p in (rep["dense"], rep["points"][0]):
        q = p["quantized"]
        assert q["id"] == f"{p['id']}-int8" and q["method"] == p["method"]
        assert q["models"] == [m.replace(".onnx", "-int8.onnx") for m in p["models"]]  # models/<run>-int8.onnx
        qfile = out / q["models"][0]
        assert qfile.is_file() and q["file_bytes"] == qfile.stat().st_size != p["file_bytes"]
        assert (q["params"], q["macs"]) == (p["params"], p["macs"])  # the same weights, in fewer bits
        info = q["quantization"]
        assert info["format"] == "qdq" and info["per_channel"] is True and info["float_point"] == p["id"]
        assert "ONNX Runtime CPU" in info["why"]  # format auto: chosen by the ci-cpu profile's backend
        assert info["calibration"] == {"method": "minmax", "samples": 128, "check_samples": 64, "held_out": True}
        assert info["fidelity"]["mean_rel_l2"]["mean"] < 0.2 and info["fidelity"]["held_out"] is True
        # quality on the same splits as the float model (a trained model: int8 stays close)
        for split in ("val", "test"):
            fa, qa = p["accuracy"][split]["top1"]["mean"], q["accuracy"][split]["top1"]["mean"]
            assert abs(fa - qa) <= 0.05 and (fa > 0.5 or p["id"] != "dense"), (p["id"], split, fa, qa)
        rec, frec = q["profiles"]["ci-cpu"][0], p["profiles"]["ci-cpu"][0]
        assert rec["latency_ms"]["p50"] > 0 and frec["latency_ms"]["p50"] > 0
        assert rec["speedup_timing"] == "interleaved" and rec["speedup_vs_dense"] > 0
        assert rec["speedup_vs_float_timing"] == "interleaved" and rec["speedup_vs_float_measured_on"]["host"]
        if p["id"] == "dense":  # the dense control's twin: its float model is the dense model
            assert rec["speedup_vs_float"] == rec["speedup_vs_dense"]
    assert sorted(_steps(out)).count("quantize") == 2 and _steps(out).count("speedup-vs-float") == 1


def test_a_twin_that_is_not_faster_says_so_wherever_it_is_shown(trained, first_run):
    d, _, _ = trained
    rep = first_run
    md, html = (d / "out" / "report.md").read_text(), (d / "out" / "report.html").read_text()
    assert "Float and quantized, side by side" in md and "Float and quantized, side by side" in html
    for p in (rep["dense"], rep["points"][0]):
        q = p["quantized"]
        v = q["profiles"]["ci-cpu"][0]["speedup_vs_float"]
        faster = v >= 1.03
        assert q["quantization"]["faster"] == {"ci-cpu": faster}
        said = [n for n in q["notes"] if n.startswith(f"not faster than its float model {p['id']} on ci-cpu")]
        assert bool(said) == (not faster) and all(f"{v:.2f}x" in n for n in said)
        assert any(f"{q['id']} {v:.2f}x" in g for g in rep["guidance"]) == (not faster)
        rows = [line for line in md.splitlines() if line.startswith(f"| {q['id']} | qdq | ci-cpu |")]
        assert len(rows) == 1 and ("| no: keep the float model" in rows[0]) == (not faster)
        assert f"| {p['id']} | float | ci-cpu |" in md and f"<td>{q['id']}</td>" in html
    for ids in rep["pareto"].values():
        assert set(ids) <= {"dense", "dense-int8", "l1-ratio0.5", "l1-ratio0.5-int8"}


def test_rerun_reuses_the_quantize_step_and_a_changed_setting_reruns_only_the_twins(trained, first_run):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = trained
    out = d / "out"
    twin = out / first_run["points"][0]["quantized"]["models"][0]
    mtime = twin.stat().st_mtime_ns
    again = run_recipe(recipe, model, out)
    assert again["steps"]["executed"] == 0 and again["steps"]["skipped"] == first_run["steps"]["executed"]
    assert twin.stat().st_mtime_ns == mtime and again["points"][0]["quantized"]["id"] == "l1-ratio0.5-int8"
    before = len(_steps(out))
    changed = run_recipe(recipe, model, out, overrides=["quantize.method=percentile"])
    # two twins: quantize, figures, evaluate, profile, speedup-vs-dense (+ speedup-vs-float for the pruned one)
    assert changed["steps"]["executed"] == 11 and len(_steps(out)) == before + 11
    assert changed["points"][0]["quantized"]["quantization"]["method"] == "percentile"
    assert changed["points"][0]["accuracy"] == first_run["points"][0]["accuracy"]  # the float rows are reused


@pytest.mark.parametrize("ratio", [0.9, 1.5])
def test_not_faster_verdict_follows_the_interleaved_timing(tmp_path, monkeypatch, ratio):
    """The rule alone, with the quantized-vs-float timing replaced: below 1.03x is not faster."""
    from onnxprune.pipeline import steps
    from onnxprune.pipeline.run import run_recipe

    real = steps.speedup_vs

    def speedup_vs(a, b, profile):
        res = real(a, b, profile)
        if Path(b).stem.endswith("-int8") and Path(a).name != "dense.onnx":  # quantized vs its float model
            return {**res, "1": ratio}
        return res

    monkeypatch.setattr(steps, "speedup_vs", speedup_vs)
    model = tiny_model(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    rep = run_recipe(recipe, model, tmp_path / "out", overrides=["evaluation.splits=[val]"])
    q = rep["points"][0]["quantized"]
    assert q["profiles"]["ci-cpu"][0]["speedup_vs_float"] == ratio
    assert q["quantization"]["faster"] == {"ci-cpu": ratio >= 1.03}
    assert any(n.startswith("not faster than its float model l1-ratio0.5 on ci-cpu (0.90x") for n in q["notes"]) == (ratio < 1)
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| l1-ratio0.5-int8 | qdq |"))
    assert row.endswith("| no: keep the float model unless size matters |" if ratio < 1 else "| yes |")


@pytest.mark.slow
def test_memory_of_both_rows(tmp_path):
    """profiling.memory: the peak RSS of the float and the quantized model, each in its own process."""
    from onnxprune.pipeline.run import run_recipe

    model = tiny_model(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("memory: false", "memory: true"))
    rep = run_recipe(recipe, model, tmp_path / "out", overrides=["evaluation.splits=[val]"])
    p = rep["points"][0]
    for point in (p, p["quantized"]):
        assert point["profiles"]["ci-cpu"][0]["peak_rss_bytes"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith(("| l1-ratio0.5 | float", "| l1-ratio0.5-int8 | qdq"))]
    assert len(rows) == 2 and all(r[7].endswith("MiB") for r in rows)  # the peak RSS column


def test_fp16_twin_needs_no_data_and_int8_without_data_is_refused(tmp_path):
    from onnxprune.pipeline.run import run_recipe

    model = tiny_model(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    rep = run_recipe(recipe, model, tmp_path / "fp16", overrides=["data=null", "quantize.format=fp16"])
    q = rep["dense"]["quantized"]
    assert q["id"] == "dense-fp16" and q["models"] == ["models/dense-fp16.onnx"] and q["accuracy"] == {}
    assert q["quantization"]["format"] == "fp16" and q["quantization"]["calibration"] is None
    assert (tmp_path / "fp16" / "models" / "l1-ratio0.5-s0-fp16.onnx").is_file()
    code, out, err = run_cli("run", recipe, model, "-o", tmp_path / "int8", "--set", "data=null")
    assert code != 0 and "int8 calibration (quantize.enabled)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "int8" / "models").exists()


def test_recipe_quantize_section():
    assert load_recipe("structured-l1-2x-macs").quantize.enabled is False
    r = load_recipe("structured-l1-2x-macs", ["quantize=true"])
    assert r.quantize.enabled is True and r.quantize.format == "auto" and r.quantize.samples == 256
    with pytest.raises(OnnxPruneError, match="quantize.format"):
        load_recipe("structured-l1-2x-macs", ["quantize.format=int4"])


@pytest.mark.slow
def test_ray_executor_builds_and_times_the_twins_like_the_local_run(trained, first_run):
    """The twins are part of each job's chain: built in the build task (the dense one on the driver),
    timed in the latency task, written back into OUTDIR; a re-run on Ray runs nothing."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'onnxprune[ray]'")
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = trained
    rep = run_recipe(recipe, model, d / "ray", executor="ray")
    assert rep["steps"]["executed"] == first_run["steps"]["executed"]
    for a, b in ((first_run["dense"], rep["dense"]), (first_run["points"][0], rep["points"][0])):
        qa, qb = a["quantized"], b["quantized"]
        assert qb["id"] == qa["id"] and (d / "ray" / qb["models"][0]).is_file()
        for split, acc in qa["accuracy"].items():  # one thread per Ray task: the last bits may differ, not a sample
            assert abs(acc["top1"]["mean"] - qb["accuracy"][split]["top1"]["mean"]) <= 1.0 / acc["samples"] + 1e-12
        rec = qb["profiles"]["ci-cpu"][0]
        assert rec["speedup_vs_float"] > 0 and rec["nodes"] and qb["quantization"]["faster"]["ci-cpu"] is not None
    assert run_recipe(recipe, model, d / "ray", executor="ray")["steps"]["executed"] == 0


def test_an_already_quantized_model_gets_no_twin_and_a_note(tmp_path):
    from dataclasses import replace

    from onnxprune.datasets import load_dataset
    from onnxprune.pipeline.run import run_recipe
    from onnxprune.quantization import quantize_model

    model = tmp_path / "q.onnx"
    quantize_model(tiny_model(tmp_path / "m.onnx"), model, replace(load_dataset("digits", seed=0), val=None, test=None),
                   samples=32, check_samples=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    rep = run_recipe(recipe, model, tmp_path / "out", overrides=[
        "sweep.methods=[{name: keep, kind: unstructured, points: [{compression: 1}]}]", "evaluation.splits=[val]"])
    assert rep["dense"].get("quantized") is None and rep["points"][0].get("quantized") is None
    assert "dense: not quantized again (quantize:): the model is already quantized (QDQ, int8)" in rep["notes"]
    assert not list((tmp_path / "out" / "models").glob("*-int8.onnx"))
