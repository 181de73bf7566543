"""Mask rearrangement benchmark (not a test): does ``--mask-rearrangement`` keep the dense output
better than the diagonal Fisher choice it starts from?

    python bench/bench_mask_rearrangement.py                       # seeds 0 1 2, ratios 0.5 0.75
    python bench/bench_mask_rearrangement.py --draws 512 --batch 1  # more random projections

For each seed a BERT-style encoder (2 layers, hidden 32, 8 heads of 4, FFN 64; the one of
tests/test_transformer_importance.py) is trained on the generated token task, exported, and pruned
at each ratio with the criteria l1, activation, fisher and fisher + rearrangement on 128 unlabeled
sequences of 12 tokens, calibration method ``none`` (the choice alone is compared). Printed: relative
L2 and mean cosine of the embeddings to dense on 32 held-out sequences, and the groups the
rearrangement changed. The figures are exact functions of the seeds (no timing): any machine
gives the same ones, up to torch's CPU kernels.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from transformer_models import BertLike, export_bert, sequence_task, train_bert  # noqa: E402
from onnxprune.calibration import StructuredCalibration  # noqa: E402
from onnxprune.calibration import fisher as fisher_module  # noqa: E402
from onnxprune.calibration.collect import run  # noqa: E402
from onnxprune.structured.prune import prune_structured  # noqa: E402

D, HEADS, FFN, LAYERS, SEQ = 32, 8, 64, 2, 12
SHAPES = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}
VARIANTS = (("l1", False), ("activation", False), ("fisher", False), ("fisher", True))


def _embedding(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(run(model, feeds).values()))


def _fidelity(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float(cos.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--draws", type=int, default=fisher_module.DRAWS, help="random projections in all (fisher)")
    ap.add_argument("--batch", type=int, default=fisher_module.BATCH, help="samples per fisher forward pass")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fisher_module.DRAWS, fisher_module.BATCH = args.draws, args.batch
    print(f"draws {args.draws}, batch {args.batch}; rel_l2 / mean cosine to dense on 32 held-out sequences")
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            torch.manual_seed(seed)
            path = export_bert(train_bert(BertLike(D, HEADS, FFN, LAYERS), steps=100, seq=SEQ, seed=seed),
                               Path(tmp) / f"enc{seed}.onnx")
            ids, mask, _ = sequence_task(160, SEQ, seed=5 + seed)
            cal = {"input_ids": ids[:128], "attention_mask": mask[:128]}
            held_out = {"input_ids": ids[128:], "attention_mask": mask[128:]}
            ref = _embedding(onnx.load(path), held_out)
            for ratio in args.ratios:
                cells = []
                for criterion, rearrange in VARIANTS:
                    r = prune_structured(str(path), ratio=ratio, criterion=criterion, input_shapes=SHAPES,
                                         calibration=StructuredCalibration(cal, method="none"), rearrange=rearrange)
                    rel, cos = _fidelity(_embedding(r.model, held_out), ref)
                    name = criterion + (" + rearrangement" if rearrange else "")
                    totals.setdefault(name, []).append(rel)
                    changed = f" (groups changed {r.summary['mask_rearrangement']['groups_changed']})" if rearrange else ""
                    cells.append(f"{name} {rel:.3f}/{cos:.3f}{changed}")
                print(f"seed {seed} ratio {ratio:g}: " + " | ".join(cells), flush=True)
    print("mean rel_l2: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
