"""Export a PyTorch module to ONNX the way onnxprune expects (needs torch).

Uses the TorchScript exporter (``dynamo=False``): it is deterministic, needs no extra packages, and
with ``do_constant_folding=False`` keeps BatchNormalization as its own node so it stays
analysable. The output is written atomically.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from ..core.model_io import atomic_path


def export_torch(module, example_inputs: Sequence, path: str | os.PathLike, *, opset: int = 17,
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 dynamic_batch: bool = True, keep_bn: bool = True) -> Path:
    """Export ``module`` (in eval mode) on ``example_inputs`` to ``path``; returns the path."""
    import torch  # lazy: torch ([train] extra)

    module = module.eval()
    inputs = tuple(example_inputs)
    input_names = list(input_names or (["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]))
    output_names = list(output_names or ["output"])
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, inputs, str(tmp), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=not keep_bn)
    return Path(path)
