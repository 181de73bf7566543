"""Structured-pruning benchmark on ResNet-50 (not a test): speed of onnxprune vs torch-pruning, and
whether fewer MACs turn into lower ONNX Runtime CPU latency.

    python bench/bench_structured.py            # 1x3x224x224
    python bench/bench_structured.py --quick    # 1x3x160x160, fewer repeats (< ~3 minutes)

1. Pruning time at ratio 0.5 (local L1), in-process, same model: onnxprune ``prune_structured``
   (load, normalize, analyze, score, rewrite, re-count) next to torch-pruning building its
   DependencyGraph and pruning with ``MagnitudePruner``. Target: onnxprune <= 0.5x torch-pruning.
   Also printed: onnxprune's time per stage (prepare = load+normalize, analyze, score+allocate,
   rewrite, recount) and CPU times, since wall times on a shared machine drift.
2. ORT CPU latency of the dense model and of models pruned to ~2x and ~4x fewer MACs
   (``target_macs`` 0.5 and 0.25), each with ``round_to`` 1 (any count) and 16 (hardware-friendly
   counts: MLAS's blocked conv kernels work on 8/16-channel blocks, so odd counts waste the rest):
   warm-up, then A/B interleaved runs, p50. Prints speedup / MACs reduction (target >= 0.9).
Needs torch and torch-pruning (``pip install -e ".[train]"``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from nets import build  # noqa: E402 - bench/ is on sys.path when a script here runs
from onnxprune.channels.analyze import analyze_channels  # noqa: E402
from onnxprune.channels.rewrite import apply_plan  # noqa: E402
from onnxprune.metrics.inspection import inspect_model  # noqa: E402
from onnxprune.core.model_io import save_model  # noqa: E402
from onnxprune.core.prepare import prepare  # noqa: E402
from onnxprune.structured.allocate import allocate  # noqa: E402
from onnxprune.structured.importance import ScoreInputs, score_groups  # noqa: E402
from onnxprune.structured.prune import _counting_view, _measure, prune_structured  # noqa: E402
from onnxprune.bridge.torch_export import export_torch  # noqa: E402


class Clock:
    """Wall and CPU (this process, all threads) seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def time_onnxprune(model: onnx.ModelProto, ratio: float) -> tuple[float, float, dict]:
    """The public API end to end, from an in-memory model (as torch-pruning starts from a module)."""
    with Clock() as c:
        res = prune_structured(model, ratio=ratio)
    return c.wall, c.cpu, res.summary


def onnxprune_stages(model: onnx.ModelProto, ratio: float) -> dict[str, float]:
    """Wall seconds of each stage of the same pipeline (what ``prune_structured`` runs, with the same calls)."""
    out = {}
    with Clock() as c:
        prep = prepare(model)
    out["prepare"] = c.wall
    with Clock() as c:
        analysis = analyze_channels(prep.view)
    out["analyze"] = c.wall
    with Clock() as c:
        scores, _ = score_groups(analysis.prunable, "l1", ScoreInputs.from_view(prep.view))
        plan = allocate(analysis.prunable, scores, ratio)
    out["score+allocate"] = c.wall
    with Clock() as c:
        pruned = apply_plan(prep.model, analysis, plan, values=prep.view.const)
    out["rewrite"] = c.wall
    with Clock() as c:  # params/MACs before and after, as prune_structured counts them
        _measure(prep.view), _measure(_counting_view(pruned, prep.concrete_shapes))
    out["recount"] = c.wall
    return out


def time_torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float) -> tuple[float, float]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    with Clock() as c:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[model[-1]], global_pruning=False)
        pruner.step()
    return c.wall, c.cpu


def ort_latency(paths: dict[str, Path], feed: np.ndarray, warmup: int, repeats: int, threads: int) -> dict[str, float]:
    """p50 seconds per model; runs interleaved (A, B, C, A, B, C ...) so drift hits all alike."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    name = next(iter(sessions.values())).get_inputs()[0].name
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {name: feed})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {name: feed})
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1x3x160x160 and fewer repeats")
    ap.add_argument("--size", type=int, default=None, help="input height/width (default 224, --quick 160)")
    ap.add_argument("--repeats", type=int, default=None, help="timed ORT runs per model (default 40, --quick 15)")
    ap.add_argument("--timing-runs", type=int, default=None, help="pruning-time runs per tool, best kept (default 3, --quick 2)")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads while torch-pruning runs (default 1: its work is many tiny ops, and "
                         "OpenMP spin-waits make it several times slower on a busy machine; onnxprune is single-threaded)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    size = args.size or (160 if args.quick else 224)
    repeats = args.repeats or (15 if args.quick else 40)
    timing_runs = args.timing_runs or (2 if args.quick else 3)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = build("resnet50")
    example = torch.randn(1, 3, size, size)
    out: dict = {"input": [1, 3, size, size]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = export_torch(model, (example,), tmp / "resnet50.onnx")
        proto = onnx.load(str(dense))

        # 1. pruning time, ratio 0.5; a first call warms imports and caches for both tools
        time_onnxprune(proto, 0.0)
        time_torch_pruning(model, example, 0.0)
        ours = [time_onnxprune(proto, 0.5) for _ in range(timing_runs)]
        theirs = [time_torch_pruning(model, example, 0.5) for _ in range(timing_runs)]
        w_ours, c_ours, summary = min(ours, key=lambda r: r[0])
        w_tp, c_tp = min(theirs, key=lambda r: r[0])
        stages = onnxprune_stages(proto, 0.5)
        out["prune_time"] = {"onnxprune_s": w_ours, "torch_pruning_s": w_tp, "ratio": w_ours / w_tp,
                             "onnxprune_cpu_s": c_ours, "torch_pruning_cpu_s": c_tp, "cpu_ratio": c_ours / c_tp,
                             "onnxprune_stages_s": stages, "macs_reduction": summary["macs_reduction"]}
        print(f"ResNet-50 1x3x{size}x{size}, local L1, ratio 0.5, in-process from an in-memory model (best of {timing_runs}; "
              f"torch threads {torch.get_num_threads()})")
        print(f"  onnxprune prune_structured : {w_ours:6.2f} s wall {c_ours:6.2f} s CPU  "
              f"(MACs / {summary['macs_reduction']:.2f})")
        print(f"  torch-pruning DG + prune   : {w_tp:6.2f} s wall {c_tp:6.2f} s CPU")
        print(f"  onnxprune / torch-pruning  = {w_ours / w_tp:.2f} wall, {c_ours / c_tp:.2f} CPU  (target <= 0.50)")
        core = stages["analyze"] + stages["score+allocate"] + stages["rewrite"]
        out["prune_time"]["core_ratio"] = core / w_tp
        print("  onnxprune stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        print(f"  analyze + score + rewrite alone (from a prepared model): {core:.2f} s = {core / w_tp:.2f} of torch-pruning")

        # 2. latency at ~2x and ~4x fewer MACs, with any channel count and with multiples of 16
        paths = {"dense": dense}
        macs = {"dense": inspect_model(dense)["macs"]}
        for target in (0.5, 0.25):
            for round_to in (1, 16):
                key = f"macs{target:g}/r{round_to}"
                with Clock() as c:
                    res = prune_structured(proto, target_macs=target, round_to=round_to)
                paths[key] = save_model(res.model, tmp / f"resnet50_{target:g}_{round_to}.onnx")
                macs[key] = inspect_model(paths[key])["macs"]
                t = res.summary["target"]
                print(f"  target-macs {target:g} round-to {round_to:2d}: achieved {t['achieved']:.4f} at ratio "
                      f"{t['ratio']:.4f} ({t['evaluations']} pruned models measured, {c.wall:.1f} s)")
        feed = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        lat = ort_latency(paths, feed, warmup=3 if args.quick else 5, repeats=repeats, threads=args.threads)
        print(f"ORT CPU latency (intra-op threads: {args.threads or 'ORT default'}), p50 of {repeats} interleaved runs")
        out["latency"] = {}
        for key in paths:
            red = macs["dense"] / macs[key]
            speedup = lat["dense"] / lat[key]
            out["latency"][key] = {"p50_ms": lat[key] * 1e3, "macs": macs[key], "macs_reduction": red,
                                   "speedup": speedup, "speedup_over_macs_reduction": speedup / red}
            print(f"  {key:14s} {lat[key] * 1e3:8.2f} ms  MACs {macs[key] / 1e9:6.3f} G  reduction {red:5.2f}x  "
                  f"speedup {speedup:5.2f}x  speedup/reduction {speedup / red:5.2f}" + ("" if key == "dense" else "  (target >= 0.9)"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
