"""Deprecated path: onnxprune.metrics.inspection (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.inspection moved to onnxprune.metrics.inspection; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.metrics.inspection")
