"""Deprecated path: onnxprune.metrics.params (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.params moved to onnxprune.metrics.params; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.metrics.params")
