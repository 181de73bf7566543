"""Small trained models for the calibration tests (trained here in seconds, exported to ONNX)."""
from __future__ import annotations

import io

import numpy as np
import onnx


def _export(net, example, names=("x",), outputs=("y",)):
    import torch

    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(net, example, buf, input_names=list(names), output_names=list(outputs), opset_version=13,
                      dynamic_axes={n: {0: "batch"} for n in list(names) + list(outputs)}, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def digits():
    """(x [N,1,8,8] float32 in [0,1], y) of scikit-learn's digits, shipped with onnxprune."""
    from onnxprune.datasets import load_dataset

    ds = load_dataset("digits")
    xs = [ds.train.x, ds.val.x, ds.test.x]
    ys = [ds.train.y, ds.val.y, ds.test.y]
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def train_digits_cnn(seed: int = 0, epochs: int = 30, fold_bn: bool = False):
    """A BN CNN trained on digits: (onnx model, x_train, x_test, y_test)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    model = _export(net, torch.zeros(1, 1, 8, 8))
    if fold_bn:
        from onnxprune.normalize import normalize

        model = normalize(model, fold_bn=True)
    return model, x[tr], x[te], y[te]
