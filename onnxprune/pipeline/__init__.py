"""The end-to-end pipeline behind ``onnxprune run``: sweep expansion, cached steps, sensitivity,
latency targets and the report. Entry point: :func:`onnxprune.pipeline.run.run_recipe`."""
from __future__ import annotations
from .run import run_recipe as _impl


def run_recipe(*args, **kwargs):
    """See :func:`onnxprune.pipeline.run.run_recipe`."""

    return _impl(*args, **kwargs)


__all__ = ["run_recipe"]
