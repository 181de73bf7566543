"""ONNX -> PyTorch bridge: execute a normalized ONNX graph as a trainable ``nn.Module``, check it
against ONNX Runtime, and write trained weights back into the same graph (needs torch).

- :func:`to_torch` builds an :class:`OnnxModule` (ops in :mod:`onnxprune.bridge.ops`);
- :func:`check_bridge` / :func:`assert_bridge_faithful` compare it with ONNX Runtime and name the
  first diverging node;
- :func:`write_back` and :func:`apply_masks` return the weights to ONNX with sparsity kept exactly.
"""
from __future__ import annotations

from .check import assert_bridge_faithful, check_bridge
from .module import OnnxModule, to_torch
from . import rnn  # noqa: F401 - registers LSTM, GRU and RNN in ops.TABLE (their loops live in their own module)
from .ops import TABLE
from .writeback import apply_masks, write_back

__all__ = ["to_torch", "check_bridge", "assert_bridge_faithful", "write_back", "apply_masks", "OnnxModule", "TABLE"]
