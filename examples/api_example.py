"""The onnxprune Python API in one runnable example (about a minute on a laptop CPU).

    python examples/api_example.py [WORKDIR]

Every call returns plain data (the CLI's --json shapes), so a deployment pipeline can act on it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from onnxprune import api
from onnxprune.commands.demo_model import train_demo_model


def main(workdir: str = "api_example_out") -> None:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "digits_cnn.onnx"
    train_demo_model(dense, "digits", epochs=4, width=16)            # a small CNN, exported to ONNX

    info = api.inspect(dense)
    print(f"dense: {info['params']} params, {info['macs']} MACs")

    res = api.prune(dense, work / "half_macs.onnx", method="structured", target_macs=0.5, criterion="l1")
    print(f"pruned: MACs {res['macs_before']} -> {res['macs_after']}")

    hist = api.finetune(work / "half_macs.onnx", "digits", work / "half_macs_ft.onnx", epochs=2, lr=0.01, train_bn=True)
    print(f"retrained: best validation top-1 {hist['best_val_top1']:.2%} at epoch {hist['best_epoch']}")

    acc = api.evaluate(work / "half_macs_ft.onnx", "digits", split="test")
    prof = api.profile(work / "half_macs_ft.onnx", ["ci-cpu"], memory=False)
    print(f"test top-1 {acc['top1']:.2%}; p50 latency {prof['results'][0]['latency_ms']['p50']:.3f} ms on ci-cpu")

    # a whole recipe, resumable, with its report in work/run/report.html
    report = api.run("structured-l1-2x-macs", dense, work / "run", data="digits",
                     overrides=["retrain.epochs=1", "profiling.memory=false"])
    for p in [report["dense"], *report["points"]]:
        print(p["id"], f"{p['accuracy']['test']['top1']['mean']:.2%}",
              f"{p['profiles']['ci-cpu'][0]['latency_ms']['p50']:.3f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:2])
