"""Deprecated path: onnxprune.core.prepare (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.prepare moved to onnxprune.core.prepare; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.prepare")
