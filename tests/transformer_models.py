"""Small transformers as real exporters write them, for the transformer tests.

- :class:`BertLike`: a BERT-style sentence encoder (token + position embeddings, post-LN layers with
  the Hugging Face head split that reads its sizes at run time, attention mask, GELU FFN, masked
  mean pooling and L2 normalisation), exported by the TorchScript exporter at opset 17 with dynamic
  batch and sequence axes (:func:`export_bert`);
- :func:`train_bert`: a few seconds of training on a generated sequence task (is token 1 in the
  sequence more often than token 2?), so the weights are not random;
- :class:`PackedViT`: ``nn.MultiheadAttention`` blocks (one packed in-projection), torchvision's ViT.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

VOCAB = 12


class BertSelfAttention(nn.Module):
    """Hugging Face's BertSelfAttention: sizes of the head split read from the tensor at run time."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dense = nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size()[:-1] + (self.heads, self.dh)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return self.dense(ctx.view(ctx.size()[:-2] + (self.heads * self.dh,)))


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.attn = BertSelfAttention(d, heads)
        self.ln1 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x, mask_bias):
        x = self.ln1(x + self.attn(x, mask_bias))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertLike(nn.Module):
    """Sentence encoder: ``(input_ids, attention_mask) -> L2-normalised mean-pooled embedding``."""

    def __init__(self, d: int = 16, heads: int = 4, ffn: int = 32, layers: int = 2, max_len: int = 32):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(BertLayer(d, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, :input_ids.size(1)]  # as Hugging Face's BertEmbeddings
        x = self.ln(self.tok(input_ids) + self.pos(pos))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def sequence_task(n: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated task: random tokens with padding at the end; label = token 1 outnumbers token 2."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, seq))
    lengths = rng.integers(seq // 2, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # padding token 0
    labels = ((ids == 1).sum(1) > (ids == 2).sum(1)).astype(np.int64)
    return ids.astype(np.int64), mask, labels


def train_bert(model: BertLike, steps: int = 60, seq: int = 12, seed: int = 0) -> BertLike:
    """A few seconds of training with a linear probe on the embedding (the probe is thrown away)."""
    torch.manual_seed(seed)
    ids, mask, y = (torch.from_numpy(a) for a in sequence_task(256, seq, seed))
    probe = nn.Linear(model.ln.normalized_shape[0], 2)
    opt = torch.optim.Adam(list(model.parameters()) + list(probe.parameters()), lr=3e-3)
    for step in range(steps):
        b = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = F.cross_entropy(probe(model(ids[b], mask[b]) * 4), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_bert(model: nn.Module, path: str | Path, seq: int = 8, opset: int = 17) -> Path:
    """TorchScript exporter (``dynamo=False``), dynamic batch and sequence axes, int64 inputs."""
    path = Path(path)
    ids, mask, _ = sequence_task(2, seq)
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(path), dynamo=False,
                          opset_version=opset, input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "embedding": {0: "batch"}})
    return path


def bert_feeds(batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    ids, mask, _ = sequence_task(batch, seq, seed)
    return {"input_ids": ids, "attention_mask": mask}


class PackedBlock(nn.Module):
    """A pre-LN ViT block as torchvision writes it: ``nn.MultiheadAttention`` (one packed q/k/v
    in-projection, batch first) and an MLP."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class PackedViT(nn.Module):
    """Tiny ViT on 8x8 digits: 2x2 patches (Conv stem), class token, position embedding, blocks."""

    def __init__(self, d: int = 16, heads: int = 4, mlp: int = 32, layers: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, d, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*(PackedBlock(d, heads, mlp) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])
