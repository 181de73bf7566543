"""Deprecated path: onnxprune.report.guidance (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.guidance moved to onnxprune.report.guidance; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.report.guidance")
