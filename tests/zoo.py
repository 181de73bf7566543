"""Small test architectures built in-project (no downloads), exported to ONNX on demand.

Each entry is ``name -> (factory, input_shape)``. Tests call :func:`export` to get an .onnx path.
Other test modules add architectures by extending :data:`ZOO`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from onnxprune.torch_export import export_torch


class ConvChain(nn.Module):
    def __init__(self, c=8, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, classes))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class FlattenMLPHead(nn.Module):
    """Conv -> Flatten (channel x spatial) -> Linear: the Reshape/Flatten index expansion case."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


ZOO: dict[str, tuple] = {
    "conv_chain": (ConvChain, (1, 3, 16, 16)),
    "tiny_resnet": (TinyResNet, (1, 3, 16, 16)),
    "flatten_mlp": (FlattenMLPHead, (1, 3, 8, 8)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Instantiate a zoo model with seeded weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    factory, _ = ZOO[name]
    model = factory()
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export(name: str, directory: Path, seed: int = 0, **kwargs) -> Path:
    """Export zoo model ``name`` to ``directory/name.onnx``."""
    _, shape = ZOO[name]
    path = Path(directory) / f"{name}.onnx"
    export_torch(build(name, seed), (torch.randn(*shape),), path, **kwargs)
    return path
