"""Deprecated path: onnxprune.core.errors (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.errors moved to onnxprune.core.errors; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.errors")
