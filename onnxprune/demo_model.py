"""Deprecated path: onnxprune.commands.demo_model (moved in 0.2; this alias goes in the next release)."""
import importlib
import sys
import warnings

warnings.warn("onnxprune.demo_model moved to onnxprune.commands.demo_model; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = importlib.import_module("onnxprune.commands.demo_model")
