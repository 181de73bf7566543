"""Deprecated path: onnxprune.bridge.torch_export (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.torch_export moved to onnxprune.bridge.torch_export; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.bridge.torch_export")
