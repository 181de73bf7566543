"""Hardware profiles: every shipped one validates; a bad field is one error naming the file and the field."""
from __future__ import annotations

import pytest
import yaml

from onnxprune.core.errors import OnnxPruneError
from onnxprune.profiling.hw_profile import HwProfile, load_hw_profile, profile_from_dict, shipped_profiles

SHIPPED = shipped_profiles()
REQUIRED = {"x86-server-cpu", "edge-arm-4t", "microserver-1t", "nvidia-server-cuda", "nvidia-tensorrt-fp16",
            "jetson-orin-tensorrt", "ci-cpu"}


def test_shipped_set():
    assert REQUIRED <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_validates(name):
    prof = load_hw_profile(name)
    assert isinstance(prof, HwProfile)
    assert prof.name == name  # the file stem is the name users type
    assert prof.source == str(SHIPPED[name])
    assert prof.provenance in ("real", "emulated")
    if prof.provenance == "emulated":
        assert prof.emulates


def test_shipped_profiles_say_what_they_are():
    edge = load_hw_profile("edge-arm-4t")
    assert edge.threads.intra_op == 4 and edge.provenance == "emulated" and "Raspberry Pi" in edge.emulates
    assert any("slow" in n for n in edge.notes)  # honest: thread limits do not emulate a slower core
    assert load_hw_profile("microserver-1t").threads.intra_op == 1
    assert load_hw_profile("nvidia-server-cuda").backend == "ort-cuda"
    trt = load_hw_profile("nvidia-tensorrt-fp16")
    assert (trt.backend, trt.precision) == ("tensorrt", "fp16")
    orin = load_hw_profile("jetson-orin-tensorrt")
    assert orin.backend == "tensorrt" and orin.gpu.compute_capability == "8.7" and orin.sparse_weights


def test_load_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({"name": "mine", "backend": "ort-cpu", "batch_sizes": [1, 4],
                                 "input_shapes": {"x": ["N", 3, 32, 32]}}))
    prof = load_hw_profile(p)
    assert prof.shapes_for_batch(4) == {"x": (4, 3, 32, 32)}
    assert prof.source == str(p)


def _err(tmp_path, data, name="bad.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    with pytest.raises(OnnxPruneError) as exc:
        load_hw_profile(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg
    return msg


BASE = {"name": "x", "backend": "ort-cpu"}


@pytest.mark.parametrize("data,field,words", [
    ({**BASE, "min_run": 5}, "min_run", "unknown field"),
    ({**BASE, "threads": {"intra_op": 2, "intar_op": 1}}, "threads.intar_op", "unknown field"),
    ({**BASE, "backend": "ort-gpu"}, "backend", "ort-cpu"),
    ({**BASE, "precision": "int8"}, "precision", "quantized"),
    ({**BASE, "backend": "ort-cuda", "precision": "fp16"}, "precision", "tensorrt"),
    ({**BASE, "backend": "tensorrt", "precision": "int8"}, "precision", "calibration"),
    ({**BASE, "precision": "fp8"}, "precision", "fp32"),
    ({**BASE, "sparse_weights": True}, "sparse_weights", "TensorRT"),
    ({**BASE, "provenance": "emulated"}, "emulates", "emulated"),
    ({**BASE, "batch_sizes": [1, 0]}, "batch_sizes", "positive"),
    ({**BASE, "min_runs": 0}, "min_runs", "1"),
    ({**BASE, "input_shapes": {"x": ["M", 3]}}, "input_shapes", "batch"),
    ({**BASE, "cpu_affinity": [0, 0]}, "cpu_affinity", "distinct"),
    ({**BASE, "gpu": {"compute_capability": "8.7"}}, "gpu", "GPU"),
    ({"backend": "ort-cpu"}, "name", "required"),
])
def test_bad_field_is_named(tmp_path, data, field, words):
    msg = _err(tmp_path, data)
    assert f"'{field}'" in msg, msg
    assert words.lower() in msg.lower(), msg


def test_bad_yaml_and_not_a_mapping(tmp_path):
    assert "YAML" in _err(tmp_path, "name: [unclosed\n")
    assert "mapping" in _err(tmp_path, "- a\n- b\n", "list.yaml")


def test_unknown_profile_name_lists_shipped():
    with pytest.raises(OnnxPruneError, match="x86-server-cpu"):
        load_hw_profile("no-such-profile")


def test_source_is_not_a_yaml_key():
    with pytest.raises(OnnxPruneError, match="source"):
        profile_from_dict({**BASE, "source": "x"}, "p.yaml")
