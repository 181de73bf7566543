"""The one exception type users see.

Everything a user can get wrong (a missing file, a corrupt model, a bad flag value, an op we cannot
prune) raises :class:`OnnxPruneError`; the CLI prints its message as one line and exits non-zero.
Anything else escaping is a bug in onnxprune and is reported as such.
"""
from __future__ import annotations

import re


class OnnxPruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1


class UnavailableError(OnnxPruneError):
    """An optional backend or package (CUDA, TensorRT, torch) is not usable on this machine."""

    exit_code = 3


_ORT_NOISE = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "  # status prefix
                        r"|/[^\s]*?onnxruntime_src/\S+:\d+\s+(?:[^()]*\([^()]*\)(?:\s*const)?\s+)?")  # where in C++


def ort_error_text(exc: BaseException, limit: int = 300) -> str:
    """An ONNX Runtime exception as one readable line: its C++ source location and function
    signature (``.../model.cc:256 onnxruntime::Model::Model(...)``) cut out, so the reason that
    follows them (e.g. "Unsupported model IR version: 14, max supported IR version: 13") fits."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return " ".join(_ORT_NOISE.sub(" ", text).split())[:limit]
