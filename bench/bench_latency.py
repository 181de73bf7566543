"""Latency benchmark (not a test): do fewer MACs become lower latency, and are repeated profiles stable?

    python bench/bench_latency.py                 # ResNet-50 and MobileNetV2 at 1x3x224x224
    python bench/bench_latency.py --quick         # 1x3x160x160, fewer runs (a few minutes on 2 cores)
    python bench/bench_latency.py --json out.json

1. Dense vs structured-pruned (``prune_structured(..., target_macs=0.5, round_to=8)``) ResNet-50 and
   MobileNetV2, defined here in plain torch (random weights: latency does not depend on them),
   timed interleaved (A B A B) on ONNX Runtime CPU with ``onnxprune.profiling.compare_models``.
   Prints the MACs reduction, the measured p50 speedup and speedup / MACs reduction (target >= 0.9).
   ``round_to=8`` matters: ONNX Runtime's CPU provider runs convolutions in its blocked NCHWc layout
   only when channel counts are multiples of 8; with ``--round-to 1`` a pruned MobileNetV2 can be
   *slower* than the dense one.
2. The dense ResNet-50 profiled three times with ``profile_model``: the p50 spread,
   (max - min) / median (target <= 5% on a quiet machine; a shared machine is noisier).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nets import MODELS, build  # noqa: E402 - bench/ is on sys.path when a script here runs
from onnxprune.core.model_io import save_model  # noqa: E402
from onnxprune.profiling import compare_models, profile_model  # noqa: E402
from onnxprune.profiling.hw_profile import profile_from_dict  # noqa: E402
from onnxprune.profiling.stats import relative_spread  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402


# ---- benchmark -------------------------------------------------------------------------------------
def _prune(dense: Path, out: Path, target_macs: float, round_to: int, scope: str) -> Path:
    from onnxprune.structured.prune import prune_structured

    save_model(prune_structured(dense, target_macs=target_macs, round_to=round_to, scope=scope).model, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="160x160 inputs and fewer runs")
    ap.add_argument("--models", default="resnet50,mobilenetv2")
    ap.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs the pruned model keeps")
    ap.add_argument("--round-to", type=int, default=8,
                    help="keep channel counts multiples of this (default 8: ONNX Runtime's fast NCHWc CPU convolutions "
                         "need multiples of 8; with 1, odd counts fall back to slower kernels)")
    ap.add_argument("--scope", choices=["local", "global"], default="local",
                    help="same ratio per channel group (local) or one ranking across groups (global)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per physical core)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)

    size = 160 if args.quick else 224
    prof = profile_from_dict({
        "name": "bench-ort-cpu", "backend": "ort-cpu", "threads": {"intra_op": args.threads, "inter_op": 1},
        "warmup_runs": 5, "min_runs": 20 if args.quick else 50, "min_duration_s": 3.0 if args.quick else 10.0})
    print(f"ONNX Runtime CPU, {platform.processor() or platform.machine()}, input 1x3x{size}x{size}, "
          f"warm-up {prof.warmup_runs}, >= {prof.min_runs} runs and >= {prof.min_duration_s:g} s per model")
    report: dict = {"input": [1, 3, size, size], "profile": prof.model_dump(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        paths = {}
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in MODELS:
                ap.error(f"unknown model {name!r} (have: {', '.join(MODELS)})")
            dense = export_torch(build(name), (torch.randn(1, 3, size, size),), Path(tmp) / f"{name}.onnx")
            paths[name] = dense
            print(f"\n{name}: pruning to {args.target_macs:.0%} of the MACs (scope {args.scope}, channels rounded to multiples of {args.round_to}) ...")
            pruned = _prune(dense, Path(tmp) / f"{name}_pruned.onnx", args.target_macs, args.round_to, args.scope)
            res = compare_models(dense, pruned, prof)
            c = res["comparisons"][0]
            macs_red = res["ratios"]["macs_reduction"]
            speedup = c["ratios"]["speedup_p50"]
            fig = {"macs_dense": res["a"]["macs"], "macs_pruned": res["b"]["macs"], "macs_reduction": macs_red,
                   "p50_ms_dense": c["a"]["latency_ms"]["p50"], "p50_ms_pruned": c["b"]["latency_ms"]["p50"],
                   "runs": c["a"]["runs"], "speedup_p50": speedup, "speedup_mean": c["ratios"]["speedup_mean"],
                   "speedup_over_macs_reduction": speedup / macs_red if macs_red else None}
            report["models"][name] = fig
            print(f"  MACs {fig['macs_dense'] / 1e9:.3f} G -> {fig['macs_pruned'] / 1e9:.3f} G "
                  f"(reduction {macs_red:.2f}x)")
            print(f"  p50 {fig['p50_ms_dense']:.2f} ms -> {fig['p50_ms_pruned']:.2f} ms over {fig['runs']} interleaved runs "
                  f"each: speedup {speedup:.2f}x (mean {fig['speedup_mean']:.2f}x)")
            ok = fig["speedup_over_macs_reduction"] >= 0.9
            print(f"  speedup / MACs reduction = {fig['speedup_over_macs_reduction']:.3f} "
                  f"({'meets' if ok else 'BELOW'} the 0.9 target)")

        name = "resnet50" if "resnet50" in paths else next(iter(paths))
        print(f"\nrepeatability: {name} dense profiled 3 times")
        p50s = []
        for i in range(3):
            r = profile_model(paths[name], [prof], memory=False)["results"][0]
            p50s.append(r["latency_ms"]["p50"])
            print(f"  run {i + 1}: p50 {p50s[-1]:.2f} ms ({r['runs']} runs, std {r['latency_ms']['std']:.2f} ms)")
        spread = relative_spread(p50s)
        report["repeatability"] = {"model": name, "p50_ms": p50s, "spread": spread}
        print(f"  p50 spread (max - min) / median = {spread:.1%} ({'within' if spread <= 0.05 else 'OVER'} the 5% target; "
              f"a shared or busy machine adds noise)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
