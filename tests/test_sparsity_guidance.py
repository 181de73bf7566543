"""The speed notes say plainly when zeros buy no latency, and what would."""
from __future__ import annotations

import pytest

from onnxprune.core.errors import OnnxPruneError
from onnxprune.report.guidance import BACKENDS, METHODS, speedup_guidance


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unstructured_is_never_faster(backend):
    notes = speedup_guidance("unstructured", backend)
    assert notes[0].startswith(f"unstructured sparsity will not make this model faster on {BACKENDS[backend]}")
    text = " ".join(notes)
    assert "structured pruning" in text and "2:4" in text and "compute capability >= 8.0" in text
    assert "size" in text


def test_default_backend_is_ort_cpu():
    assert speedup_guidance("unstructured") == speedup_guidance("unstructured", "ort-cpu")
    assert "ONNX Runtime CPU" in speedup_guidance("unstructured")[0]


@pytest.mark.parametrize("backend", ["ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda"])
def test_2_4_not_faster_off_tensorrt(backend):
    notes = speedup_guidance("nm", backend)
    assert notes[0].startswith("2:4 sparsity will not make this model faster")
    assert "TensorRT" in " ".join(notes)


def test_2_4_on_tensorrt_depends_on_the_gpu():
    assert speedup_guidance("nm", "tensorrt", "8.6")[0].startswith("2:4 sparsity can be faster on TensorRT")
    assert speedup_guidance("nm", "tensorrt", 9.0)[0].startswith("2:4 sparsity can be faster")
    old = speedup_guidance("nm", "tensorrt", 7.5)[0]
    assert old.startswith("2:4 sparsity will not make this model faster") and "7.5" in old
    unknown = speedup_guidance("nm", "tensorrt")[0]
    assert "compute capability >= 8.0" in unknown and "does not state" in unknown
    fp32 = " ".join(speedup_guidance("nm", "tensorrt", "8.0", precision="fp32", sparse_weights=False))
    assert "fp16" in fp32 and "sparse_weights: true" in fp32


def test_other_nm_patterns_are_not_accelerated():
    notes = speedup_guidance("nm", "tensorrt", "8.6", nm=(1, 4))
    assert notes[0].startswith("1:4 sparsity will not make this model faster")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_combination_has_a_note(method, backend):
    notes = speedup_guidance(method, backend)
    assert notes and all(isinstance(n, str) and n for n in notes)


def test_unknown_values():
    with pytest.raises(OnnxPruneError, match="backend"):
        speedup_guidance("unstructured", "cuda")
    with pytest.raises(OnnxPruneError, match="method"):
        speedup_guidance("magic")
    with pytest.raises(OnnxPruneError, match="compute capability"):
        speedup_guidance("nm", "tensorrt", "ampere")
