"""Memory probe: ``python -m onnxprune.profiling.memprobe MODEL --profile-json JSON --feeds INPUTS.npz``.

Run in a fresh process by :func:`onnxprune.profiling.memory.measure_memory`: imports the runtime,
loads MODEL with the profile's backend, runs it ``--runs`` times and prints one JSON line with its
own peak resident memory (and GPU memory for GPU backends). Errors print one ``error:`` line on
stderr and exit 1 (3 when the backend is unavailable).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import numpy as np
from ..core.errors import OnnxPruneError
from .hw_profile import profile_from_dict
from .memory import current_rss_bytes, nvml_process_gpu_memory, peak_rss_bytes
from .runners import make_runner


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onnxprune.profiling.memprobe")
    ap.add_argument("model")
    ap.add_argument("--profile-json", required=True)
    ap.add_argument("--feeds", required=True, help=".npz file: names (the model inputs) and a0, a1... (their arrays)")
    ap.add_argument("--arena", choices=("on", "off"), default="on")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)



    try:
        profile = profile_from_dict(json.loads(args.profile_json))
        with np.load(args.feeds, allow_pickle=False) as data:
            feeds = {str(name): data[f"a{i}"] for i, name in enumerate(data["names"])}
        before_load = current_rss_bytes()
        runner = make_runner(profile, args.model, feeds, arena=args.arena == "on")
        for _ in range(max(args.runs, 1)):
            runner()
        out = {"rss_before_load_bytes": before_load}
        out["peak_rss_bytes"], out["method"] = peak_rss_bytes()
        if profile.is_gpu:
            gpu = nvml_process_gpu_memory(os.getpid())
            backend = runner.info()
            if gpu is not None:
                out["gpu_memory_bytes"], out["gpu_memory_method"] = gpu, "NVML (this process)"
            elif backend:
                key, value = next(iter(backend.items()))
                out["gpu_memory_bytes"], out["gpu_memory_method"] = value, key
        runner.close()
    except OnnxPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
