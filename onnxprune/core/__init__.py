"""The base layer: the ONNX graph, its shapes, loading, normalization and errors.

Imports nothing else from onnxprune (docs/architecture.md)."""
