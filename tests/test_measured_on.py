"""Every measurement says where and how it was taken (``measured_on``), and no cache replays a figure
measured on another machine: the run cache's measuring steps and the latency tables key on the
machine fingerprint. The latency-table cache lives in the platform cache dir, size-bounded, and
``onnxprune cache info|clear`` show and empty it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli
from onnxprune.pipeline.cache import CacheMiss, StepCache
from onnxprune.profiling import compare_models, profile_model, provenance
from onnxprune.profiling.hw_profile import load_hw_profile, profile_from_dict
from onnxprune.report.schema import MeasuredOn

FAST = {"name": "fast", "backend": "ort-cpu", "threads": {"intra_op": 1}, "warmup_runs": 1, "min_runs": 3,
        "min_duration_s": 0.0}
RECORD = {"host", "cpu_model", "cores", "gpu", "gpu_driver", "onnxruntime", "tensorrt", "backend", "threads",
          "co_tenancy", "co_tenancy_basis", "fingerprint", "at"}


def conv_model(path: Path, c: int = 8) -> Path:
    """x[1,3,8,8] -> Conv(3->c) -> Relu -> Conv(c->c): one prunable channel group."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return conv_model(tmp_path_factory.mktemp("mo") / "m.onnx")


def pretend(monkeypatch, host: str) -> dict:
    """Make this process look like another machine (another host name): its fingerprint changes."""
    facts = {**provenance.machine_facts(), "host": host}
    monkeypatch.setattr(provenance, "machine_facts", lambda: facts)
    return facts


# ---- the record ---------------------------------------------------------------------------------
def test_profile_record_says_where_and_how(model):
    rec = profile_model(model, [profile_from_dict(FAST)], memory=False)["results"][0]
    on = rec["measured_on"]
    assert RECORD <= set(on)
    MeasuredOn.model_validate(on)
    facts = provenance.machine_facts()
    assert on["host"] == facts["host"] and on["cpu_model"] == facts["cpu_model"]
    assert on["cores"]["usable"] >= 1 and on["onnxruntime"] == facts["onnxruntime"]
    assert on["fingerprint"] == provenance.machine_fingerprint()
    assert on["threads"]["intra_op"] == 1 and "session options" in on["threads"]["source"]
    assert on["co_tenancy"] in ("exclusive", "shared")
    basis = on["co_tenancy_basis"]
    assert basis["method"] == "cpu-time" and basis["window_s"] >= provenance.MIN_WINDOW_S
    assert basis["others_cores"] >= 0 and basis["reason"]


def test_threads_are_read_from_the_runtime(model):
    default = profile_model(model, [profile_from_dict({**FAST, "threads": {"intra_op": 0}})], memory=False)
    thr = default["results"][0]["measured_on"]["threads"]
    assert thr["intra_op"] == provenance.machine_facts()["default_threads"] and "profile's 0" in thr["source"]
    two = profile_model(model, [profile_from_dict({**FAST, "threads": {"intra_op": 2}})], memory=False)
    assert two["results"][0]["measured_on"]["threads"]["intra_op"] == 2


def test_torch_threads_are_read_from_torch(model):
    pytest.importorskip("torch", reason="the torch backends need torch: pip install 'onnxprune[train]'")
    prof = profile_from_dict({**FAST, "name": "t", "backend": "torch-cpu", "threads": {"intra_op": 2}})
    on = profile_model(model, [prof], memory=False)["results"][0]["measured_on"]
    assert on["threads"]["intra_op"] == 2 and "torch" in on["threads"]["source"] and on["torch"]


def test_compare_says_where_each_interleaved_timing_ran(model):
    res = compare_models(model, model, profile_from_dict({**FAST, "batch_sizes": [1]}))
    assert RECORD <= set(res["measured_on"])
    assert all(RECORD <= set(c["measured_on"]) for c in res["comparisons"])


def test_cli_json_and_text_carry_measured_on(model):
    code, out, err = run_cli("profile", model, "--hw", "ci-cpu", "--no-memory", "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["measured_on"]["host"] == provenance.machine_facts()["host"]
    code, out, err = run_cli("profile", model, "--hw", "ci-cpu", "--no-memory")
    assert code == 0, err
    assert "measured on " + provenance.machine_facts()["host"] in " ".join(out.split())


def test_a_busy_neighbour_makes_the_timing_shared():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it get going
        with provenance.observe() as seen:
            time.sleep(0.4)  # this process idles; the neighbour burns a core
        verdict = seen.judge()
    finally:
        burner.kill()
        burner.wait()
    assert verdict["co_tenancy"] == "shared", verdict
    basis = verdict["co_tenancy_basis"]
    assert basis["others_cores"] >= provenance.SHARED_CORES
    # named among the busiest others (unless five processes of a loaded machine outran it)
    assert any(p["pid"] == burner.pid for p in basis["busy_processes"]) or len(basis["busy_processes"]) == 5


@pytest.mark.parametrize("others, verdict", [(0.0, "exclusive"), (0.2, "exclusive"), (0.25, "shared"), (1.5, "shared")])
def test_co_tenancy_rule(others, verdict):
    obs = provenance.Observation(window_s=1.0, others_cores=others, load_before=0.1, load_after=0.2)
    got = obs.judge()
    assert got["co_tenancy"] == verdict and got["co_tenancy_basis"]["threshold_cores"] == provenance.SHARED_CORES


def test_merged_record_is_shared_if_any_timing_was():
    a = {"host": "h", "fingerprint": "f", "co_tenancy": "exclusive", "co_tenancy_basis": {"reason": "quiet"}}
    b = {"host": "h2", "fingerprint": "g", "co_tenancy": "shared", "co_tenancy_basis": {"reason": "busy"}}
    m = provenance.merge_measured_on([a, b])
    assert m["co_tenancy"] == "shared" and "1 of 2" in m["co_tenancy_basis"]["reason"]
    assert m["hosts"] == ["h", "h2"] and m["fingerprints"] == ["f", "g"]
    assert provenance.merge_measured_on([None]) is None


def test_fingerprint_names_the_machine(monkeypatch):
    here = provenance.machine_fingerprint()
    real = provenance.machine_facts()
    for key, value in (("host", "x"), ("cpu_model", "y"), ("gpu", "H100"), ("gpu_driver", "555.1"),
                       ("onnxruntime", "0.1"), ("tensorrt", "10.0"), ("default_threads", 99),
                       ("cores", {**real["cores"], "usable": 99})):
        monkeypatch.setattr(provenance, "machine_facts", lambda k=key, v=value: {**real, k: v})
        assert provenance.machine_fingerprint() != here, key
    remote = load_hw_profile("ci-cpu").model_copy(update={"remote": "pi@board"})
    monkeypatch.setattr(provenance, "machine_facts", lambda: real)
    on_board = provenance.machine_fingerprint(remote)
    monkeypatch.setattr(provenance, "machine_facts", lambda: {**real, "host": "laptop"})
    assert provenance.machine_fingerprint(remote) == on_board  # the device measures, wherever the run is


# ---- the run cache ------------------------------------------------------------------------------
def _measuring_step(cache: StepCache, model: Path, calls: list):
    prof = profile_from_dict(FAST)

    def fn():
        calls.append(1)
        return profile_model(model, [prof], memory=False)
    return cache.run("profile", {"profile": prof.model_dump()}, fn, inputs=[model], measures=prof)


def test_step_cache_same_machine_hits_other_machine_remeasures(model, tmp_path, monkeypatch):
    calls: list = []
    first = _measuring_step(StepCache.open(tmp_path), model, calls)
    again = StepCache.open(tmp_path)
    assert _measuring_step(again, model, calls) == first and len(calls) == 1 and again.skipped == ["profile"]
    real_host = provenance.machine_facts()["host"]
    pretend(monkeypatch, "elsewhere")
    moved = StepCache.open(tmp_path)
    res = _measuring_step(moved, model, calls)
    assert len(calls) == 2 and moved.executed == ["profile"]  # measured again, not replayed
    assert res["results"][0]["measured_on"]["host"] == "elsewhere"
    assert moved.remeasured and real_host in moved.remeasured[0]
    # a step that measures nothing is still reused across machines
    plain = []
    StepCache.open(tmp_path).run("figures", {}, lambda: plain.append(1) or {"n": 1}, inputs=[model])
    monkeypatch.undo()
    StepCache.open(tmp_path).run("figures", {}, lambda: plain.append(1) or {"n": 1}, inputs=[model])
    assert plain == [1]


def test_workers_measurements_are_accepted_by_the_driver(model, tmp_path, monkeypatch):
    """An executor's worker on another machine measures; the driver merges its records and replays
    them (the Ray path, without Ray)."""
    calls: list = []
    real = provenance.machine_facts()
    pretend(monkeypatch, "worker")
    worker = StepCache(outdir=tmp_path / "task", state={"version": 1, "steps": {}})
    _measuring_step(worker, model, calls)
    monkeypatch.setattr(provenance, "machine_facts", lambda: real)
    driver = StepCache.open(tmp_path / "out")
    with driver.replay():
        with pytest.raises(CacheMiss):
            _measuring_step(driver, model, calls)
    driver.merge(worker.state["steps"], {})
    with driver.replay():
        res = _measuring_step(driver, model, calls)
    assert res["results"][0]["measured_on"]["host"] == "worker" and len(calls) == 1


def test_run_remeasures_on_another_machine(model, tmp_path, monkeypatch):
    from onnxprune.pipeline.run import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsweep:\n  methods:\n    - {name: l1, kind: structured, criterion: l1, points: [{ratio: 0.5}]}\n"
                      "  seeds: [0]\nhw: [ci-cpu]\nprofiling: {min_runs: 3, warmup_runs: 1, min_duration_s: 0.0, memory: false}\n")
    out = tmp_path / "run"
    rep = run_recipe(recipe, model, out)
    point = rep["points"][0]["profiles"]["ci-cpu"][0]
    assert point["measured_on"]["host"] == provenance.machine_facts()["host"]
    assert point["speedup_timing"] == "interleaved" and point["speedup_measured_on"]["fingerprint"]
    md = (out / "report.md").read_text()
    assert "Measured on " + provenance.machine_facts()["host"] in md
    assert "Measured on " in (out / "report.html").read_text()
    assert run_recipe(recipe, model, out)["steps"]["executed"] == 0  # same machine: all reused
    (tmp_path / "before").mkdir()
    (tmp_path / "before" / "report.json").write_text((out / "report.json").read_text())
    real_host = provenance.machine_facts()["host"]
    pretend(monkeypatch, "elsewhere")
    moved = run_recipe(recipe, model, out)
    # only the measuring steps run again: profile (dense, point) and the interleaved speedup
    assert moved["steps"]["executed"] == 3, moved["steps"]
    assert moved["points"][0]["profiles"]["ci-cpu"][0]["measured_on"]["host"] == "elsewhere"
    assert any(real_host in n and "measured again" in n for n in moved["notes"])
    from onnxprune.report.compare import compare_runs

    assert any("different machines" in n and "elsewhere" in n for n in compare_runs(tmp_path / "before", out)["notes"])
    assert not any("different machines" in n for n in compare_runs(out, out)["notes"])


# ---- latency tables -----------------------------------------------------------------------------
def _table(model: Path, cache: Path | None = None):
    from onnxprune.channels.analyze import analyze_channels
    from onnxprune.core.prepare import prepare
    from onnxprune.structured import latency_table as lt

    prep = prepare(model)
    analysis = analyze_channels(prep.view)
    ids = [g.id for g in analysis.prunable]
    return lt.latency_table(prep.view, analysis, ids, load_hw_profile("ci-cpu"), model,
                            input_shapes=prep.concrete_shapes, cache=cache)


def test_latency_table_cache_is_per_machine(model, tmp_path, monkeypatch):
    from onnxprune.structured import latency_table as lt

    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "c"))
    first = _table(model)
    assert not first.cached and first.measured_on["host"] == provenance.machine_facts()["host"]
    assert first.measured_on["threads"]["intra_op"] == 1  # from the per-node sessions the kernel times come from
    assert Path(first.path).parent == tmp_path / "c" / "latency"
    assert json.loads(Path(first.path).read_text())["measured_on"]["fingerprint"] == provenance.machine_fingerprint()
    measured = []
    real_chunk = lt._measure_chunk
    monkeypatch.setattr(lt, "_measure_chunk", lambda *a, **k: measured.append(1) or real_chunk(*a, **k))
    again = _table(model)
    assert again.cached and not measured  # same machine: read from the cache
    pretend(monkeypatch, "elsewhere")
    moved = _table(model)
    assert not moved.cached and measured and moved.measured_on["host"] == "elsewhere"
    assert moved.path != first.path


def test_a_table_copied_from_another_machine_is_not_reused(model, tmp_path, monkeypatch):
    from onnxprune.structured import latency_table as lt

    first = _table(model, tmp_path)
    data = json.loads(Path(first.path).read_text())
    data["measured_on"]["fingerprint"] = "someone-else"
    Path(first.path).write_text(json.dumps(data))
    measured = []
    real_chunk = lt._measure_chunk
    monkeypatch.setattr(lt, "_measure_chunk", lambda *a, **k: measured.append(1) or real_chunk(*a, **k))
    again = _table(model, tmp_path)
    assert not again.cached and measured
    assert json.loads(Path(first.path).read_text())["measured_on"]["fingerprint"] == provenance.machine_fingerprint()


def test_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    from onnxprune.structured.latency_table import cache_dir

    monkeypatch.delenv("ONNXPRUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "onnxprune" / "latency"
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "latency"


def test_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    from onnxprune.profiling import diskcache

    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path))
    d = diskcache.kind_dir("latency")
    d.mkdir(parents=True)
    now = time.time()
    for i in range(5):  # 400 KiB each, oldest first
        p = d / f"t{i}.json"
        p.write_bytes(b"0" * (400 << 10))
        os.utime(p, (now - 100 + i, now - 100 + i))
    diskcache.touch(d / "t0.json")  # a hit: now the most recently used
    monkeypatch.setenv("ONNXPRUNE_CACHE_MAX_MB", "1")
    removed = diskcache.enforce_bound("latency", keep=d / "t4.json")
    assert sorted(p.name for p in removed) == ["t1.json", "t2.json", "t3.json"]
    assert sorted(p.name for p in d.glob("*.json")) == ["t0.json", "t4.json"]
    assert diskcache.info()["bytes"] <= 1 << 20


def test_cache_cli_info_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path))
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "a.json").write_text("{}")
    (tmp_path / "latency" / "notes.txt").write_text("not ours")
    code, out, err = run_cli("cache", "info", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["path"] == str(tmp_path) and info["kinds"]["latency"]["entries"] == 1 and info["max_bytes"] == 256 << 20
    code, out, _ = run_cli("cache", "info")
    assert code == 0 and str(tmp_path) in out
    code, out, err = run_cli("cache", "clear", "--json")
    assert code == 0, err
    assert json.loads(out)["removed"] == 1
    assert not (tmp_path / "latency" / "a.json").exists() and (tmp_path / "latency" / "notes.txt").exists()
    monkeypatch.setenv("ONNXPRUNE_CACHE_MAX_MB", "lots")
    code, out, err = run_cli("cache", "info")
    assert code == 1 and err.count("\n") == 1 and "ONNXPRUNE_CACHE_MAX_MB" in err


def test_sensitivity_latency_says_where(model):
    from onnxprune.pipeline.sensitivity import run_sensitivity
    from onnxprune.recipes.schema import Sensitivity

    cfg = Sensitivity(enabled=True, latency=True, ratios=[0.5], max_layers=1)
    res = run_sensitivity(model, None, cfg, profiles=[profile_from_dict(FAST)], evaluate=lambda m: 1.0)
    assert res["rows"] and res["rows"][0]["latency_ms"]["fast"] > 0
    assert res["measured_on"]["fast"]["host"] == provenance.machine_facts()["host"]

