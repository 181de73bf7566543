"""Deprecated path: onnxprune.metrics.macs (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.macs moved to onnxprune.metrics.macs; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.metrics.macs")
