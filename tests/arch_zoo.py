"""Test architectures for channel analysis and pruning, built in-project (no downloads).

- :data:`ARCHS`: ``name -> (factory, input_shape)`` PyTorch modules; :func:`export_arch` writes
  ``tmp_path/name.onnx`` (seeded weights, non-trivial BN statistics, dynamic batch).
- :data:`HELPER_GRAPHS`: ``name -> callable(tmp_path) -> Path``: graphs written with ``onnx.helper``
  in the styles PyTorch never emits (Caffe2/Paddle: opset 9 ``Sum``, decomposed BN as Mul/Add with
  ``[C,1,1]`` constants, HardSwish spelled out, attribute-style Split/Slice/Upsample ...).
- :func:`random_plan` and :func:`zero_removed_inputs`: the pieces of the equivalence oracle (zero
  what the removed channels feed into in the original model; prune them; outputs must match).

Every model is tiny (a handful of channels, 8x8..16x16 inputs) so whole test files stay fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnxprune.bridge.torch_export import export_torch

# ----------------------------------------------------------------------------------- torch models


class ConvChain(nn.Module):
    """Plain conv chain with BN and a Linear head."""

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


class ResNetBasic(nn.Module):
    """ResNet with basic blocks: identity and projection shortcuts."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    def __init__(self, c_in, width, c_out, stride=1, groups=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class ResNetBottleneck(nn.Module):
    def __init__(self, classes=10, groups=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Bottleneck(16, 8, 16, groups=groups), Bottleneck(16, 8, 32, 2, groups=groups),
                                    Bottleneck(32, 8, 32, groups=groups))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNeXt(ResNetBottleneck):
    """Bottlenecks whose 3x3 convs are grouped (4 groups of 2 channels)."""

    def __init__(self, classes=10):
        super().__init__(classes, groups=4)


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, expand, stride=1, act=nn.ReLU6):
        super().__init__()
        hid = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hid, 1, bias=False), nn.BatchNorm2d(hid), act(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), act(),
            nn.Conv2d(hid, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    """Inverted residuals: expansion 1x1, depthwise 3x3 (ReLU6 = Clip), projection, residual."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 2), InvertedResidual(8, 12, 2, 2),
                                    InvertedResidual(12, 12, 2, act=nn.Hardswish))
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class SENet(nn.Module):
    """Conv blocks with squeeze-excite gates ([N,C,1,1] scales) and a residual; a spatial gate
    ([N,1,H,W], broadcast over channels) on the last stage."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1 = SqueezeExcite(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se2 = SqueezeExcite(8)
        self.spatial = nn.Conv2d(8, 1, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.se1(torch.relu(self.b1(self.c1(x))))
        x = x + self.se2(torch.relu(self.b2(self.c2(x))))
        x = x * torch.sigmoid(self.spatial(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNet(nn.Module):
    """A dense block: every layer reads the concat of all previous feature maps."""

    def __init__(self, classes=10, growth=4, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        c = 6
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        x = self.trans(torch.cat(feats, 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception(nn.Module):
    """Inception module: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches concatenated, twice."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.m1 = self._module(8)
        self.m2 = self._module(16)
        self.fc = nn.Linear(16, classes)

    @staticmethod
    def _module(c):
        return nn.ModuleDict({
            "b1": nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU()),
            "b2": nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()),
            "b3": nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 5, padding=2), nn.ReLU()),
            "b4": nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c, 3, 1), nn.ReLU()),
        })

    @staticmethod
    def _run(m, x):
        return torch.cat([m["b1"](x), m["b2"](x), m["b3"](x), m["b4"](x)], 1)

    def forward(self, x):
        x = self._run(self.m2, self._run(self.m1, self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (stride 1): split channels, transform one half, concat, shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class ShuffleNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.conv = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.conv(self.units(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FPN(nn.Module):
    """Bottom-up convs, top-down nearest upsampling + lateral 1x1 adds, 3x3 smoothing, two outputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU())
        self.lat1, self.lat2, self.lat3 = nn.Conv2d(8, 6, 1), nn.Conv2d(12, 6, 1), nn.Conv2d(16, 6, 1)
        self.smooth1, self.smooth2 = nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        p3 = self.lat3(f3)
        p2 = self.lat2(f2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        p1 = self.lat1(f1) + F.interpolate(p2, scale_factor=2.0, mode="nearest")
        return self.smooth1(p1), self.smooth2(p2)


class FPNSized(FPN):
    """FPN upsampling to the lateral's size (``size=f.shape[-2:]``): run-time Resize sizes."""

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        p3 = self.lat3(f3)
        p2 = self.lat2(f2) + F.interpolate(p3, size=f2.shape[-2:], mode="nearest")
        p1 = self.lat1(f1) + F.interpolate(p2, size=f1.shape[-2:], mode="nearest")
        return self.smooth1(p1), self.smooth2(p2)


class GroupNormNet(nn.Module):
    """Residual blocks with GroupNorm + SiLU (diffusion-UNet / detection-head style). PyTorch exports
    GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add; statistics span each group
    of channels, so the groups are prunable (balanced blocks) but inexact."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.n1, self.c1 = nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.c1(F.silu(self.n1(x)))
        x = x + self.c2(F.silu(self.n2(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt-style: depthwise 7x7, permute to channels-last, LayerNorm, Linear-GELU-Linear, layer
    scale, permute back, residual. The LayerNorm makes the residual group inexact (statistics over C)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class TransformerMLP(nn.Module):
    """Pre-norm transformer MLP blocks on [B, T, D]: LayerNorm, Linear-GELU-Linear, residual."""

    def __init__(self, d=8, hidden=16, classes=5):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp1 = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.mlp2 = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.mlp1(self.norm1(x))
        x = x + self.mlp2(self.norm2(x))
        return self.head(x.mean(dim=1))


class Attention(nn.Module):
    """Multi-head self-attention spelled out with Reshape/Transpose (as exporters emit it) + MLP."""

    def __init__(self, d=8, heads=2, hidden=16, classes=5):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.embed = nn.Linear(6, d)
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.heads, self.dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        x = x + self.mlp(x)
        return self.head(x.mean(dim=1))


class Decoder(nn.Module):
    """Encoder-decoder with ConvTranspose upsampling (plain and depthwise) and a skip concat."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.e2 = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.dw_up = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=6)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        f1 = self.e1(x)
        y = torch.relu(self.dw_up(torch.relu(self.up(self.e2(f1)))))
        return self.out(torch.cat([f1, y], 1))


class FlattenHead(nn.Module):
    """Conv -> MaxPool -> Flatten (channel x spatial) -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv_chain": (ConvChain, (1, 3, 16, 16)),
    "resnet_basic": (ResNetBasic, (1, 3, 16, 16)),
    "resnet_bottleneck": (ResNetBottleneck, (1, 3, 16, 16)),
    "resnext": (ResNeXt, (1, 3, 16, 16)),
    "mobilenet_v2": (MobileNetV2, (1, 3, 16, 16)),
    "squeeze_excite": (SENet, (1, 3, 12, 12)),
    "densenet": (DenseNet, (1, 3, 12, 12)),
    "inception": (Inception, (1, 3, 12, 12)),
    "shufflenet": (ShuffleNet, (1, 3, 12, 12)),
    "fpn": (FPN, (1, 3, 16, 16)),
    "fpn_sized": (FPNSized, (1, 3, 16, 16)),
    "convnext": (ConvNeXt, (1, 3, 16, 16)),
    "groupnorm": (GroupNormNet, (1, 3, 8, 8)),
    "transformer_mlp": (TransformerMLP, (1, 5, 6)),
    "attention": (Attention, (1, 5, 6)),
    "decoder": (Decoder, (1, 3, 8, 8)),
    "flatten_head": (FlattenHead, (1, 3, 8, 8)),
}


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial norm parameters and BN statistics, so tests see real scales and shifts."""
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
    return model.eval()


def build_arch(name: str, seed: int = 0) -> nn.Module:
    """Instantiate ``name`` with seeded weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    factory, _ = ARCHS[name]
    return randomize_norms(factory())


def export_arch(name: str, tmp_path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Export architecture ``name`` to ``tmp_path/name.onnx`` (opset 17, dynamic batch)."""
    _, shape = ARCHS[name]
    path = Path(tmp_path) / f"{name}.onnx"
    output_names = ["p1", "p2"] if name.startswith("fpn") else None
    export_torch(build_arch(name, seed), (torch.randn(*shape),), path, output_names=output_names, **kwargs)
    return path


# ----------------------------------------------------------------------------------- onnx.helper graphs


def _w(rng: np.random.Generator, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32) * 0.5


def _save(nodes, inputs, outputs, inits, path: Path, opset: int, ir: int = 7) -> Path:
    g = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="helper")
    m.ir_version = ir
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def caffe2_sum(tmp_path: Path) -> Path:
    """Caffe2 style, opset 9: BN decomposed into Mul/Add with [C,1,1] constants, a variadic Sum of
    three branches (residual), Flatten + Gemm (transB) head."""
    rng = np.random.default_rng(1)
    c = 6
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w0", _w(rng, c, 3, 3, 3)), ("b0", _w(rng, c)),
        ("s0", (rng.uniform(0.5, 1.5, (c, 1, 1))).astype(np.float32)), ("t0", _w(rng, c, 1, 1)),
        ("w1", _w(rng, c, c, 3, 3)), ("s1", rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)),
        ("t1", _w(rng, c, 1, 1)),
        ("w2", _w(rng, c, c, 1, 1)), ("b2", _w(rng, c)),
        ("w3", _w(rng, 8, c, 3, 3)), ("b3", _w(rng, 8)),
        ("fcw", _w(rng, 4, 8)), ("fcb", _w(rng, 4)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Mul", ["c0", "s0"], ["m0"], name="bn0_mul"),
        helper.make_node("Add", ["m0", "t0"], ["a0"], name="bn0_add"),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Mul", ["c1", "s1"], ["m1"], name="bn1_mul"),
        helper.make_node("Add", ["m1", "t1"], ["a1"], name="bn1_add"),
        helper.make_node("Conv", ["r0", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Sum", ["a1", "c2", "r0"], ["s"], name="sum"),
        helper.make_node("Relu", ["s"], ["rs"], name="relu_sum"),
        helper.make_node("Conv", ["rs", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["fl"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["fl", "fcw", "fcb"], ["y"], transB=1, name="fc"),
    ]
    return _save(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4])], inits, Path(tmp_path) / "caffe2_sum.onnx", 9, 4)


def paddle_hardswish(tmp_path: Path) -> Path:
    """Paddle style, opset 11: HardSwish spelled x * HardSigmoid(x) and x * Clip(x + 3, 0, 6) / 6,
    Split with sizes as an attribute, a Slice and Upsample-like Resize with scales, Squeeze/Unsqueeze
    with attribute axes around an SE gate, BN decomposed into Mul/Add."""
    rng = np.random.default_rng(2)
    c = 8
    f = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w0", _w(rng, c, 3, 3, 3)), ("b0", _w(rng, c)),
        ("dw", _w(rng, c, 1, 3, 3)), ("s1", rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)),
        ("t1", _w(rng, 1, c, 1, 1)),
        ("three", f(3.0)), ("zero", f(0.0)), ("six", f(6.0)),
        ("sew1", _w(rng, 4, c)), ("sew2", _w(rng, c, 4)),
        ("wa", _w(rng, 6, 5, 1, 1)), ("wb", _w(rng, 6, 3, 3, 3)),
        ("scales", f([1.0, 1.0, 2.0, 2.0])), ("roi", f([])),
        ("sl_starts", np.array([1], dtype=np.int64)), ("sl_ends", np.array([5], dtype=np.int64)),
        ("sl_axes", np.array([1], dtype=np.int64)),
        ("wc", _w(rng, 4, 4, 3, 3)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("HardSigmoid", ["c0"], ["hs0"], alpha=1 / 6, beta=0.5, name="hsig0"),
        helper.make_node("Mul", ["c0", "hs0"], ["h0"], name="hswish0"),
        helper.make_node("Conv", ["h0", "dw"], ["d0"], pads=[1, 1, 1, 1], group=c, name="dwconv"),
        helper.make_node("Mul", ["d0", "s1"], ["m1"], name="bn1_mul"),
        helper.make_node("Add", ["m1", "t1"], ["a1"], name="bn1_add"),
        helper.make_node("Add", ["a1", "three"], ["p3"], name="hs_add3"),
        helper.make_node("Clip", ["p3", "zero", "six"], ["cl"], name="hs_clip"),
        helper.make_node("Mul", ["a1", "cl"], ["hm"], name="hs_mul"),
        helper.make_node("Div", ["hm", "six"], ["h1"], name="hs_div"),
        # SE gate through Squeeze/Unsqueeze (attribute axes in opset 11) and MatMul weights
        helper.make_node("GlobalAveragePool", ["h1"], ["gp"], name="se_pool"),
        helper.make_node("Squeeze", ["gp"], ["sq"], axes=[2, 3], name="se_squeeze"),
        helper.make_node("Gemm", ["sq", "sew1"], ["g1"], transB=1, name="se_fc1"),
        helper.make_node("Relu", ["g1"], ["g1r"], name="se_relu"),
        helper.make_node("Gemm", ["g1r", "sew2"], ["g2"], transB=1, name="se_fc2"),
        helper.make_node("Sigmoid", ["g2"], ["g2s"], name="se_sigmoid"),
        helper.make_node("Unsqueeze", ["g2s"], ["gate"], axes=[2, 3], name="se_unsqueeze"),
        helper.make_node("Mul", ["h1", "gate"], ["h2"], name="se_scale"),
        # Split with attribute sizes; the pieces feed different consumers
        helper.make_node("Split", ["h2"], ["sp0", "sp1"], axis=1, split=[5, 3], name="split"),
        helper.make_node("Conv", ["sp0", "wa"], ["ca"], name="conv_a"),
        helper.make_node("Relu", ["sp1"], ["sp1r"], name="relu_b"),
        helper.make_node("Conv", ["sp1r", "wb"], ["cb"], pads=[1, 1, 1, 1], name="conv_b"),
        helper.make_node("Add", ["ca", "cb"], ["ab"], name="merge"),
        # Slice on the channel axis, then a Resize with scales
        helper.make_node("Slice", ["ab", "sl_starts", "sl_ends", "sl_axes"], ["sl"], name="slice"),
        helper.make_node("Resize", ["sl", "roi", "scales"], ["up"], mode="nearest", name="resize"),
        helper.make_node("Conv", ["up", "wc"], ["y"], pads=[1, 1, 1, 1], name="conv_out"),
    ]
    return _save(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 16, 16])], inits,
                 Path(tmp_path) / "paddle_hardswish.onnx", 11, 6)


def opset9_attrs(tmp_path: Path) -> Path:
    """Opset 9 attribute forms: Upsample with a scales input, Slice/Pad with attributes, Clip with
    min/max attributes, Concat + Gather of channels with constant indices, Sum of two tensors."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w0", _w(rng, 6, 3, 3, 3)), ("w1", _w(rng, 4, 3, 3, 3)),
        ("scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32)),
        ("idx", np.array([0, 2, 3, 5, 7, 9], dtype=np.int64)),
        ("w2", _w(rng, 5, 6, 3, 3)), ("w3", _w(rng, 5, 4, 1, 1)),
        ("w4", _w(rng, 3, 5, 3, 3)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Clip", ["c0"], ["r0"], min=0.0, max=6.0, name="relu6"),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Concat", ["r0", "c1"], ["cat"], axis=1, name="concat"),
        helper.make_node("Gather", ["cat", "idx"], ["g"], axis=1, name="gather"),
        helper.make_node("Pad", ["g"], ["pd"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", name="pad"),
        helper.make_node("Conv", ["pd", "w2"], ["c2"], name="conv2"),
        helper.make_node("Slice", ["cat"], ["sl"], starts=[6], ends=[10], axes=[1], name="slice"),
        helper.make_node("Conv", ["sl", "w3"], ["c3"], name="conv3"),
        helper.make_node("Sum", ["c2", "c3"], ["s"], name="sum"),
        helper.make_node("Upsample", ["s", "scales"], ["up"], mode="nearest", name="upsample"),
        helper.make_node("Conv", ["up", "w4"], ["y"], pads=[1, 1, 1, 1], name="conv_out"),
    ]
    return _save(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 3, 16, 16])], inits,
                 Path(tmp_path) / "opset9_attrs.onnx", 9, 4)


def tf_nhwc(tmp_path: Path) -> Path:
    """tf2onnx style: NHWC input transposed around each Conv, channels-last bias Add and BN-like Mul,
    a symbolic batch, and a Reshape to [-1, H*W*C] (channels minor: strided positions) into MatMul."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w0", _w(rng, 6, 3, 3, 3)), ("bias0", _w(rng, 6)), ("scale0", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
        ("w1", _w(rng, 5, 6, 1, 1)), ("bias1", _w(rng, 5)),
        ("shape", np.array([-1, 4 * 4 * 5], dtype=np.int64)), ("fc", _w(rng, 80, 3)), ("fcb", _w(rng, 3)),
    ]]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw0"),
        helper.make_node("Conv", ["xt", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Transpose", ["c0"], ["c0t"], perm=[0, 2, 3, 1], name="to_nhwc0"),
        helper.make_node("Add", ["c0t", "bias0"], ["a0"], name="bias_add0"),
        helper.make_node("Mul", ["a0", "scale0"], ["m0"], name="scale0_mul"),
        helper.make_node("Relu", ["m0"], ["r0"], name="relu0"),
        helper.make_node("Transpose", ["r0"], ["r0t"], perm=[0, 3, 1, 2], name="to_nchw1"),
        helper.make_node("Conv", ["r0t", "w1"], ["c1"], strides=[2, 2], name="conv1"),
        helper.make_node("Transpose", ["c1"], ["c1t"], perm=[0, 2, 3, 1], name="to_nhwc1"),
        helper.make_node("Add", ["c1t", "bias1"], ["a1"], name="bias_add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["r1", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["mm"], name="fc_matmul"),
        helper.make_node("Add", ["mm", "fcb"], ["y"], name="fc_bias"),
    ]
    return _save(nodes, [_vi("x", ["N", 8, 8, 3])], [_vi("y", ["N", 3])], inits, Path(tmp_path) / "tf_nhwc.onnx", 13, 8)


HELPER_GRAPHS: dict[str, Callable[[Path], Path]] = {
    "caffe2_sum": caffe2_sum,
    "paddle_hardswish": paddle_hardswish,
    "opset9_attrs": opset9_attrs,
    "tf_nhwc": tf_nhwc,
}


# ----------------------------------------------------------------------------------- oracle helpers


def random_plan(analysis, rng: np.random.Generator, fraction: float = 0.5, groups=None) -> dict[int, np.ndarray]:
    """Remove about ``fraction`` of the channels of every prunable group (or of ``groups``), keeping
    the blocks balanced and every ``keep_one_of`` set non-empty."""
    plan = {}
    for g in (analysis.prunable if groups is None else groups):
        width = g.size // g.blocks
        n_keep = max(1, width - int(round(width * fraction)))
        for _ in range(100):
            kept = np.sort(np.concatenate([b * width + rng.choice(width, n_keep, replace=False)
                                           for b in range(g.blocks)]))
            ks = set(kept.tolist())
            if all(ks & set(s) for s in g.keep_one_of):
                break
        else:
            kept = np.arange(g.size)
        plan[g.id] = kept
    return plan


def zero_removed_inputs(model: onnx.ModelProto, analysis, plan, stored_as=None) -> onnx.ModelProto:
    """A copy of ``model`` where every "in" member slice of a removed channel is zero: the removed
    channels then contribute nothing to any output, so pruning them must not change the outputs.
    ``stored_as(graph, tensor)``: the initializer that holds a member's values (a QDQ weight's int8
    tensor); default: the member's own tensor."""
    from onnxprune.channels.slices import zero_channels

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    arrays = {}
    for g in analysis.groups:
        if g.id not in plan:
            continue
        removed = np.setdiff1d(np.arange(g.size), plan[g.id])
        for m in g.members_with_role("in"):
            name = stored_as(out.graph, m.tensor) if stored_as else m.tensor
            arrays[name] = zero_channels(arrays.get(name, numpy_helper.to_array(inits[name])), m, removed)
    for name, a in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(a, name))
    return out
