"""Deprecated path: onnxprune.core.shapes (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.shapes moved to onnxprune.core.shapes; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.shapes")
