"""The small models most tests use: a subset of :mod:`arch_zoo`.

Each entry is ``name -> (factory, input_shape)``. Tests call :func:`export` to get an .onnx path.
Other test modules add architectures by extending :data:`ZOO`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from arch_zoo import ConvChain, FlattenHead, ResNetBasic as TinyResNet, randomize_norms
from onnxprune.bridge.torch_export import export_torch


ZOO: dict[str, tuple] = {
    "conv_chain": (ConvChain, (1, 3, 16, 16)),
    "tiny_resnet": (TinyResNet, (1, 3, 16, 16)),
    "flatten_mlp": (FlattenHead, (1, 3, 8, 8)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Instantiate a zoo model with seeded weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    factory, _ = ZOO[name]
    return randomize_norms(factory())


def export(name: str, directory: Path, seed: int = 0, **kwargs) -> Path:
    """Export zoo model ``name`` to ``directory/name.onnx``."""
    _, shape = ZOO[name]
    path = Path(directory) / f"{name}.onnx"
    export_torch(build(name, seed), (torch.randn(*shape),), path, **kwargs)
    return path
