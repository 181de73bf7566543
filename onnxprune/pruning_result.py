"""Deprecated path: onnxprune.core.pruning_result (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.pruning_result moved to onnxprune.core.pruning_result; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.core.pruning_result")
