"""Deprecated path: onnxprune.core.user_code (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.user_code moved to onnxprune.core.user_code; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.user_code")
