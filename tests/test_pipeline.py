"""Sweep expansion, the content-hashed step cache, resume, targets, sensitivity and CLI errors of ``run``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError
from onnxprune.pipeline.cache import StepCache
from onnxprune.pipeline.latency_target import bisect_ratio
from onnxprune.pipeline.sensitivity import derive_ratios
from onnxprune.pipeline.sweep import expand
from onnxprune.recipes import load_recipe

TINY = """
name: tiny
sweep:
  methods:
    - {name: l1, kind: structured, criterion: l1, scope: global, points: [{ratio: 0.5}]}
    - {name: mag, kind: unstructured, criterion: magnitude, points: [{sparsity: 0.6}, {compression: 3}]}
  seeds: [0]
data: digits
hw: [ci-cpu]
evaluation: {splits: [val, test]}
profiling: {min_runs: 3, warmup_runs: 1, min_duration_s: 0.0, memory: false}
"""


def tiny_model(path: Path, width: int = 4) -> Path:
    import torch

    from onnxprune.commands.demo_model import build_digits_cnn
    from onnxprune.bridge.torch_export import export_torch

    torch.manual_seed(0)
    module = build_digits_cnn(width=width)
    with torch.no_grad():  # untrained BN tensors are all 0 / 1 and the exporter would merge equal ones
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    export_torch(module, [torch.zeros(1, 1, 8, 8)], path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model(d / "m.onnx")
    recipe = d / "tiny.yaml"
    recipe.write_text(TINY)
    return d, model, recipe


# ------------------------------------------------------------------------------------------------ sweep

def test_sweep_expansion_methods_points_seeds():
    r = load_recipe("shrinkbench-sweep", ["sweep.seeds=[0,1]"])
    plan = expand(r)
    assert len(plan.runs) == 6 * 3 * 2
    assert len(plan.point_ids) == 18
    assert [s.seed for s in plan.runs_of("random-c4")] == [0, 1]
    # a stage without its own target takes the point's target
    run = plan.runs_of("global-magnitude-c8")[0]
    assert run.stages[0].target.compression == 8 and run.id == "global-magnitude-c8-s0"


def test_sweep_rejects_repeated_points(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("sweep:\n  points: [{ratio: 0.5}, {ratio: 0.5}]\n  methods: [{name: a, kind: structured}]\n")
    with pytest.raises(OnnxPruneError, match="repeat"):
        expand(load_recipe(p))


# ------------------------------------------------------------------------------------------------ cache

def test_step_cache_skips_finished_and_reruns_changed(tmp_path):
    calls = []
    src = tmp_path / "in.bin"
    src.write_bytes(b"abc")

    def make(name, payload):
        def fn():
            calls.append(name)
            (tmp_path / f"{name}.out").write_text(payload)
            return {"name": name, "payload": payload}
        return fn

    c = StepCache.open(tmp_path)
    assert c.run("s", {"k": 1}, make("a", "x"), inputs=[src], outputs=[tmp_path / "a.out"]) == {"name": "a", "payload": "x"}
    c.run("s", {"k": 2}, make("b", "y"), inputs=[src], outputs=[tmp_path / "b.out"])
    assert calls == ["a", "b"]
    # a new process: same steps are answered from state.json
    c2 = StepCache.open(tmp_path)
    assert c2.run("s", {"k": 1}, make("a", "x"), inputs=[src], outputs=[tmp_path / "a.out"])["name"] == "a"
    assert c2.run("s", {"k": 2}, make("b", "y"), inputs=[src], outputs=[tmp_path / "b.out"])["name"] == "b"
    assert calls == ["a", "b"] and c2.counts() == {"executed": 0, "skipped": 2}
    # config changed -> that step only
    c2.run("s", {"k": 3}, make("a", "z"), inputs=[src], outputs=[tmp_path / "a.out"])
    assert calls == ["a", "b", "a"]
    # input bytes changed -> re-run
    src.write_bytes(b"abcd")
    c2.run("s", {"k": 2}, make("b", "y"), inputs=[src], outputs=[tmp_path / "b.out"])
    assert calls == ["a", "b", "a", "b"]
    # an output file changed behind its back -> re-run
    (tmp_path / "b.out").write_text("tampered")
    StepCache.open(tmp_path).run("s", {"k": 2}, make("b", "y"), inputs=[src], outputs=[tmp_path / "b.out"])
    assert calls[-1] == "b" and len(calls) == 5
    # a damaged state file costs only re-running
    (tmp_path / "state.json").write_text("{not json")
    StepCache.open(tmp_path).run("s", {"k": 2}, make("b", "y"), inputs=[src], outputs=[tmp_path / "b.out"])
    assert len(calls) == 6


def test_step_cache_crash_records_nothing(tmp_path):
    c = StepCache.open(tmp_path)

    def boom():
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        c.run("s", {}, boom)
    assert StepCache.open(tmp_path).state["steps"] == {}


# ------------------------------------------------------------------------------------- pipeline, resumed

def test_run_resume_and_partial_rerun(tiny, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = tiny
    out = tmp_path / "run"
    rep = run_recipe(recipe, model, out)
    first = rep["steps"]["executed"]
    assert first > 0 and rep["steps"]["skipped"] == 0
    ids = [p["id"] for p in rep["points"]]
    assert ids == ["l1-ratio0.5", "mag-sparsity0.6", "mag-c3"]
    for p in rep["points"]:
        assert (out / p["models"][0]).is_file()
    assert (out / "models" / "dense.onnx").is_file()
    # nothing changed: every step is taken from state.json
    rep2 = run_recipe(recipe, model, out)
    assert rep2["steps"]["executed"] == 0 and rep2["steps"]["skipped"] == first
    # one point changed: only its prune/figures/evaluate/profile/speedup-vs-dense steps run
    rep3 = run_recipe(recipe, model, out, overrides=["sweep.methods.0.points.0.ratio=0.25"])
    assert rep3["steps"]["executed"] == 5
    assert [p["id"] for p in rep3["points"]][0] == "l1-ratio0.25"
    # numbers: structured removes MACs, unstructured removes nonzeros, not MACs
    dense = rep["dense"]
    l1, mag, c3 = rep["points"]
    assert l1["macs"] < dense["macs"] and l1["params"] < dense["params"]
    assert mag["macs"] == dense["macs"] and mag["nonzero_params"] < dense["nonzero_params"]
    assert math.isclose(c3["compression_ratio"], 3.0, rel_tol=0.02)
    # every point's speedup comes from timing it interleaved with the dense model
    assert all(p["profiles"]["ci-cpu"][0]["speedup_timing"] == "interleaved" for p in rep["points"])
    assert dense["profiles"]["ci-cpu"][0]["speedup_vs_dense"] == 1.0
    summary = mag["runs"][0]["prune"]
    assert math.isclose(summary["achieved_sparsity"], 0.6, abs_tol=1e-3)


def test_run_without_data_measures_but_does_not_score(tiny, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = tiny
    rep = run_recipe(recipe, model, tmp_path / "nodata", overrides=["data=null", "sweep.methods=[{name: l1, kind: structured, points: [{ratio: 0.5}]}]"])
    assert rep["dense"]["accuracy"] == {} and rep["data"] is None
    assert any("no data" in n for n in rep["notes"])


def test_sensitivity_and_per_layer_stage(tiny, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, _ = tiny
    recipe = tmp_path / "sens.yaml"
    recipe.write_text("""
sensitivity: {enabled: true, kind: structured, ratios: [0.25, 0.5], max_layers: 2, max_drop: 1.0}
stages: [{kind: structured, criterion: l1, per_layer: sensitivity}]
data: digits
hw: [ci-cpu]
profiling: {min_runs: 2, warmup_runs: 0, min_duration_s: 0.0, memory: false}
""")
    rep = run_recipe(recipe, model, tmp_path / "s")
    sens = rep["sensitivity"]
    assert len(sens["rows"]) == 4 and sens["csv"] == "sensitivity.csv"
    assert (tmp_path / "s" / "sensitivity.csv").read_text().startswith("group,name,channels,ratio,kept,top1,drop")
    # max_drop 1.0 allows every ratio: the two analysed groups get the largest
    assert sorted(sens["per_layer_ratios"].values()) == [0.5, 0.5]
    point = rep["points"][0]
    assert point["macs"] < rep["dense"]["macs"]
    assert "sensitivity" in rep["plots"]


def test_derive_ratios():
    rows = [{"group": "g1", "ratio": r, "drop": d} for r, d in ((0.1, 0.0), (0.3, 0.005), (0.5, 0.02), (0.7, 0.001))]
    rows += [{"group": "g2", "ratio": 0.1, "drop": 0.5}]
    assert derive_ratios(rows, 0.01) == {"g1": 0.3, "g2": 0.0}


def test_bisect_ratio_finds_smallest_ratio_within_budget():
    lat = lambda r: 10.0 * (1 - r)  # noqa: E731 - 10 ms dense, linear in the ratio
    ratio, probes = bisect_ratio(lat, budget=6.0, max_ratio=0.9, tolerance=0.01)
    assert 0.4 <= ratio <= 0.41 and lat(ratio) <= 6.0
    assert probes[0]["ratio"] == 0.0 and len(probes) < 12
    assert bisect_ratio(lat, budget=20.0, max_ratio=0.9, tolerance=0.01)[0] == 0.0
    with pytest.raises(OnnxPruneError, match="out of reach"):
        bisect_ratio(lat, budget=0.5, max_ratio=0.9, tolerance=0.01)


def test_latency_target_end_to_end(tiny, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = tiny
    over = ["sweep.methods=[{name: lat, kind: structured, points: [{latency: {profile: ci-cpu, budget_ms: 1000.0}}]}]",
            "data=null"]
    rep = run_recipe(recipe, model, tmp_path / "lat", overrides=over)
    search = rep["points"][0]["runs"][0]["prune"]["latency_search"]
    assert search["ratio"] == 0.0 and search["budget_ms"] == 1000.0  # a generous budget: the dense model meets it
    with pytest.raises(OnnxPruneError, match="does not measure on"):
        run_recipe(recipe, model, tmp_path / "lat2",
                   overrides=["sweep.methods=[{name: lat, kind: structured, points: [{latency: {profile: x86-server-cpu, budget_ms: 1.0}}]}]"])


# ---------------------------------------------------------------------------------------------- CLI errors

def test_cli_run_errors(tiny, tmp_path):
    d, model, recipe = tiny
    code, out, err = run_cli("run", "no-such-recipe", str(model), "-o", str(tmp_path / "o"))
    assert code == 1 and "not a shipped recipe" in err and "Traceback" not in err
    code, out, err = run_cli("run", str(recipe), str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"))
    assert code == 1 and "no such model file" in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, out, err = run_cli("run", str(recipe), str(bad), "-o", str(tmp_path / "o"))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run_cli("run", str(recipe), str(model), "-o", str(tmp_path / "o"), "--set", "retrain.epoch=1")
    assert code == 1 and "unknown key 'retrain.epoch'" in err
    code, out, err = run_cli("run", str(recipe), str(model), "-o", str(tmp_path / "o"), "--hw", "no-such-profile")
    assert code == 1 and "no-such-profile" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_nm_tensorrt_recipe_fails_clearly_without_gpu(tiny, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    d, model, _ = tiny
    code, out, err = run_cli("run", "nm-2-4-tensorrt", str(model), "-o", str(tmp_path / "o"), "--data", "digits")
    assert code == 3 and "--hw" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # overriding the profile runs it (no retraining to keep the test fast)
    code, out, err = run_cli("run", "nm-2-4-tensorrt", str(model), "-o", str(tmp_path / "o"), "--data", "digits",
                             "--hw", "ci-cpu", "--set", "retrain.epochs=0", "--set", "profiling.memory=false",
                             "--set", "profiling.min_runs=2", "--set", "profiling.min_duration_s=0", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["points"][0]["kind"] == "nm"
    assert any("2:4" in g for g in rep["guidance"])


def test_gradual_schedule_dense_finetune_and_fair_budget(tiny, tmp_path):
    from onnxprune.pipeline.run import run_recipe

    d, model, recipe = tiny
    over = ["sweep.methods=[{name: agp, kind: structured, schedule: {kind: agp, steps: 2}, points: [{macs: 0.5}]},"
            " {name: oneshot, kind: structured, points: [{macs: 0.5}]}]",
            "retrain.epochs=2", "retrain.finetune_dense=true", "retrain.distillation=true", "evaluation.splits=[val]"]
    rep = run_recipe(recipe, model, tmp_path / "g", overrides=over)
    agp, one = rep["points"]
    steps = agp["runs"][0]["train"]["per_step"]
    assert [s["step"] for s in steps] == [1, 2] and steps[-1]["target"] == pytest.approx(0.5)
    assert agp["macs"] < rep["dense"]["macs"] and one["runs"][0]["train"]["best_epoch"] in (0, 1, 2)
    assert rep["dense_finetuned"]["id"] == "dense-finetuned" and rep["dense_finetuned"]["models"][0].endswith("-s0.onnx")
    rt = rep["retraining"]
    assert rt["config"]["epochs"] == 2 and rt["distillation"] and "agp 2 steps x 1 epoch(s)" in rt["schedule_split"]
    assert "test" not in agp["accuracy"]  # only the splits asked for are evaluated


def test_python_api_is_exposed_on_the_package(tiny):
    import onnxprune
    from onnxprune import api

    for name in ("inspect", "analyze", "prune", "finetune", "evaluate", "profile", "compare", "run", "compare_runs", "demo"):
        assert getattr(onnxprune, name) is getattr(api, name)
    d, model, _ = tiny
    summary = onnxprune.prune(model, d / "p.onnx", method="unstructured", sparsity=0.5)
    assert summary["output"] == str(d / "p.onnx") and onnxprune.inspect(d / "p.onnx")["sparsity"] > 0.3
    with pytest.raises(OnnxPruneError, match="method must be"):
        onnxprune.prune(model, method="pruned")


def test_speedup_falls_back_to_separate_profiles_only_without_interleaved_timing():
    from onnxprune.pipeline.aggregate import _profiles, set_speedups

    def measured(p50, speedups=None):
        rec = {"batch_size": 1, "backend": "ort-cpu", "provenance": "real", "latency_ms": {"p50": p50}}
        return {"profiles": {"cpu": {"results": [rec]}}, "speedups": speedups or {}}

    dense = {"profiles": _profiles([measured(2.0)])}
    both = {"profiles": _profiles([measured(1.0, {"cpu": {"1": 1.2}}), measured(1.0, {"cpu": {"1": 1.4}})])}
    one_seed_missing = {"profiles": _profiles([measured(1.0, {"cpu": {"1": 1.5}}), measured(0.5)])}
    set_speedups([both, one_seed_missing], dense)
    rec = both["profiles"]["cpu"][0]
    assert rec["speedup_timing"] == "interleaved"
    assert rec["speedup_vs_dense"] == pytest.approx(1.3)  # mean over seeds, not the separate 2.0 / 1.0
    rec = one_seed_missing["profiles"]["cpu"][0]
    assert (rec["speedup_vs_dense"], rec["speedup_timing"]) == (2.0 / 0.75, "separate")
