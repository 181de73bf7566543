"""Profiling on ONNX Runtime CPU end to end: results, memory probes, provider checks, per-node, CLI.

GPU backends cannot run here; their tests check the clear UnavailableError and run for real only
where the package and GPU exist (skipped otherwise, with the reason).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import zoo
from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError, UnavailableError
from onnxprune.profiling import compare_models, profile_model
from onnxprune.profiling.hw_profile import load_hw_profile, profile_from_dict
from onnxprune.profiling.memory import measure_memory
from onnxprune.profiling.pernode import parse_trace, per_node_profile
from onnxprune.profiling.provider import check_active_provider
from onnxprune.profiling.runners import make_feeds, make_runner
from onnxprune.bridge.torch_export import export_torch

FAST = {"name": "fast", "backend": "ort-cpu", "threads": {"intra_op": 1}, "warmup_runs": 1, "min_runs": 5,
        "min_duration_s": 0.02}
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    small = zoo.export("tiny_resnet", d)
    wide = d / "conv_chain_wide.onnx"
    export_torch(zoo.ConvChain(c=16).eval(), (torch.randn(1, 3, 16, 16),), wide)
    narrow = d / "conv_chain_narrow.onnx"
    export_torch(zoo.ConvChain(c=4).eval(), (torch.randn(1, 3, 16, 16),), narrow)
    return {"small": small, "wide": wide, "narrow": narrow, "dir": d}


def _big_matmul(path, n=4096, width=None):
    """x[batch, n] @ W[n, n]: a 64 MB weight (n=4096) and almost nothing else."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width or n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


RECORD_KEYS = {"profile", "backend", "precision", "provenance", "provider", "batch_size", "threads", "latency_ms", "runs",
               "duration_s", "throughput_per_s", "file_bytes", "params", "macs", "sparsity", "versions", "notes",
               "meets_latency_budget", "meets_memory_limit"}


def test_profile_model_record(models):
    prof = profile_from_dict({**FAST, "batch_sizes": [1, 3], "latency_budget_ms": 1000})
    res = profile_model(models["small"], [prof], memory=False)
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    r = res["results"][0]
    assert RECORD_KEYS <= set(r)
    assert set(r["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max", "std"}
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["runs"] >= 5 and r["duration_s"] >= 0.02
    assert r["provider"] == "CPUExecutionProvider" and r["backend"] == "ort-cpu" and r["provenance"] == "real"
    assert r["meets_latency_budget"] is True and r["meets_memory_limit"] is None
    assert {"onnxruntime", "onnx", "numpy", "python", "cpu"} <= set(r["versions"])
    assert r["macs"] == res["macs"] > 0 and r["params"] == res["params"] > 0
    assert res["results"][1]["input_shapes"]["input"][0] == 3
    assert res["results"][1]["macs"] == r["macs"]  # MACs are per sample


def test_memory_probe_is_plausible_and_grows_with_the_model(models, tmp_path):
    prof = profile_from_dict(FAST)
    bare = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"], capture_output=True, text=True)
    hwm = [ln for ln in bare.stdout.splitlines() if ln.startswith("VmHWM:")]
    if not hwm:
        pytest.skip("no /proc/self/status on this OS to read a bare interpreter's baseline")
    baseline = int(hwm[0].split()[1]) * 1024
    m_small = onnx.load(str(models["small"]))
    small = measure_memory(models["small"], prof, make_feeds(m_small, {"input": (1, 3, 16, 16)}))
    assert small["peak_rss_bytes"] > baseline  # a runtime plus a model costs more than bare python
    assert small["peak_rss_bytes"] >= small["rss_before_load_bytes"] > 0
    big_path = _big_matmul(tmp_path / "big.onnx")
    big = measure_memory(big_path, prof, {"x": np.ones((1, 4096), np.float32)})
    assert big["peak_rss_bytes"] - small["peak_rss_bytes"] > 40 * 2**20  # the 64 MB weight shows


def test_profile_reports_memory_with_the_arena_rule(models):
    res = profile_model(models["small"], [profile_from_dict({**FAST, "memory_limit_mb": 100000})])
    r = res["results"][0]
    assert r["peak_rss_bytes"] > 0 and r["memory_method"]
    assert r["meets_memory_limit"] is True
    if "peak_rss_bytes_arena_off" in r:
        assert abs(r["peak_rss_bytes_arena_off"] - r["peak_rss_bytes"]) > 2**20


class _FakeSession:
    def __init__(self, providers):
        self._p = providers

    def get_providers(self):
        return self._p


def test_provider_fallback_is_an_error():
    with pytest.raises(OnnxPruneError, match="fell back"):
        check_active_provider(_FakeSession(["CPUExecutionProvider"]), "CUDAExecutionProvider", "profile x")
    with pytest.raises(OnnxPruneError):
        check_active_provider(_FakeSession([]), "CUDAExecutionProvider", "profile x")
    assert check_active_provider(_FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"]),
                                 "CUDAExecutionProvider", "p") == "CUDAExecutionProvider"


def test_provider_fallback_detected_in_a_real_session(models, monkeypatch):
    """ORT says CUDA is available but the session runs on CPU: the profile must fail, not report CPU numbers."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def cpu_only(path, so=None, providers=None, **kw):
        return real(path, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", cpu_only)
    prof = load_hw_profile("nvidia-server-cuda")
    with pytest.raises(OnnxPruneError, match="CPUExecutionProvider") as exc:
        make_runner(prof, models["small"], make_feeds(onnx.load(str(models["small"])), {"input": (1, 3, 16, 16)}))
    assert "CUDAExecutionProvider" in str(exc.value)


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has the CUDA provider")
def test_cuda_profile_unavailable_here(models):
    with pytest.raises(UnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        profile_model(models["small"], "nvidia-server-cuda", memory=False)
    code, out, err = run_cli("profile", models["small"], "--hw", "nvidia-server-cuda")
    assert code == 3 and out == "" and err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(HAS_TRT, reason="TensorRT and a GPU are present")
def test_tensorrt_profile_unavailable_here(models):
    with pytest.raises(UnavailableError, match="tensorrt|GPU"):
        profile_model(models["small"], "nvidia-tensorrt-fp16", memory=False)
    code, _, err = run_cli("compare", models["small"], models["small"], "--hw", "jetson-orin-tensorrt")
    assert code == 3 and err.startswith("error:")


def test_torch_backend_runs(models):
    """torch is imported above, and the bridge is onnxprune's own: no skip, no "unavailable" branch."""
    prof = profile_from_dict({**FAST, "backend": "torch-cpu"})
    r = profile_model(models["small"], [prof], memory=False)["results"][0]
    assert r["provider"].startswith("torch") and r["runs"] >= 5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU")
def test_cuda_profile_runs(models):
    r = profile_model(models["small"], "nvidia-server-cuda", memory=False, batch_sizes=[1])["results"][0]
    assert r["provider"] == "CUDAExecutionProvider"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package, torch with CUDA and an NVIDIA GPU")
def test_tensorrt_profile_runs(models):
    r = profile_model(models["small"], "nvidia-tensorrt-fp16", batch_sizes=[1])["results"][0]
    assert r["provider"].startswith("TensorRT") and r["gpu_memory_bytes"] > 0


def test_per_node_lists_model_nodes(models):
    model = onnx.load(str(models["small"]))
    names = {n.name for n in model.graph.node}
    prof = profile_from_dict(FAST)
    pn = per_node_profile(models["small"], prof, make_feeds(model, {"input": (1, 3, 16, 16)}), runs=5, top=100)
    mapped = {n["model_node"] for n in pn["top_nodes"]} - {None}
    assert mapped and mapped <= names
    assert "/fc/Gemm" in mapped
    assert pn["top_ops"][0]["op_type"] == "Conv"  # convolutions dominate a CNN
    assert sum(n["share"] for n in pn["top_nodes"]) == pytest.approx(1.0)


def test_parse_trace_skips_warmup():
    ev = [{"cat": "Session", "name": "model_run", "ts": 0}, {"cat": "Node", "name": "a_kernel_time", "ts": 1, "dur": 5,
          "args": {"op_name": "Conv"}}, {"cat": "Session", "name": "model_run", "ts": 10},
          {"cat": "Node", "name": "a_kernel_time", "ts": 11, "dur": 7, "args": {"op_name": "Conv"}},
          {"cat": "Node", "name": "a_fence_before", "ts": 12, "dur": 1}]
    assert [k["us"] for k in parse_trace(ev)] == [5, 7]
    assert [k["us"] for k in parse_trace(ev, skip_runs=1)] == [7]


def test_compare_models_interleaved_with_ratios(models):
    res = compare_models(models["wide"], models["narrow"], profile_from_dict(FAST))
    assert res["interleaved"] is True and res["provider"] == "CPUExecutionProvider"
    assert 0 < res["ratios"]["macs_b_over_a"] < 0.3 and res["ratios"]["macs_reduction"] > 3
    c = res["comparisons"][0]
    assert c["a"]["runs"] == c["b"]["runs"] >= 5
    ratios = c["ratios"]
    assert ratios["latency_p50_b_over_a"] == pytest.approx(c["b"]["latency_ms"]["p50"] / c["a"]["latency_ms"]["p50"])
    assert ratios["speedup_p50"] == pytest.approx(1 / ratios["latency_p50_b_over_a"])
    assert set(ratios) == {"latency_p50_b_over_a", "latency_mean_b_over_a", "speedup_p50", "speedup_mean"}


def test_compare_refuses_different_inputs(models, tmp_path):
    other = _big_matmul(tmp_path / "mm.onnx", n=8)
    with pytest.raises(OnnxPruneError, match="same inputs"):
        compare_models(models["small"], other, profile_from_dict(FAST))


def test_cli_profile_json_keys(models, tmp_path):
    prof = tmp_path / "fast.yaml"
    prof.write_text(json.dumps(FAST))  # JSON is YAML
    code, out, err = run_cli("profile", models["small"], "--hw", prof, "--hw", "ci-cpu", "--batch-size", "2", "--json",
                             "--per-node")
    assert code == 0, err
    res = json.loads(out)
    assert {"model", "file_bytes", "params", "macs", "sparsity", "results", "skipped"} <= set(res)
    assert [(r["profile"], r["batch_size"]) for r in res["results"]] == [("fast", 2), ("ci-cpu", 2)]
    for r in res["results"]:
        assert RECORD_KEYS | {"peak_rss_bytes", "per_node"} <= set(r)
        assert {"p50", "p90", "p99", "mean", "min", "max", "std"} <= set(r["latency_ms"])


def test_cli_compare_and_table(models):
    code, out, err = run_cli("compare", models["wide"], models["narrow"], "--hw", "ci-cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["comparisons"][0]["ratios"]["speedup_p50"] > 0
    code, out, err = run_cli("compare", models["wide"], models["narrow"], "--hw", "ci-cpu")
    assert code == 0 and ("faster" in out or "slower" in out)
    code, out, _ = run_cli("profile", models["small"], "--hw", "ci-cpu", "--no-memory")
    assert code == 0 and "ci-cpu" in out and "p50" in out


def test_cli_bad_inputs_are_one_line(models, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbackend: ort-cpu\nthreds: {intra_op: 1}\n")
    for args in (["profile", tmp_path / "missing.onnx", "--hw", "ci-cpu"],
                 ["profile", models["small"], "--hw", bad],
                 ["profile", models["small"], "--hw", "no-such-profile"],
                 ["compare", models["small"], tmp_path / "missing.onnx", "--hw", "ci-cpu"]):
        code, out, err = run_cli(*args)
        assert code == 1 and out == "" and err.startswith("error:") and len(err.strip().splitlines()) == 1, (args, err)
    assert "threds" in run_cli("profile", models["small"], "--hw", bad)[2]
    code, _, err = run_cli("profile", models["small"], "--batch-size", "0")
    assert code == 2


def test_fixed_batch_model_skips_other_batch_sizes(tmp_path):
    path = tmp_path / "fixed.onnx"
    export_torch(zoo.build("conv_chain"), (torch.randn(1, 3, 16, 16),), path, dynamic_batch=False)
    res = profile_model(path, [profile_from_dict({**FAST, "batch_sizes": [1, 4]})], memory=False)
    assert [r["batch_size"] for r in res["results"]] == [1]
    assert res["skipped"][0]["batch_size"] == 4 and "fixed batch" in res["skipped"][0]["reason"]
    with pytest.raises(OnnxPruneError, match="nothing measured"):
        profile_model(path, [profile_from_dict(FAST)], batch_sizes=[4], memory=False)


def test_input_shape_sets_the_batch_unless_batch_size_given(models):
    prof = profile_from_dict(FAST)
    res = profile_model(models["small"], [prof], input_shapes={"input": (2, 3, 16, 16)}, memory=False)
    assert [r["batch_size"] for r in res["results"]] == [2]
    res = profile_model(models["small"], [prof], input_shapes={"input": (2, 3, 16, 16)}, batch_sizes=[1, 3], memory=False)
    assert [r["input_shapes"]["input"] for r in res["results"]] == [[1, 3, 16, 16], [3, 3, 16, 16]]


def test_model_that_cannot_run_on_the_inputs_is_one_line(tmp_path):
    path = _big_matmul(tmp_path / "mm.onnx", n=8, width="k")  # x[batch, k] @ W[8, 8] needs k == 8
    code, out, err = run_cli("profile", path, "--hw", "ci-cpu", "--input-shape", "x=1x5", "--no-memory")
    assert code == 1 and out == "" and err.startswith("error:") and "cannot run" in err
    assert len(err.strip().splitlines()) == 1


def test_ort_error_text_keeps_the_reason_not_the_cpp_location():
    from onnxprune.core.errors import ort_error_text

    raw = ("[ONNXRuntimeError] : 1 : FAIL : Load model from /m/a b.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
           "model.cc:256 onnxruntime::Model::Model(onnx::ModelProto&&, const PathString&, const logging::Logger&, "
           "const ModelOptions&) Unsupported model IR version: 14, max supported IR version: 13\n")
    assert ort_error_text(RuntimeError(raw)) == ("Load model from /m/a b.onnx failed: Unsupported model IR version: 14, "
                                                 "max supported IR version: 13")
    plain = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x"
    assert ort_error_text(ValueError(plain)) == "Got invalid dimensions for input: x"
    assert ort_error_text(RuntimeError("")) == "RuntimeError"


def test_model_this_runtime_cannot_load_says_why_in_one_line(tmp_path):
    """The newest IR version onnx writes, when the installed ONNX Runtime doesn't know it yet: the
    reason reaches the user (it sits behind ORT's C++ source location in the raw message)."""
    path = _big_matmul(tmp_path / "mm.onnx", n=8, width="k")
    m = onnx.load(str(path))
    m.ir_version = onnx.IR_VERSION
    onnx.save(m, str(path))
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pytest.skip(f"this ONNX Runtime loads IR version {onnx.IR_VERSION}, the newest onnx writes")
    except Exception:  # noqa: BLE001 - the case under test
        pass
    code, out, err = run_cli("profile", path, "--hw", "ci-cpu", "--no-memory", "--input-shape", "x=1x8")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert f"IR version: {onnx.IR_VERSION}" in err and "onnxruntime_src" not in err, err
