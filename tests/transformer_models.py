"""Small transformers as real exporters write them, for the transformer tests.

- :class:`BertLike`: a BERT-style sentence encoder (token + position embeddings, post-LN layers with
  the Hugging Face head split that reads its sizes at run time, attention mask, GELU FFN, masked
  mean pooling and L2 normalisation), exported by the TorchScript exporter at opset 17 with dynamic
  batch and sequence axes (:func:`export_bert`);
- :func:`train_bert`: a few seconds of training on a generated sequence task (is token 1 in the
  sequence more often than token 2?), so the weights are not random;
- :class:`PackedViT`: ``nn.MultiheadAttention`` blocks (one packed in-projection), torchvision's ViT,
  exported by :func:`export_vit`;
- :class:`TinyLlama`: a Llama/Qwen-style decoder (RoPE, grouped-query attention, SwiGLU), exported
  by :func:`export_llama`; :func:`rule_language` generates a language for it to learn.
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


def export_vit(model: PackedViT, path: str | Path, opset: int = 17) -> Path:
    """TorchScript export, dynamic batch, input ``x`` (N x 1 x 8 x 8) -> ``logits``. With gradients
    on, as torchvision's export: under ``no_grad`` torch takes ``nn.MultiheadAttention``'s fused fast path."""
    path = Path(path)
    torch.onnx.export(model.eval(), (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int = 64,
                     lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam on cross-entropy over shuffled minibatches, the learning rate decayed linearly to zero
    (a steadier end point from seed to seed); a few seconds for the tiny models here."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    perm = torch.randperm(len(xt))
    for step in range(steps):
        start = (step * batch) % len(xt)
        if start + batch > len(xt):
            perm, start = torch.randperm(len(xt)), 0
        b = perm[start:start + batch]
        loss = F.cross_entropy(model(xt[b]).flatten(0, -2), yt[b].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class GQABlock(nn.Module):
    """A Llama/Qwen decoder layer as Hugging Face writes it: RMSNorm, q/k/v projections with
    grouped-query attention (``kv_heads`` shared by ``heads // kv_heads`` query heads, repeated with
    ``repeat_kv``), rotary position embedding, causal mask, optional KV cache, SwiGLU MLP."""

    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, heads * self.dh, bias=False)
        self.k = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.v = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.o = nn.Linear(heads * self.dh, d, bias=False)
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, dh = x.shape
        n = self.heads // self.kv
        return x[:, :, None, :, :].expand(b, h, n, s, dh).reshape(b, h * n, s, dh)

    def forward(self, x, cos, sin, mask, past=None):
        b, s, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, s, -1, self.dh).transpose(1, 2)
        k = self.k(h).view(b, s, -1, self.dh).transpose(1, 2)
        v = self.v(h).view(b, s, -1, self.dh).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        present = (k, v)
        att = torch.matmul(q, self.repeat_kv(k).transpose(2, 3)) / math.sqrt(self.dh) + mask
        y = torch.matmul(torch.softmax(att, -1), self.repeat_kv(v)).transpose(1, 2).reshape(b, s, -1)
        x = x + self.o(y)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), present


class TinyLlama(nn.Module):
    """Decoder-only LM: ``input_ids -> logits`` (``cache=True``: past keys/values of every layer in,
    present ones out, as Optimum's ``decoder_with_past`` exports)."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2, ffn: int = 32, layers: int = 2,
                 cache: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(GQABlock(d, heads, kv_heads, ffn) for _ in range(layers))
        self.norm, self.lm_head = RMSNorm(d), nn.Linear(d, VOCAB, bias=False)
        self.dh, self.cache = d // heads, cache
        inv = 1.0 / (10000 ** (torch.arange(0, self.dh, 2).float() / self.dh))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids, *past):
        s = input_ids.shape[1]
        p = past[0].shape[2] if past else 0
        pos = torch.arange(p, p + s, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.triu(torch.full((s, p + s), -1e4), diagonal=p + 1)[None, None]
        x = self.embed(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, pr = layer(x, cos, sin, mask, (past[2 * i], past[2 * i + 1]) if past else None)
            presents.extend(pr)
        logits = self.lm_head(self.norm(x))
        return (logits, *presents) if self.cache else logits


def export_llama(model: TinyLlama, path: str | Path, seq: int = 6, past_len: int = 3) -> Path:
    """TorchScript export at opset 17, dynamic batch/sequence (and past length with a cache)."""
    path = Path(path)
    ids = torch.randint(1, VOCAB, (2, seq))
    names, axes, args = ["input_ids"], {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}, [ids]
    outs = ["logits"]
    if model.cache:
        kv = model.layers[0].kv
        for i in range(len(model.layers)):
            for t in ("key", "value"):
                names.append(f"past_key_values.{i}.{t}")
                outs.append(f"present.{i}.{t}")
                axes[names[-1]] = {0: "batch", 2: "past_sequence"}
                axes[outs[-1]] = {0: "batch", 2: "total_sequence"}
                args.append(torch.randn(2, kv, past_len, model.dh))
    with torch.no_grad():
        torch.onnx.export(model, tuple(args), str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=outs, dynamic_axes=axes)
    return path


def rule_language(n: int, seq: int, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Generated sequences over tokens 1..VOCAB-1: each next token is a fixed function of the two
    before it, ``(3 * a + b) mod (VOCAB - 1) + 1``, replaced by a random token with probability
    ``noise``. Reading two positions back takes attention, not only the current token."""
    rng = np.random.default_rng(seed)
    k = VOCAB - 1
    ids = np.empty((n, seq), np.int64)
    ids[:, :2] = rng.integers(1, VOCAB, (n, 2))
    for t in range(2, seq):
        rule = (3 * ids[:, t - 1] + ids[:, t - 2]) % k + 1
        ids[:, t] = np.where(rng.random(n) < noise, rng.integers(1, VOCAB, n), rule)
    return ids


class WhisperAttention(nn.Module):
    """Hugging Face's WhisperAttention without a mask: k_proj has no bias, the head split is
    ``view(b, t, heads, dh)`` with ``b, t`` read from the tensor at run time."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.size()
        split = lambda y: y.view(b, t, self.heads, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x) * self.dh ** -0.5), split(self.k_proj(x)), split(self.v_proj(x))
        ctx = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * self.dh))


class WhisperLayer(nn.Module):
    """Pre-LN encoder layer: ``x + attn(ln(x))``, then ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = WhisperAttention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2, self.final_layer_norm = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperLikeEncoder(nn.Module):
    """Whisper's audio encoder: log-mel ``input_features [B, n_mels, frames]`` -> Conv1d stem (the
    second conv halves the frames) -> positional table sliced to the run-time length -> pre-LN
    layers -> final LayerNorm -> ``last_hidden_state [B, frames // 2, d]``."""

    def __init__(self, n_mels: int = 8, d: int = 16, heads: int = 4, ffn: int = 32, layers: int = 2,
                 max_positions: int = 64):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(max_positions, d)
        self.layers = nn.ModuleList(WhisperLayer(d, heads, ffn) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(input_features)))).permute(0, 2, 1)
        x = x + self.embed_positions.weight[:x.size(1)]  # as WhisperEncoder, for any length up to the table's
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


def hf_whisper_encoder(n_mels: int = 8, d: int = 16, heads: int = 4, ffn: int = 32, layers: int = 2,
                       frames: int = 32) -> nn.Module:
    """Hugging Face's ``WhisperEncoder`` from a tiny config (it takes exactly ``frames`` mel frames),
    every weight random: the dynamo exporter merges identical initializers, so the zero biases and
    unit norms of a fresh init would make layers share them, as trained weights never do."""
    from transformers import WhisperConfig  # optional: the exporters extra
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=n_mels, d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                        encoder_ffn_dim=ffn, max_source_positions=frames // 2, decoder_layers=1,
                        decoder_attention_heads=heads, decoder_ffn_dim=ffn)
    enc = WhisperEncoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc


def export_whisper(model: nn.Module, path: str | Path, frames: int = 32, n_mels: int = 8, opset: int = 17,
                   dynamo: bool = False, dynamic_frames: bool = True) -> Path:
    """``input_features [batch, n_mels, frames] -> last_hidden_state``, dynamic batch (and frames,
    unless ``dynamic_frames=False``: Hugging Face's encoder takes one length only). TorchScript by
    default; ``dynamo=True`` needs onnxscript. A Hugging Face ``WhisperEncoder`` returns a
    ``BaseModelOutput``: its first field is exported."""
    path = Path(path)

    class _First(nn.Module):
        def __init__(self, m: nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x)
            return out if isinstance(out, torch.Tensor) else out[0]

    x = torch.randn(2, n_mels, frames)
    if dynamo:
        dims = {0: torch.export.Dim("batch"), **({2: torch.export.Dim("frames", max=4096)} if dynamic_frames else {})}
        kw = {"dynamic_shapes": {"x": dims}}
    else:
        kw = {"dynamic_axes": {"input_features": {0: "batch", **({2: "frames"} if dynamic_frames else {})},
                               "last_hidden_state": {0: "batch", **({1: "time"} if dynamic_frames else {})}}}
    with torch.no_grad():
        torch.onnx.export(_First(model).eval(), (x,), str(path), dynamo=dynamo, opset_version=opset,
                          input_names=["input_features"], output_names=["last_hidden_state"], **kw)
    return path
