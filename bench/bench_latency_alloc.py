"""Latency-aware allocation benchmark (not a test): HALP-style allocation vs uniform-MACs allocation.

    python bench/bench_latency_alloc.py                    # MobileNetV2 and ResNet-50, 1x3x224x224
    python bench/bench_latency_alloc.py --models mobilenetv2 --size 160 --json out.json

For each model (bench/nets.py, seeded weights), on ONNX Runtime CPU with one thread:

- latency-aware: ``prune_for_latency(..., target_speedup=2.0, macs_weight=W)`` for each W of
  ``--macs-weights`` (per-layer latency tables measured on the profile, greedy knapsack over the
  groups charging each step the L1 importance it loses plus W x the fraction of MACs it removes,
  per ms saved; verified and corrected by interleaved measurements);
- uniform-MACs: ``prune_structured(target_macs=0.5, round_to=8)`` (the same ratio in every group,
  searched to halve the MACs): what one asks for without latency tables.

Both are then timed again interleaved with the dense model (``compare_models``, D P D P ...), and
the bench prints importance kept (sum of the kept channels' L1 scores, each group normalized by
its mean, as the allocator ranks them), MACs reduction, measured p50 speedup and speedup / MACs
reduction (goal >= 1.0). No accuracy: these models are untrained (no data set is at hand here).
The table measuring time is printed too; a second run reads the tables from the cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nets import MODELS, build  # noqa: E402 - bench/ is on sys.path when a script here runs
from onnxprune.channels.analyze import analyze_channels  # noqa: E402
from onnxprune.core.model_io import save_model  # noqa: E402
from onnxprune.core.prepare import prepare  # noqa: E402
from onnxprune.profiling import compare_models  # noqa: E402
from onnxprune.profiling.hw_profile import profile_from_dict  # noqa: E402
from onnxprune.structured.allocate import global_scores  # noqa: E402
from onnxprune.structured.importance import ScoreInputs, score_groups  # noqa: E402
from onnxprune.structured.latency_alloc import MACS_WEIGHT, prune_for_latency  # noqa: E402
from onnxprune.structured.prune import prune_structured  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402


def importance_kept(dense: Path, summary: dict) -> float:
    """Fraction of the normalized L1 importance the kept channels hold (the most important kept)."""
    prep = prepare(dense)
    analysis = analyze_channels(prep.view)
    scores, _ = score_groups(analysis.prunable, "l1", ScoreInputs.from_view(prep.view))
    kept = {g["id"]: g["kept"] for g in summary["groups"]}
    total = got = 0.0
    for gid, s in scores.items():
        if gid not in kept:
            continue
        norm = np.sort(global_scores(s, False))[::-1]
        total += float(norm.sum())
        got += float(norm[:kept[gid]].sum())
    return got / total if total else 1.0


def measure(dense: Path, pruned: Path, prof) -> dict:
    res = compare_models(dense, pruned, prof)
    c = res["comparisons"][0]
    red = res["ratios"]["macs_reduction"]
    speedup = c["ratios"]["speedup_p50"]
    return {"macs_reduction": red, "speedup_p50": speedup, "speedup_over_macs_reduction": speedup / red,
            "p50_ms_dense": c["a"]["latency_ms"]["p50"], "p50_ms_pruned": c["b"]["latency_ms"]["p50"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--speedup", type=float, default=2.0, help="target measured speedup")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--macs-weights", default=str(MACS_WEIGHT),
                    help="comma list of macs_weight values to run latency-aware allocation with (0: importance only)")
    args = ap.parse_args(argv)
    prof = profile_from_dict({"name": "bench-ort-cpu-1t", "backend": "ort-cpu", "threads": {"intra_op": 1, "inter_op": 1},
                              "channel_multiple": 8, "warmup_runs": 3, "min_runs": 20, "min_duration_s": 2.0})
    print(f"ONNX Runtime CPU, 1 thread, {platform.processor() or platform.machine()}, input 1x3x{args.size}x{args.size}; "
          f"target speedup {args.speedup:g}x; interleaved p50, >= {prof.min_runs} runs and {prof.min_duration_s:g} s")
    report: dict = {"input": [1, 3, args.size, args.size], "target_speedup": args.speedup, "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        tmp_p = Path(tmp)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in MODELS:
                ap.error(f"unknown model {name!r} (have: {', '.join(MODELS)})")
            dense = export_torch(build(name), (torch.randn(1, 3, args.size, args.size),), tmp_p / f"{name}.onnx")
            rows = {}
            print(f"\n{name}:")
            for w in [float(x) for x in args.macs_weights.split(",")]:
                t = time.perf_counter()
                ours = prune_for_latency(dense, prof, target_speedup=args.speedup, macs_weight=w)
                t_ours = time.perf_counter() - t
                p_ours = save_model(ours.model, tmp_p / f"{name}_latency_{w:g}.onnx")
                la = ours.summary["latency_allocation"]
                rows[f"latency-aware w={w:g}"] = {
                    **measure(dense, p_ours, prof), "importance_kept": importance_kept(dense, ours.summary),
                    "macs_weight": w, "allocation_s": t_ours, "table_s": la["table"]["measure_s"],
                    "table_cached": la["table"]["cached"], "iterations": la["iterations"]}
                internal = ", ".join(f"{i['measured_speedup']:.2f}x" for i in la["iterations"])
                print(f"  macs_weight {w:g}: allocation {t_ours:.1f} s (tables {la['table']['measure_s']:.1f} s"
                      f"{', cached' if la['table']['cached'] else ''}; {len(la['iterations'])} measured candidate(s), "
                      f"internal speedups {internal})")
            uni = prune_structured(dense, target_macs=1.0 / args.speedup, round_to=8)
            p_uni = save_model(uni.model, tmp_p / f"{name}_uniform.onnx")
            rows["uniform-MACs"] = {**measure(dense, p_uni, prof), "importance_kept": importance_kept(dense, uni.summary)}
            report["models"][name] = rows
            for label, r in rows.items():
                print(f"  {label:20s} importance kept {r['importance_kept']:6.1%}  MACs / {r['macs_reduction']:4.2f}  "
                      f"p50 {r['p50_ms_dense']:7.2f} -> {r['p50_ms_pruned']:7.2f} ms  speedup {r['speedup_p50']:4.2f}x  "
                      f"speedup / MACs reduction {r['speedup_over_macs_reduction']:4.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
