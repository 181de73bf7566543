"""Deprecated path: onnxprune.core.model_io (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.model_io moved to onnxprune.core.model_io; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.model_io")
