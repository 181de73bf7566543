"""Optimum's exports through onnxprune (a check, not a test): tiny random-init Hugging Face models
(BERT, ViT, a Llama with grouped-query attention, with and without a KV cache) exported by
Optimum's ``main_export`` as ``optimum-cli export onnx`` does, then analysed, pruned to half the
channels of every prunable group, and proven exact by the zeroed-channel oracle at two batch and
sequence sizes (the pruned model's outputs equal the original's with the removed channels' input
slices zeroed).

Not in the test suite: optimum-onnx 0.1.0 needs transformers < 5, the tests' exporters extra
installs 5. Run it in a venv of its own:

    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 "optimum-onnx==0.1.0" \\
        "transformers<5" -e . && /tmp/optvenv/bin/python bench/check_optimum.py

Prints per model: prunable groups (default flags; --prune-hidden; --allow-io-change), MACs dense ->
pruned at --ratio 0.5 and the oracle's largest relative error. Exits 1 when an oracle error exceeds
1e-4. Counts, not timings: the same on any machine.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from arch_zoo import zero_removed_inputs  # noqa: E402
from onnxprune.channels import analyze_channels  # noqa: E402
from onnxprune.channels.rewrite import apply_plan  # noqa: E402
from onnxprune.core.prepare import prepare  # noqa: E402
from onnxprune.structured.prune import prune_structured  # noqa: E402

PAST, KV, HEAD_DIM = 5, 2, 8
Feeds = Callable[[int, int], dict[str, np.ndarray]]


def _models(tmp: Path) -> dict[str, Path]:
    import torch
    from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
                              ViTForImageClassification)
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    BertModel(BertConfig(vocab_size=100, max_position_embeddings=64, **small)).save_pretrained(tmp / "bert")
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_labels=5, **small)).save_pretrained(tmp / "vit")
    LlamaForCausalLM(LlamaConfig(vocab_size=100, max_position_embeddings=64, num_key_value_heads=KV,
                                 **small)).save_pretrained(tmp / "llama")
    return {"bert": tmp / "bert", "vit": tmp / "vit", "llama": tmp / "llama"}


def _export(src: Path, task: str, out: Path) -> Path:
    from optimum.exporters.onnx import main_export
    main_export(str(src), out, task=task, opset=17, do_validation=False)
    return out / "model.onnx"


def _ids(b: int, s: int) -> np.ndarray:
    return np.random.default_rng(b * 100 + s).integers(1, 99, (b, s)).astype(np.int64)


def _text(b: int, s: int) -> dict[str, np.ndarray]:
    return {"input_ids": _ids(b, s), "attention_mask": np.ones((b, s), np.int64),
            "token_type_ids": np.zeros((b, s), np.int64)}


def _image(b: int, s: int) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(b).standard_normal((b, 3, 16, 16)).astype(np.float32)}


def _decoder(b: int, s: int) -> dict[str, np.ndarray]:
    return {"input_ids": _ids(b, s), "attention_mask": np.ones((b, s), np.int64), "position_ids": np.tile(np.arange(s), (b, 1))}


def _cached(b: int, s: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(b + s)
    feeds = {"input_ids": _ids(b, s), "attention_mask": np.ones((b, PAST + s), np.int64),
             "position_ids": np.tile(np.arange(PAST, PAST + s), (b, 1))}
    feeds.update({f"past_key_values.{layer}.{k}": rng.standard_normal((b, KV, PAST, HEAD_DIM)).astype(np.float32)
                  for layer in (0, 1) for k in ("key", "value")})
    return feeds


def _shapes(feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in feeds.items()}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def oracle_error(path: Path, shapes, feeds_for: Feeds, sizes, allow_io: bool) -> tuple[int, float]:
    """Half of every exact prunable group removed at random: (groups, largest relative error of
    the pruned outputs against the original with those channels zeroed)."""
    prep = prepare(str(path), shapes)
    an = analyze_channels(prep.view, allow_io_change=allow_io)
    rng = np.random.default_rng(0)
    plan = {g.id: np.sort(rng.choice(g.size, g.size // 2, replace=False)) for g in an.prunable if g.exact}
    pruned, zeroed = apply_plan(prep.model, an, plan), zero_removed_inputs(prep.model, an, plan)
    kept = {m.tensor: m.positions.of_channels(plan[g.id]) for g in an.prunable if g.id in plan
            for m in g.members if m.tensor in an.io}
    worst = 0.0
    for b, s in sizes:
        feeds = feeds_for(b, s)
        ref = _run(zeroed, feeds)
        out = _run(pruned, {k: (v[:, kept[k]] if k in kept else v) for k, v in feeds.items()})
        for o, r, p in zip(prep.model.graph.output, ref, out):
            r = r[:, kept[o.name]] if o.name in kept else r
            worst = max(worst, float(np.abs(r - p).max() / (np.abs(r).max() + 1e-12)))
    return len(plan), worst


def main() -> int:
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        src = _models(Path(tmp))
        cases = [("BERT feature-extraction", src["bert"], "feature-extraction", _text, ((1, 16), (3, 13)), False),
                 ("ViT image-classification", src["vit"], "image-classification", _image, ((1, 16), (3, 16)), False),
                 ("Llama GQA text-generation", src["llama"], "text-generation", _decoder, ((1, 8), (3, 13)), False),
                 ("Llama GQA text-generation-with-past", src["llama"], "text-generation-with-past", _cached,
                  ((1, 1), (2, 7)), True)]
        for name, model_dir, task, feeds_for, sizes, cache in cases:
            path = _export(model_dir, task, Path(tmp) / f"{model_dir.name}-{task}")
            shapes = _shapes(feeds_for(*sizes[0]))
            counts = []
            for flags in ({}, {"prune_hidden": True}, {"allow_io_change": True}):
                an = analyze_channels(prepare(str(path), shapes).view, **flags)
                counts.append(f"{len(an.prunable)}/{len(an.groups)}")
            r = prune_structured(str(path), ratio=0.5, input_shapes=shapes, allow_io_change=cache)
            s = r.summary
            groups, err = oracle_error(path, shapes, feeds_for, sizes, cache)
            failed |= err > 1e-4
            print(f"{name}: prunable groups {counts[0]} (--prune-hidden {counts[1]}, --allow-io-change {counts[2]}); "
                  f"--ratio 0.5{' --allow-io-change' if cache else ''}: MACs {s['macs_before']} -> {s['macs_after']} "
                  f"({s['macs_reduction']:.2f}x), {len(s.get('io_changes') or [])} input/output shapes changed; "
                  f"oracle over {groups} groups at {list(sizes)}: max rel. error {err:.1e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
