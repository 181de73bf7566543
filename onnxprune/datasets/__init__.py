"""Datasets for retraining and evaluation: specs, splits, preprocessing, ONNX Runtime accuracy.

numpy (+ onnxruntime for :func:`evaluate_onnx`) only: torch is not imported here, so ``onnxprune
eval`` runs on a deployment machine without it. See :mod:`onnxprune.datasets.spec` for the spec syntax.
"""
from __future__ import annotations

from .core import DatasetSplits, Split, load_dataset, stratified_split
from .evaluate import evaluate_onnx
from .inputs import bind_dataset, bind_inputs, data_input_shapes, load_inputs, model_inputs
from .spec import Preprocess, parse_spec

__all__ = ["DatasetSplits", "Split", "load_dataset", "stratified_split", "evaluate_onnx", "Preprocess", "parse_spec",
           "load_inputs", "bind_inputs", "bind_dataset", "model_inputs", "data_input_shapes"]
