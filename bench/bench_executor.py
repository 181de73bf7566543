"""Executor benchmark (not a test): wall time of one small sweep, local executor vs Ray with 2 workers.

    python bench/bench_executor.py                  # 4 points, 2 retraining epochs each, 3 repeats
    python bench/bench_executor.py --points 2 --epochs 1 --repeats 3 --json out.json

A digits CNN is trained, then the same recipe (structured L1 and unstructured magnitude points,
retrained alike, profiled on ci-cpu) runs into fresh run directories, alternating executors: local,
ray, local, ray, ... (``--repeats`` of each), so neither gets the warmer machine or the quieter
minute. The local executor runs points one after another in this process; ``--executor ray`` runs
them on a Ray instance started here with ``num_cpus=2`` (two build tasks at a time; a latency
measurement holds the whole node). Both give every task the same threads (``--threads``, default
1: torch and OMP_NUM_THREADS in this process and in every Ray worker; the profile fixes ONNX
Runtime's). Ray is started once, before the first run, and its start-up is timed apart.

Prints each executor's median wall time with its spread (min-max over the repeats), the ratio of
the medians (local / ray; above 1: Ray was faster), and checks that every run gives the same params
and MACs per point. The times are wall-clock on whatever machine runs this: say which when quoting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.commands.demo_model import train_demo_model  # noqa: E402
from onnxprune.pipeline.executor import PROFILE_RESOURCE  # noqa: E402
from onnxprune.pipeline.run import run_recipe  # noqa: E402


def _set_threads() -> None:
    """Ray worker setup hook (and this process): torch at $OMP_NUM_THREADS threads."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _threads_here() -> int:
    import torch

    return torch.get_num_threads()


def spread(times: list[float]) -> dict[str, float]:
    """Median and min-max of wall times (s)."""
    return {"median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2), "max_s": round(max(times), 2),
            "runs_s": [round(t, 2) for t in times]}


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
    ap.add_argument("--repeats", type=int, default=3, help="runs of each executor, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch / OMP threads of every task, on both executors")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args(argv)
    import ray

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    _set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train_demo_model(d / "m.onnx", epochs=5, width=16)
        (d / "r.yaml").write_text(recipe_text(args.points, args.epochs))

        t0 = time.perf_counter()
        root = str(Path(__file__).resolve().parents[1])
        env = {"PYTHONPATH": root, "OMP_NUM_THREADS": str(args.threads)}
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 log_to_driver=False, resources={PROFILE_RESOURCE: 1},
                 runtime_env={"env_vars": env, "worker_process_setup_hook": _set_threads})
        t_init = time.perf_counter() - t0
        try:
            threads = {"local": _threads_here(), "ray": ray.get(ray.remote(_threads_here).options(num_cpus=1).remote())}
            times: dict[str, list[float]] = {"local": [], "ray": []}
            figures = []
            for i in range(args.repeats):
                for kind in ("local", "ray"):
                    t0 = time.perf_counter()
                    rep = run_recipe(d / "r.yaml", d / "m.onnx", d / f"{kind}{i}", executor=kind)
                    times[kind].append(time.perf_counter() - t0)
                    figures.append([(p["params"], p["macs"]) for p in rep["points"]])
                    print(f"run {i + 1}/{args.repeats} {kind}: {times[kind][-1]:.1f} s", flush=True)
                    steps = rep["steps"]["executed"]
        finally:
            ray.shutdown()

    same = all(f == figures[0] for f in figures)
    res = {"machine": f"{platform.node()} ({os.cpu_count()} logical CPUs)", "points": len(rep["points"]),
           "epochs": args.epochs, "steps": steps, "repeats": args.repeats, "order": "local, ray alternating",
           "threads_per_task": threads, "local": spread(times["local"]), "ray": spread(times["ray"]),
           "ray_init_s": round(t_init, 2),
           "local_over_ray_median": round(statistics.median(times["local"]) / statistics.median(times["ray"]), 2),
           "same_params_and_macs": same}
    print(f"sweep of {res['points']} points x {args.epochs} epoch(s), {steps} steps, {args.repeats} runs each "
          f"(alternating), {threads} threads per task")
    for kind, label in (("local", "local executor"), ("ray", "ray executor (2 CPUs)")):
        r = res[kind]
        print(f"{label}: median {r['median_s']:.1f} s (min {r['min_s']:.1f} - max {r['max_s']:.1f} s)")
    print(f"(+ {t_init:.1f} s to start Ray once, not counted)")
    print(f"local / ray (medians): {res['local_over_ray_median']:.2f}x  (same params and MACs in every run: {same})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
