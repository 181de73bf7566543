"""Quantization as a stage after pruning, through ONNX Runtime's own quantizer.

Whether quantizing helps is a measurement, not a default: INT8 made ResNet-50 1.5x faster on one
CPU thread and a small trained classifier no faster and less accurate. So every quantized model
comes with its fidelity to the float model on held-out samples and, given a profile, its latency
timed interleaved with the float model.
"""
from .static import FORMATS, quantize_model

__all__ = ["FORMATS", "quantize_model"]
