"""Executor benchmark (not a test): wall time of one small sweep, local executor vs Ray with 2 workers.

    python bench/bench_executor.py                  # 4 points, 2 retraining epochs each
    python bench/bench_executor.py --points 8 --epochs 3 --json out.json

A digits CNN is trained, then the same recipe (structured L1 and unstructured magnitude points,
retrained alike, profiled on ci-cpu) runs into two fresh run directories: once with the local
executor (points one after another in this process), once with ``--executor ray`` on a Ray instance
started here with ``num_cpus=2`` (two points at a time; latency measurements still one at a time,
they hold the node's ``onnxprune_profile`` resource). Ray's start-up is timed separately and not in
the sweep's time. Prints both wall times and local / Ray (above 1: Ray was faster), and checks that
both runs give the same params and MACs per point.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.demo_model import train_demo_model  # noqa: E402
from onnxprune.pipeline.executor import PROFILE_RESOURCE  # noqa: E402
from onnxprune.pipeline.run import run_recipe  # noqa: E402


def recipe_text(points: int, epochs: int) -> str:
    half = max(1, points // 2)
    ratios = [round(0.2 + 0.6 * i / max(1, half - 1), 2) for i in range(half)] if half > 1 else [0.5]
    sparsities = [round(0.3 + 0.6 * i / max(1, points - half - 1), 2) for i in range(points - half)] or [0.5]
    return f"""
name: bench-executor
sweep:
  methods:
    - {{name: l1, kind: structured, criterion: l1, scope: global, points: [{", ".join(f"{{ratio: {r}}}" for r in ratios)}]}}
    - {{name: mag, kind: unstructured, criterion: magnitude, points: [{", ".join(f"{{sparsity: {s}}}" for s in sparsities)}]}}
  seeds: [0]
retrain: {{epochs: {epochs}, batch_size: 64, lr: 0.05, train_bn: true}}
data: digits
hw: [ci-cpu]
evaluation: {{splits: [val, test]}}
profiling: {{min_runs: 20, warmup_runs: 2, min_duration_s: 0.0, memory: false}}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=4, help="operating points in the sweep (half structured, half unstructured)")
    ap.add_argument("--epochs", type=int, default=2, help="retraining epochs per point")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train_demo_model(d / "m.onnx", epochs=5, width=16)
        (d / "r.yaml").write_text(recipe_text(args.points, args.epochs))

        t0 = time.perf_counter()
        local = run_recipe(d / "r.yaml", d / "m.onnx", d / "local")
        t_local = time.perf_counter() - t0

        t0 = time.perf_counter()
        root = str(Path(__file__).resolve().parents[1])
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 log_to_driver=False, resources={PROFILE_RESOURCE: 1}, runtime_env={"env_vars": {"PYTHONPATH": root}})
        t_init = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            remote = run_recipe(d / "r.yaml", d / "m.onnx", d / "ray", executor="ray")
            t_ray = time.perf_counter() - t0
        finally:
            ray.shutdown()

    same = [(p["params"], p["macs"]) for p in local["points"]] == [(p["params"], p["macs"]) for p in remote["points"]]
    res = {"points": len(local["points"]), "epochs": args.epochs, "steps": local["steps"]["executed"],
           "local_s": round(t_local, 2), "ray_s": round(t_ray, 2), "ray_init_s": round(t_init, 2),
           "local_over_ray": round(t_local / t_ray, 2), "same_params_and_macs": same}
    print(f"sweep of {res['points']} points x {args.epochs} epoch(s), {res['steps']} steps")
    print(f"local executor: {t_local:.1f} s")
    print(f"ray executor (2 workers): {t_ray:.1f} s (+ {t_init:.1f} s to start Ray, not counted)")
    print(f"local / ray: {t_local / t_ray:.2f}x  (same params and MACs per point: {same})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
