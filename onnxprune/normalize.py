"""Deprecated path: onnxprune.core.normalize (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.normalize moved to onnxprune.core.normalize; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.normalize")
