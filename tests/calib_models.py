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


def train_digits_cnn(seed: int = 0, epochs: int = 6, fold_bn: bool = False, with_train_labels: bool = False):
    """A BN CNN trained on digits: (onnx model, x_train, x_test, y_test[, y_train])."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only contend
    x, y = digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
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
        from onnxprune.core.normalize import normalize

        model = normalize(model, fold_bn=True)
    return (model, x[tr], x[te], y[te]) + ((y[tr],) if with_train_labels else ())


def _fit(net, inputs, target_fn, epochs: int, lr: float = 3e-3, batch: int = 64, seed: int = 0):
    """Train ``net`` (torch) on arrays ``inputs`` against ``target_fn(net outputs, batch index)`` loss."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    opt = torch.optim.Adam(net.parameters(), lr)
    tensors = [torch.from_numpy(a) for a in inputs]
    n = len(tensors[0])
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            b = perm[i:i + batch]
            opt.zero_grad()
            target_fn(net(*[t[b] for t in tensors]), b).backward()
            opt.step()
    net.eval()


def blobs(n: int, seed: int = 0, size: int = 16):
    """Images of 1-3 bright squares on noise: (x [n,1,size,size], mask [n,size,size] int64, count [n,1])."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.2, (n, 1, size, size)).astype(np.float32)
    mask = np.zeros((n, size, size), np.int64)
    count = np.zeros((n, 1), np.float32)
    for i in range(n):
        k = rng.integers(1, 4)
        count[i] = k
        for _ in range(k):
            s = rng.integers(3, 6)
            r, c = rng.integers(0, size - s, 2)
            x[i, 0, r:r + s, c:c + s] += 1.0
            mask[i, r:r + s, c:c + s] = 1
    return x, mask, count


def train_dense_prediction(seed: int = 0, epochs: int = 6):
    """A segmentation-style net with two outputs (per-pixel class scores 'seg' and a blob count 'count'),
    trained on generated blobs; BatchNorm folded into the convs (as deployed exports often are).
    Returns (onnx model, x_calibration, x_test, mask_test)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.seg = nn.Conv2d(32, 2, 1)
            self.count = nn.Linear(32, 1)

        def forward(self, x):
            f = self.body(x)
            return self.seg(f), self.count(f.mean((2, 3)))

    torch.manual_seed(seed)
    x, mask, count = blobs(600, seed, size=12)
    net = Net()
    mt, ct = torch.from_numpy(mask), torch.from_numpy(count)

    def loss(out, b):
        seg, cnt = out
        return nn.functional.cross_entropy(seg, mt[b]) + 0.1 * nn.functional.mse_loss(cnt, ct[b])

    _fit(net, [x], loss, epochs, seed=seed)
    from onnxprune.core.normalize import normalize

    model = normalize(_export(net, torch.zeros(1, 1, 12, 12), outputs=("seg", "count")), fold_bn=True)
    xt, mt_test, _ = blobs(200, seed + 1, size=12)
    return model, x[:256], xt, mt_test


def train_two_input(seed: int = 0, epochs: int = 10):
    """A two-input regression model: an 8x8 image branch (conv) and a feature vector branch, joined.
    Returns (onnx model, calibration inputs dict, test inputs dict)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.img = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.vec = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, img, vec):
            return self.head(torch.cat([self.img(img), self.vec(vec)], 1))

    torch.manual_seed(seed)
    xi, _ = digits()
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(len(xi), 6)).astype(np.float32)
    target = np.stack([xi.mean((1, 2, 3)) * 4 + v[:, 0], np.sin(v[:, 1]) + xi[:, 0, :4].mean((1, 2)),
                       v[:, 2] * v[:, 3]], 1).astype(np.float32)
    net = Net()
    tt = torch.from_numpy(target)
    _fit(net, [xi, v], lambda out, b: nn.functional.mse_loss(out, tt[b]), epochs, seed=seed)
    model = _export(net, (torch.zeros(1, 1, 8, 8), torch.zeros(1, 6)), names=("img", "vec"))
    return model, {"img": xi[:256], "vec": v[:256]}, {"img": xi[1400:], "vec": v[1400:]}


def train_scaled_mlp(seed: int = 0, epochs: int = 15):
    """An MLP whose 16 input features span scales from 0.05 to 20 (as outlier features do):
    (onnx model, x_calibration, x_test). Magnitude alone misjudges weights on such inputs; wanda does not."""
    import torch
    from torch import nn

    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.05, 20, 16).astype(np.float32)
    rng.shuffle(scales)
    z = rng.normal(size=(2000, 16)).astype(np.float32)
    x = z * scales
    target = np.stack([np.tanh(z[:, :8].sum(1) / 3), np.tanh(z[:, 8:].sum(1) / 3), z[:, 0] * z[:, 1]], 1).astype(np.float32)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    tt = torch.from_numpy(target)
    _fit(net, [x], lambda out, b: nn.functional.mse_loss(out, tt[b]), epochs, seed=seed)
    return _export(net, torch.zeros(1, 16)), x[:512], x[1500:]


def train_deep_resnet(seed: int = 0, blocks: int = 15, width: int = 12, epochs: int = 3):
    """A narrow ResNet on digits: a stem conv and ``blocks`` basic blocks (two 3x3 convs, BatchNorm,
    identity shortcut): ``1 + 2 * blocks`` convs (31 by default). Returns (onnx model, x_train, x_test)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

        def forward(self, x):
            return torch.relu(x + self.f(x))

    torch.manual_seed(seed)
    x, y = digits()
    idx = np.random.default_rng(seed).permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                        *[Block() for _ in range(blocks)], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    yt = torch.from_numpy(y[tr])
    _fit(net, [x[tr]], lambda out, b: nn.functional.cross_entropy(out, yt[b]), epochs, seed=seed)
    return _export(net, torch.zeros(1, 1, 8, 8)), x[tr], x[te]


def token_batches(n: int, seed: int = 0, seq: int = 32, vocab: int = 40):
    """Token sequences of 3-8 real tokens padded to ``seq`` (id 0, mask 0): (ids, mask, target [n, 2])."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, seq), np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i in range(n):
        k = rng.integers(3, 9)
        ids[i, :k] = rng.integers(1, vocab, k)
        mask[i, :k] = 1
    v = (ids % 7).astype(np.float32) * mask
    target = np.stack([v.sum(1) / mask.sum(1), (v > 3).sum(1) / mask.sum(1)], 1).astype(np.float32)
    return ids, mask, target


def train_masked_encoder(seed: int = 0, epochs: int = 12, seq: int = 32):
    """A transformer-ish token model: token + position embedding, a per-token FFN (Linear-ReLU-Linear,
    residual), masked mean pooling over real tokens, a Linear head; inputs int64 ``input_ids`` and
    ``attention_mask`` [batch, seq]. Trained on generated sequences where most positions are padding.
    Returns (onnx model, calibration inputs, test inputs)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(40, 16)
            self.pos = nn.Embedding(seq, 16)
            self.ffn = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
            self.head = nn.Linear(16, 2)

        def forward(self, input_ids, attention_mask):
            h = self.tok(input_ids) + self.pos.weight[None, : input_ids.shape[1]]
            h = h + self.ffn(h)
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(seed)
    ids, mask, target = token_batches(1200, seed, seq)
    net = Net()
    tt = torch.from_numpy(target)
    _fit(net, [ids, mask], lambda out, b: nn.functional.mse_loss(out, tt[b]), epochs, seed=seed)
    model = _export(net, (torch.zeros(1, seq, dtype=torch.long), torch.ones(1, seq, dtype=torch.long)),
                    names=("input_ids", "attention_mask"))
    ti, tm, _ = token_batches(300, seed + 1, seq)
    return model, {"input_ids": ids[:256], "attention_mask": mask[:256]}, {"input_ids": ti, "attention_mask": tm}
