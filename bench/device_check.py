"""GPU check (not a test): every GPU path onnxprune has, on one GPU, in at most ~8 minutes; one JSON out.

    python bench/device_check.py [--out device_check.json] [--size 224]

Checks, each recorded as ``ok`` (with its figures), ``failed`` (with the error) or ``unavailable``
(with the reason; never a made-up figure):

1. ``torch_cuda_profile``: the ``torch-cuda`` profile backend (fp32 and fp16) on ResNet-50
   (bench/nets.py), and the dense vs structured-pruned (``target_macs`` 0.5, channels in multiples
   of 16) speedup timed interleaved (``compare_models``);
2. ``finetune_cuda``: ``onnxprune finetune --device cuda`` on the digits CNN (a fresh process);
3. ``ddp_nccl``: onnxprune's DDP training path with the ``nccl`` backend in one process
   (a one-rank process group; DDP wraps the module and all-reduces on the GPU);
4. ``ort_cuda``: the ``ort-cuda`` backend (profile ``nvidia-server-cuda``), when onnxruntime has the
   CUDA provider;
5. ``tensorrt``: the ``tensorrt`` backend (profile ``nvidia-tensorrt-fp16``), when ``tensorrt`` imports.

Without a CUDA GPU it says so, records every check as unavailable and exits 0. ``--rehearse-cpu``
runs checks 1-3 on the CPU instead (torch-cpu, ``--device cpu``, gloo) to test this script where
no GPU is lent: its figures are CPU figures and the JSON says ``"device": "cpu"``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: the whole script stays under 8 minutes: checks that would start after this are skipped
BUDGET_S = 7 * 60


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda_build"] = torch.version.cuda
        env["cuda_available"] = bool(torch.cuda.is_available())
        if env["cuda_available"]:
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            env["nccl"] = torch.distributed.is_nccl_available()
    except ImportError as exc:
        env["torch"] = None
        env["cuda_available"] = False
        env["torch_error"] = str(exc)
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        env["tensorrt"] = None
        env["tensorrt_error"] = str(exc)
    return env


def gpu_profile(name: str, backend: str, precision: str = "fp32", channel_multiple: int = 16, runs: int = 100):
    from onnxprune.profiling.hw_profile import profile_from_dict

    return profile_from_dict({"name": name, "backend": backend, "precision": precision, "warmup_runs": min(20, runs),
                              "min_runs": runs, "min_duration_s": 1.0 if runs >= 100 else 0.0,
                              "channel_multiple": channel_multiple})


def speed(dense: Path, pruned: Path, prof) -> dict[str, Any]:
    """Profile of the dense model and the interleaved dense-vs-pruned speedup on ``prof``."""
    from onnxprune.profiling import compare_models, profile_model

    rec = profile_model(dense, [prof], memory=False)["results"][0]
    cmp = compare_models(dense, pruned, prof)
    c = cmp["comparisons"][0]
    return {"provider": rec["provider"], "provenance": rec["provenance"], "dense_p50_ms": rec["latency_ms"]["p50"],
            "dense_p90_ms": rec["latency_ms"]["p90"], "runs": rec["runs"],
            "gpu_memory_bytes": rec.get("gpu_memory_bytes") or rec.get("torch_cuda_max_allocated_bytes")
            or rec.get("engine_device_memory_bytes"),
            "interleaved": {"dense_p50_ms": c["a"]["latency_ms"]["p50"], "pruned_p50_ms": c["b"]["latency_ms"]["p50"],
                            "speedup_p50": c["ratios"]["speedup_p50"], "macs_reduction": cmp["ratios"]["macs_reduction"]}}


def check_torch_cuda(ctx: dict[str, Any]) -> dict[str, Any]:
    if ctx["device"] == "cpu":  # rehearsal: fp16 is refused on torch-cpu
        return {"fp32": speed(ctx["dense"], ctx["pruned"], gpu_profile("rehearse-torch-cpu", "torch-cpu", runs=3))}
    out = {"fp32": speed(ctx["dense"], ctx["pruned"], gpu_profile("check-torch-cuda", "torch-cuda"))}
    out["fp16"] = speed(ctx["dense"], ctx["pruned"], gpu_profile("check-torch-cuda-fp16", "torch-cuda", "fp16"))
    return out


def check_finetune_cuda(ctx: dict[str, Any]) -> dict[str, Any]:
    out = Path(ctx["tmp"]) / "digits_ft.onnx"
    cmd = [sys.executable, "-m", "onnxprune", "finetune", str(ctx["digits"]), "-o", str(out), "--data", "digits",
           "--epochs", "3", "--lr", "0.05", "--device", ctx["device"], "--train-bn", "--no-progress", "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    res = json.loads(proc.stdout)
    return {"wall_s": wall, "exit": proc.returncode, "result": {k: res[k] for k in res if k in
                                                                  ("device", "test", "best_val_top1", "best_epoch", "seconds")}}


def check_ddp_nccl(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from onnxprune.training import TrainConfig
    from onnxprune.training.ddp import _free_port
    from onnxprune.training.loop import DistContext
    from onnxprune.training.retrain import finetune

    class OneRank(DistContext):
        """A one-rank group that still takes the DDP path (DistContext.active is world_size > 1)."""

        @property
        def active(self) -> bool:
            return True

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend="nccl" if ctx["device"] == "cuda" else "gloo", rank=0, world_size=1)
    try:
        t = time.perf_counter()
        _, hist = finetune(ctx["digits"], "digits", TrainConfig(epochs=2, lr=0.05, device=ctx["device"], train_bn=True), progress=False,
                           dist=OneRank(rank=0, world_size=1))
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "wall_s": time.perf_counter() - t,
                "best_val_top1": hist.get("best_val_top1"), "test": hist.get("test")}
    finally:
        dist.destroy_process_group()


def check_ort_cuda(ctx: dict[str, Any]) -> dict[str, Any]:
    from onnxprune.profiling.hw_profile import load_hw_profile

    prof = load_hw_profile("nvidia-server-cuda").model_copy(update={"batch_sizes": [1], "min_runs": 100, "min_duration_s": 1.0})
    return speed(ctx["dense"], ctx["pruned"], prof)


def check_tensorrt(ctx: dict[str, Any]) -> dict[str, Any]:
    from onnxprune.profiling.hw_profile import load_hw_profile

    prof = load_hw_profile("nvidia-tensorrt-fp16").model_copy(update={"batch_sizes": [1], "min_runs": 100,
                                                                       "min_duration_s": 1.0})
    return speed(ctx["dense"], ctx["pruned"], prof)


def unavailable_reason(name: str, env: dict[str, Any]) -> str | None:
    if not env.get("cuda_available"):
        return (f"CUDA is unavailable: torch {env.get('torch')} (CUDA build {env.get('torch_cuda_build')}) sees no GPU"
                if env.get("torch") else f"torch is not installed ({env.get('torch_error')})")
    if name == "ddp_nccl" and not env.get("nccl"):
        return "this torch build has no NCCL"
    if name == "ort_cuda" and "CUDAExecutionProvider" not in (env.get("ort_providers") or []):
        return f"onnxruntime {env.get('onnxruntime')} has no CUDAExecutionProvider (pip install 'onnxprune[gpu]')"
    if name == "tensorrt" and not env.get("tensorrt"):
        return f"the tensorrt package does not import ({env.get('tensorrt_error')}; pip install 'onnxprune[tensorrt]')"
    return None


CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "torch_cuda_profile": check_torch_cuda,
    "finetune_cuda": check_finetune_cuda,
    "ddp_nccl": check_ddp_nccl,
    "ort_cuda": check_ort_cuda,
    "tensorrt": check_tensorrt,
}


def prepare_models(tmp: Path, size: int) -> dict[str, Any]:
    """ResNet-50 dense and pruned to half the MACs (channels in multiples of 16), and the digits CNN
    trained for 4 epochs (the demo's model)."""
    import torch

    from nets import build
    from onnxprune.commands.demo_model import train_demo_model
    from onnxprune.core.model_io import save_model
    from onnxprune.structured.prune import prune_structured
    from onnxprune.bridge.torch_export import export_torch

    dense = export_torch(build("resnet50"), (torch.randn(1, 3, size, size),), tmp / "resnet50.onnx")
    pruned = save_model(prune_structured(dense, target_macs=0.5, round_to=16).model, tmp / "resnet50_macs0.5.onnx")
    digits = tmp / "digits_cnn.onnx"
    train_demo_model(digits, "digits", epochs=4, width=32)  # trained (seconds): fine-tuning then keeps its accuracy
    return {"dense": dense, "pruned": pruned, "digits": digits, "tmp": str(tmp)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("device_check.json"))
    ap.add_argument("--size", type=int, default=224, help="ResNet-50 input height/width")
    ap.add_argument("--only", default=None, metavar="NAMES", help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--rehearse-cpu", action="store_true", help="run checks 1-3 on the CPU (tests this script; CPU figures)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    env = environment()
    report: dict[str, Any] = {"environment": env, "checks": {}}
    reasons = {name: unavailable_reason(name, env) for name in CHECKS}
    device = "cuda"
    if args.rehearse_cpu and not env.get("cuda_available"):
        device = "cpu"
        reasons.update({n: None for n in ("torch_cuda_profile", "finetune_cuda", "ddp_nccl")})
    report["device"] = device
    print(f"torch {env.get('torch')}, CUDA available: {env.get('cuda_available')}"
          + (f" ({env.get('gpu')}, sm {env.get('compute_capability')})" if env.get("cuda_available") else ""))
    with tempfile.TemporaryDirectory(prefix="onnxprune-devcheck-") as tmp:
        ctx = None
        if any(r is None for r in reasons.values()):
            t = time.perf_counter()
            ctx = {**prepare_models(Path(tmp), args.size), "device": device}
            report["models_s"] = time.perf_counter() - t
        for name, fn in CHECKS.items():
            if args.only and name not in args.only.split(","):
                continue
            if reasons[name] is not None:
                report["checks"][name] = {"status": "unavailable", "reason": reasons[name]}
            elif time.perf_counter() - start > BUDGET_S:
                report["checks"][name] = {"status": "skipped", "reason": f"over the {BUDGET_S} s budget"}
            else:
                t = time.perf_counter()
                try:
                    report["checks"][name] = {"status": "ok", **fn(ctx)}
                except Exception as exc:  # noqa: BLE001 - every failure is recorded, the other checks still run
                    report["checks"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:1000],
                                              "traceback": traceback.format_exc()[-3000:]}
                report["checks"][name]["seconds"] = time.perf_counter() - t
            c = report["checks"][name]
            print(f"  {name:20s} {c['status']:11s} {c.get('reason') or c.get('error') or ''}")
    report["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
