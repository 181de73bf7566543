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


# ---- channel multiples from the hardware profile ------------------------------------------------

def test_recipe_gzips_only_unstructured_points_and_their_dense_control(model_path, tmp_path):
    """`onnxprune run`: structured points get gzip_bytes null (and the report, run table and
    compare-runs show n/a); unstructured/N:M points and the dense control keep a size."""
    from onnxprune.pipeline.run import run_recipe
    from onnxprune.report.schema import validate_report

    mixed = ("sweep.methods=[{name: l1, kind: structured, points: [{ratio: 0.5}]},"
             " {name: mag, kind: unstructured, points: [{sparsity: 0.8}]}, {name: nm, kind: nm}]")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [{kind: structured, target: {ratio: 0.5}}]\n")
    rep = run_recipe(recipe, model_path, tmp_path / "mixed", overrides=[mixed])
    validate_report(rep)
    pts = {p["method"]: p for p in rep["points"]}
    assert pts["l1"]["gzip_bytes"] is None and pts["l1"]["runs"][0]["figures"]["gzip_bytes"] is None
    assert 0 < pts["mag"]["gzip_bytes"] < rep["dense"]["gzip_bytes"] == rep["model"]["gzip_bytes"]
    assert 0 < pts["nm"]["gzip_bytes"] < rep["dense"]["gzip_bytes"]
    md = (tmp_path / "mixed" / "report.md").read_text()
    assert "n/a" in next(line for line in md.splitlines() if line.startswith("| l1"))
    code, out, err = run_cli("compare-runs", str(tmp_path / "mixed"), str(tmp_path / "mixed"), "--json")
    assert code == 0, err
    rows = {r["id"]: r for r in json.loads(out)["rows"]}
    assert rows["l1-ratio0.5"]["a"]["gzip_bytes"] is None
    # structured only: nothing to compare a gzip size with, the dense control skips it too
    rep = run_recipe(recipe, model_path, tmp_path / "structured")
    validate_report(rep)
    assert rep["dense"]["gzip_bytes"] is None and rep["points"][0]["gzip_bytes"] is None


def test_shipped_profiles_have_channel_multiples():
    from onnxprune.profiling.hw_profile import load_hw_profile, shipped_profiles

    for name in shipped_profiles():
        prof = load_hw_profile(name)
        if prof.backend == "ort-cpu":
            assert prof.channel_multiple == 8, name
        elif prof.backend == "tensorrt" and prof.precision == "fp16":
            assert prof.channel_multiple in (16, 32), name


def test_channel_multiple_is_validated(tmp_path):
    from onnxprune.core.errors import OnnxPruneError
    from onnxprune.profiling.hw_profile import load_hw_profile

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbackend: ort-cpu\nchannel_multiple: 0\n")
    with pytest.raises(OnnxPruneError, match="channel_multiple"):
        load_hw_profile(bad)


def _kept(summary):
    return [g["kept"] for g in summary["groups"]]


def test_prune_hw_profile_sets_round_to_and_explicit_round_to_wins(model_path, tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("name: quad\nbackend: ort-cpu\nchannel_multiple: 4\n")
    s = _prune(model_path, "-o", tmp_path / "a.onnx", "--structured", "--ratio", "0.3", "--hw", prof)
    assert s["limits"]["round_to"] == 4
    assert all(k % 4 == 0 or k == t for k, t in zip(_kept(s), [g["total"] for g in s["groups"]]))
    assert any("channel_multiple of hardware profile quad" in n for n in s["notes"])
    plain = _prune(model_path, "-o", tmp_path / "b.onnx", "--structured", "--ratio", "0.3")
    assert plain["limits"]["round_to"] == 1 and _kept(plain) != _kept(s)
    s = _prune(model_path, "-o", tmp_path / "c.onnx", "--structured", "--ratio", "0.3", "--hw", prof, "--round-to", "1")
    assert s["limits"]["round_to"] == 1 and _kept(s) == _kept(plain)
    s = _prune(model_path, "-o", tmp_path / "d.onnx", "--structured", "--ratio", "0.3", "--hw", "ort-cpu")
    assert s["limits"]["round_to"] == 1  # a backend name is not a profile: no multiple


def test_recipe_stage_naming_a_profile_rounds_to_its_multiple():
    from onnxprune.pipeline.steps import stage_options
    from onnxprune.recipes.schema import Stage

    assert stage_options(Stage(kind="structured", hw="ci-cpu", target={"ratio": 0.5}))["round_to"] == 8
    assert stage_options(Stage(kind="structured", hw="ci-cpu", options={"round_to": 2}))["round_to"] == 2
    lat = Stage(kind="structured", target={"latency": {"profile": "nvidia-tensorrt-fp16", "budget_ms": 1}})
    assert stage_options(lat)["round_to"] == 32
    assert "round_to" not in stage_options(Stage(kind="structured", target={"ratio": 0.5}))
    assert "round_to" not in stage_options(Stage(kind="unstructured", hw="ci-cpu", target={"sparsity": 0.5}))


# ---- honest report latency -------------------------------------------------------------------------

def _pt(pid, p50, acc, speedup=None, timing="interleaved"):
    rec = {"batch_size": 1, "latency_ms": {"p50": p50}, "speedup_vs_dense": speedup, "speedup_timing": timing}
    return {"id": pid, "method": pid.split("-")[0], "profiles": {"cpu": [rec]},
            "accuracy": {"test": {"top1": {"mean": acc, "std": 0.0}}}}


def test_pareto_and_latency_plot_use_the_interleaved_speedup():
    from onnxprune.report.plots import latency_pareto, point_latency

    # the sparse point's own profile happens to read faster than dense (0.024 vs 0.031 ms, separate runs),
    # but interleaved with dense it is 1.00x: it must not be the fastest point of the front
    report = {"dense": _pt("dense", 0.031, 0.95, 1.0),
              "points": [_pt("unstructured-0.8", 0.024, 0.94, 1.0), _pt("structured-0.5", 0.020, 0.90, 1.6),
                         _pt("structured-sep", 0.001, 0.99, 50.0, timing="separate")],
              "dense_finetuned": None}
    assert point_latency(report, report["dense"], "cpu") == 0.031
    assert point_latency(report, report["points"][0], "cpu") == pytest.approx(0.031)
    assert point_latency(report, report["points"][1], "cpu") == pytest.approx(0.031 / 1.6)
    assert point_latency(report, report["points"][2], "cpu") is None  # separate profiles: not ranked
    assert latency_pareto(report, "cpu") == ["structured-0.5", "dense"]


def test_per_node_summary_keeps_each_kernels_fastest_run():
    from onnx import TensorProto, helper

    from onnxprune.profiling.pernode import summarize

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="A"), helper.make_node("Relu", ["y"], ["z"], name="B")],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    kernels = [{"node": "A", "op_type": "Relu", "provider": "cpu", "us": us} for us in (100.0, 900.0)]
    kernels += [{"node": "B", "op_type": "Relu", "provider": "cpu", "us": us} for us in (50.0, 30.0)]
    s = summarize(kernels, 2, helper.make_model(g), top=1)  # a pre-empted run of A: 900 us
    assert s["kernel_ms_per_run"] == pytest.approx(0.54) and s["kernel_ms_min"] == pytest.approx(0.13)
    assert s["top_nodes"][0]["ms_per_run"] == pytest.approx(0.5) and s["top_nodes"][0]["ms_min"] == pytest.approx(0.1)
