"""Statistics, timing loops (minimums honoured, interleaving), affinity, input shapes and provenance."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune.core.errors import OnnxPruneError
from onnxprune.profiling.environment import effective_provenance
from onnxprune.profiling.hw_profile import profile_from_dict
from onnxprune.profiling.measure import cpu_affinity, measure, measure_interleaved, usable_cores
from onnxprune.profiling.runners import BatchSizeError, batch_input_shapes, make_feeds
from onnxprune.profiling.stats import LATENCY_KEYS, latency_summary, relative_spread, throughput


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_latency_summary_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    s = rng.lognormal(-6, 0.5, size=rng.integers(1, 500))
    got = latency_summary(s)
    assert tuple(got) == LATENCY_KEYS
    ms = s * 1e3
    for key, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert got[key] == pytest.approx(np.percentile(ms, q))
    assert got["min"] == pytest.approx(ms.min()) and got["max"] == pytest.approx(ms.max())
    assert got["mean"] == pytest.approx(ms.mean()) and got["std"] == pytest.approx(ms.std())


def test_latency_summary_known_values():
    got = latency_summary([0.001, 0.002, 0.003, 0.004, 0.010])  # seconds
    assert got["p50"] == pytest.approx(3.0) and got["min"] == pytest.approx(1.0) and got["max"] == pytest.approx(10.0)
    assert got["p90"] == pytest.approx(7.6)  # linear between 4 and 10 ms at rank 3.6
    with pytest.raises(ValueError):
        latency_summary([])


def test_throughput_and_spread():
    assert throughput([0.01] * 10, batch_size=4) == pytest.approx(400.0)
    assert relative_spread([10.0, 10.2, 9.9]) == pytest.approx(0.3 / 10.0)


def _fake_clock(step):
    t = itertools.count()
    return lambda: next(t) * step


def test_min_runs_honoured_when_duration_is_short():
    calls = []
    timing = measure(lambda: calls.append(1), warmup_runs=3, min_runs=25, min_duration_s=0.0, clock=_fake_clock(1e-3))
    assert timing.runs == 25 and len(calls) == 28 and timing.warmup_runs == 3


def test_min_duration_honoured_when_runs_are_fast():
    # the fake clock advances 1 ms per reading (two readings per run): 5 runs would take ~10 ms, 1 s needs ~500
    timing = measure(lambda: None, warmup_runs=0, min_runs=5, min_duration_s=1.0, clock=_fake_clock(1e-3))
    assert timing.duration_s >= 1.0 and timing.runs > 5
    real = measure(lambda: None, warmup_runs=1, min_runs=3, min_duration_s=0.05)
    assert real.duration_s >= 0.05 and real.runs > 3


def test_interleaved_order_is_a_b_a_b():
    log = []
    ta, tb = measure_interleaved([lambda: log.append("A"), lambda: log.append("B")], warmup_runs=2, min_runs=4,
                                 min_duration_s=0.0)
    assert log == ["A", "B"] * 6  # 2 warm-up rounds + 4 timed rounds, alternating
    assert ta.runs == tb.runs == 4


def test_cpu_affinity_applied_and_restored():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this OS")
    before = os.sched_getaffinity(0)
    core = usable_cores()[0]
    with cpu_affinity([core]):
        assert os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(OnnxPruneError, match="only"):
        with cpu_affinity([max(usable_cores()) + 64]):
            pass


def _model(dims):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [dims[0] if dims else 1])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x, ids], [y])
    return helper.make_model(g)


def test_batch_input_shapes():
    m = _model(["batch", 3, 8, 8])
    assert batch_input_shapes(m, 4) == {"x": (4, 3, 8, 8), "ids": (4,)}
    assert batch_input_shapes(m, 2, overrides={"x": (1, 3, 8, 8)})["x"] == (2, 3, 8, 8)
    feeds = make_feeds(m, batch_input_shapes(m, 2))
    assert feeds["x"].dtype == np.float32 and feeds["ids"].dtype == np.int64 and not feeds["ids"].any()
    with pytest.raises(BatchSizeError, match="fixed batch"):
        batch_input_shapes(_model([1, 3, 8, 8]), 8)
    with pytest.raises(OnnxPruneError, match="symbolic"):
        batch_input_shapes(_model(["batch", 3, "h", "w"]), 1)
    assert batch_input_shapes(_model(["batch", 3, "h", "w"]), 1, {"x": (1, 3, 5, 5)})["x"] == (1, 3, 5, 5)
    with pytest.raises(OnnxPruneError, match="fixed to 3"):
        batch_input_shapes(m, 1, overrides={"x": (1, 4, 8, 8)})
    with pytest.raises(OnnxPruneError, match="inputs are"):
        batch_input_shapes(m, 1, overrides={"nope": (1,)})


def test_provenance_downgraded_off_device():
    real_x86 = profile_from_dict({"name": "a", "backend": "ort-cpu", "arch": "definitely-not-this-arch"})
    prov, notes = effective_provenance(real_x86, {})
    assert prov == "emulated" and any("definitely-not-this-arch" in n for n in notes)
    orin = profile_from_dict({"name": "o", "backend": "tensorrt", "precision": "fp16",
                              "gpu": {"compute_capability": "8.7", "name": "Jetson Orin"}})
    assert effective_provenance(orin, {"compute_capability": "9.0", "gpu": "H100"})[0] == "emulated"
    assert effective_provenance(orin, {"compute_capability": "8.7", "gpu": "Orin"})[0] == "real"


def test_nvml_readers_with_a_fake_pynvml(monkeypatch):
    """NVML is read through nvidia-ml-py's pynvml; checked here against a stand-in (no GPU on CI)."""
    import sys
    import types

    from onnxprune.profiling.memory import nvml_gpu_info, nvml_process_gpu_memory

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 7), nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetName=lambda h: b"Orin", nvmlSystemGetDriverVersion=lambda: "540.1",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=8 << 30),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=5, usedGpuMemory=123),
                                                        types.SimpleNamespace(pid=7, usedGpuMemory=None)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_gpu_info() == {"gpu": "Orin", "driver": "540.1", "cuda_driver": "12.4", "compute_capability": "8.7",
                               "gpu_memory_total_bytes": 8 << 30}
    assert (nvml_process_gpu_memory(5), nvml_process_gpu_memory(7), nvml_process_gpu_memory(9)) == (123, None, None)

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=no_driver))
    assert nvml_gpu_info() is None and nvml_process_gpu_memory(5) is None
