"""Process benchmark (not a test): model file -> pruned file, as a user runs it, vs Torch-Pruning's script.

    python bench/bench_process.py               # ResNet-50 (bench/nets.py), 1x3x224x224, ratio 0.5
    python bench/bench_process.py --repeats 3   # median of 3 interleaved runs per side

Both sides are whole fresh processes, timed from spawn to exit:

- onnxprune: ``python -m onnxprune prune resnet50.onnx -o pruned.onnx --structured --ratio 0.5 --json``
  (imports, load + checker, normalize, analyze, score, rewrite + checker, save; no gzip: structured);
- Torch-Pruning: a script that imports torch and torch_pruning, builds the same ResNet-50, prunes 50%
  of the channels with ``MagnitudePruner`` (L1, local, classifier ignored) and exports ONNX
  (``torch.onnx.export``, TorchScript exporter, opset 17).

Prints the ratio onnxprune / Torch-Pruning (target <= 0.25). Bytecode is cached (a temporary
``PYTHONPYCACHEPREFIX``) and one untimed run of each side warms it and the file cache, as for an
installed package; the runs then alternate (A B A B) so machine drift hits both alike.
Needs torch and torch-pruning (``pip install -e ".[train]"``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TP_SCRIPT = """
import sys
import torch, torch_pruning as tp
sys.path.insert(0, {bench!r})
from nets import build
model = build("resnet50")
example = torch.randn(1, 3, {size}, {size})
pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                   pruning_ratio=0.5, ignored_layers=[model[-1]], global_pruning=False)
pruner.step()
with torch.no_grad():
    torch.onnx.export(model.eval(), (example,), {out!r}, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side after the warm-up (median kept)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from nets import build
    from onnxprune.bridge.torch_export import export_torch

    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        tmp_p = Path(tmp)
        dense = export_torch(build("resnet50"), (torch.randn(1, 3, args.size, args.size),), tmp_p / "resnet50.onnx")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(tmp_p / "pycache")
        ours = [sys.executable, "-m", "onnxprune", "prune", str(dense), "-o", str(tmp_p / "pruned.onnx"),
                "--structured", "--ratio", "0.5", "--json"]
        script = tmp_p / "tp_script.py"
        script.write_text(TP_SCRIPT.format(bench=str(ROOT / "bench"), size=args.size, out=str(tmp_p / "tp.onnx")))
        theirs = [sys.executable, str(script)]
        timed(ours, env), timed(theirs, env)  # warm-up: bytecode cache, file cache
        a, b = [], []
        for _ in range(args.repeats):
            a.append(timed(ours, env))
            b.append(timed(theirs, env))
        ta, tb = statistics.median(a), statistics.median(b)
        mb = dense.stat().st_size / 2**20
    ratio = ta / tb
    print(f"ResNet-50 1x3x{args.size}x{args.size} ({mb:.0f} MB file), ratio 0.5, fresh processes, "
          f"median of {args.repeats} after one warm-up each")
    print(f"  onnxprune prune --structured       : {ta:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in a)})")
    print(f"  Torch-Pruning import+build+prune+export: {tb:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in b)})")
    print(f"  onnxprune / Torch-Pruning = {ratio:.3f}  ({'meets' if ratio <= 0.25 else 'ABOVE'} the 0.25 target)")
    if args.json:
        args.json.write_text(json.dumps({"onnxprune_s": a, "torch_pruning_s": b, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
