"""The one exception type users see.

Everything a user can get wrong (a missing file, a corrupt model, a bad flag value, an op we cannot
prune) raises :class:`OnnxPruneError`; the CLI prints its message as one line and exits non-zero.
Anything else escaping is a bug in onnxprune and is reported as such.
"""
from __future__ import annotations


class OnnxPruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1


class UnavailableError(OnnxPruneError):
    """An optional backend or package (CUDA, TensorRT, torch) is not usable on this machine."""

    exit_code = 3
