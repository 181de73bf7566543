"""Recovering accuracy without training: calibration of pruned models on unlabeled data.

numpy + ONNX Runtime only (no torch), so it runs where the model is deployed. Everything is fitted
toward the *dense* model's behaviour on the same data, never toward the data itself.

- :mod:`.collect`: one ONNX Runtime pass of the dense model -> per-layer statistics (:mod:`.stats`)
- :mod:`.structured`: least-squares re-fit / relative BN shift after channel pruning, checked on
  held-out samples; :mod:`.sequential`: the re-fit again on the pruned model's own activations
- :mod:`.mask`: attention-mask inputs (padding rows count in no statistic)
- :mod:`.weights`: wanda scores and OBS-style reconstruction for unstructured and N:M pruning
"""
from __future__ import annotations

from .data import calibration_inputs, calibration_split
from .structured import METHODS, StructuredCalibration

__all__ = ["calibration_inputs", "calibration_split", "StructuredCalibration", "METHODS"]
