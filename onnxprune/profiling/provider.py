"""Which execution provider actually ran.

ONNX Runtime silently falls back to the CPU when CUDA (or TensorRT) cannot start: a missing driver,
a CUDA/cuDNN version mismatch, no GPU. A "GPU" latency measured on the CPU is worse than no number,
so a profile fails unless the provider it asks for is the first one the session actually uses.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import UnavailableError
import onnxruntime as ort

#: ONNX Runtime backends -> the execution provider they must run on
ORT_PROVIDER = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider"}


def require_ort_provider(provider: str, where: str) -> None:
    """Raise :class:`UnavailableError` when this onnxruntime build has no ``provider`` at all."""

    available = ort.get_available_providers()
    if provider not in available:
        raise UnavailableError(
            f"{where} needs ONNX Runtime's {provider}, but this onnxruntime {ort.__version__} only has "
            f"{', '.join(available)} (install onnxruntime-gpu, pip install 'onnxprune[gpu]', on a machine with an NVIDIA GPU)")


def check_active_provider(session: Any, expected: str, where: str) -> str:
    """The provider that runs ``session`` (first of ``session.get_providers()``), which must be ``expected``.

    Raises :class:`UnavailableError` (an :class:`~onnxprune.core.errors.OnnxPruneError`, exit code 3)
    when ONNX Runtime fell back to another provider.
    """
    active = list(session.get_providers())
    first = active[0] if active else None
    if first != expected:
        raise UnavailableError(
            f"{where} asked for {expected}, but ONNX Runtime runs the model on {first or 'no provider'} "
            f"(active: {', '.join(active) or 'none'}); it fell back silently because {expected} could not start "
            f"(no GPU, or a driver/CUDA/cuDNN mismatch): refusing to report its latency as {expected}'s")
    return first
