"""Tiny random-init Hugging Face ``transformers`` models and their exports with both torch exporters.

Built from configs (nothing downloaded); each is wrapped so the export has named tensor inputs
and one output, with dynamic batch and sequence (batch only for the ViT's image).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 32, 2, 4, 2, 64, 100
IMAGE, PATCH = 16, 4


class _Text(nn.Module):
    """BERT: ``input_ids``, ``attention_mask``, ``token_type_ids`` -> last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


class _Image(nn.Module):
    """ViT: ``pixel_values`` -> last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


class _Causal(nn.Module):
    """Llama without a cache: ``input_ids``, ``attention_mask`` -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def build(name: str) -> nn.Module:
    """The wrapped random-init model ``bert``, ``vit`` or ``llama`` (GQA: fewer KV than query heads)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **common)
        cfg._attn_implementation = "eager"
        return _Text(tf.BertModel(cfg, add_pooling_layer=False)).eval()
    if name == "vit":
        cfg = tf.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, **common)
        cfg._attn_implementation = "eager"
        return _Image(tf.ViTModel(cfg, add_pooling_layer=False)).eval()
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=KV_HEADS,
                             use_cache=False, **common)
        cfg._attn_implementation = "eager"
        return _Causal(tf.LlamaForCausalLM(cfg)).eval()
    raise ValueError(name)


def input_names(name: str) -> list[str]:
    return {"bert": ["input_ids", "attention_mask", "token_type_ids"], "vit": ["pixel_values"],
            "llama": ["input_ids", "attention_mask"]}[name]


def feeds(name: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ONNX Runtime: ``seq`` tokens (the ViT's image has a fixed size), some padding."""
    rng = np.random.default_rng(seed)
    if name == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0  # padding at the end of the first row
    out = {"input_ids": rng.integers(1, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}
    if name == "bert":
        out["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return out


def shapes(name: str, seq: int = 16) -> dict[str, tuple[int, ...]]:
    """The ``--input-shape`` a user gives: one input only (the others share its symbolic dims)."""
    return {"pixel_values": (1, 3, IMAGE, IMAGE)} if name == "vit" else {"input_ids": (1, seq)}


def export(name: str, path: str | Path, *, dynamo: bool) -> Path:
    """Export with TorchScript (opset 17) or dynamo (opset 18), dynamic batch (and sequence)."""
    model, names = build(name), input_names(name)
    args = tuple(torch.from_numpy(v) for v in feeds(name, 2, 8).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("sequence", min=2, max=64)
            dims = {n: ({0: batch} if n == "pixel_values" else {0: batch, 1: seq}) for n in names}
            torch.onnx.export(model, args, str(path), dynamo=True, opset_version=18, input_names=names,
                              output_names=["output"], dynamic_shapes=dims, verbose=False)
        else:
            axes = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["output"], dynamic_axes={**axes, "output": {0: "batch"}})
    return Path(path)
