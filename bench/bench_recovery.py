"""Recovering accuracy without training (not a test): what calibration buys, what it costs.

    python bench/bench_recovery.py              # trained models + ResNet-50 calibration cost
    python bench/bench_recovery.py --no-resnet  # trained models only (about a minute)
    python bench/bench_recovery.py --no-trained --workdir /tmp/r50 [--samples 256]  # ResNet-50 cost only
    python bench/bench_recovery.py --no-resnet --no-trained --quick  # 3. only, short schedules (~2 min)
    python bench/bench_recovery.py --refit-only --workdir /tmp/r50 [--refit-samples 64]  # 4. only: one-pass vs sequential re-fit

1. Small models trained here (a digits classifier CNN; a dense-prediction net with two outputs,
   BatchNorm folded), pruned to 2x and 4x fewer MACs (``target_macs`` 0.5 / 0.25, local L1), then
   recovered by: nothing / relative BN re-estimation (shift toward the dense model: BN gamma/beta, or
   the consumer's bias in folded graphs) / least-squares reconstruction of the consumers of pruned
   channels. Reported: top-1 (classifier) or pixel accuracy + relative L2 error of every output
   against the dense model, the time of the whole prune call and its peak RSS (each run in a fresh
   process). Calibration uses 256 unlabeled samples that are not the test samples.
   Then, from the reconstructed model, one epoch of label-free distillation (``finetune --teacher
   DENSE --objective distill``) on the same samples, and for the classifier one epoch of label-based
   finetuning (``--objective labels``) on the same samples with their labels: the same budget.
3. Recovery at ~4x fewer MACs from few unlabeled samples (issue 22): the digits CNN pruned to
   ``target_macs`` 0.25, then from N unlabeled samples (N = 256, 512 and the whole 1400-sample
   training pool: digits has no 2048; 20 % of N held out to pick the checkpoint, never augmented):
   none / calibration (reconstruction) / + label-free distillation by function matching (the
   default: crop, jitter, mixup; teacher and student see the same augmented batch) / + plain KL on
   the raw samples (no augmentation) / + labelled finetuning on the same N samples with their
   labels; all three trainings start from the calibrated model and run the same number of steps.
   Top-1 on the 397 held-out labelled digits none of them saw.
2. Cost of calibrating ResNet-50 (bench/nets.py, seeded weights) with 256 samples at 224x224:
   wall time of the calibration (the whole prune call too) and peak RSS, on this machine's cores.
   Targets: < 60 s and < 4 GB on 2 cores.
4. ResNet-50 at 2x fewer MACs, the re-fit on the dense model's activations (one pass) against the
   sequential re-fit on the pruned model's own, both checked on held-out samples: which one the
   never-worse check keeps, the output error against dense, the time. Target: the sequential re-fit
   lowers the output error where the one-pass fit is rejected.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

CHILD = r"""
import json, sys, time
import numpy as np, onnx
from onnxprune.calibration import StructuredCalibration
from onnxprune.calibration.collect import run
from onnxprune.structured.prune import prune_structured
from onnxprune.profiling.memory import peak_rss_bytes
a = json.loads(sys.argv[1])
model = onnx.load(a["model"])
cal = None
if a["method"] != "none":
    with np.load(a["calib"]) as z:
        cal = StructuredCalibration({k: z[k] for k in z.files}, method=a["method"], progress=False)
t, c = time.perf_counter(), time.process_time()
r = prune_structured(model, target_macs=a["macs"], calibration=cal)
wall, cpu = time.perf_counter() - t, time.process_time() - c
peak = peak_rss_bytes()[0]
out = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "achieved": r.summary["target"].get("achieved"),
       "calibration_s": (r.summary.get("calibration") or {}).get("seconds"),
       "outputs": (r.summary.get("calibration") or {}).get("outputs")}
if a.get("test"):
    with np.load(a["test"]) as z:
        got = run(r.model, {k: z[k] for k in z.files})
    np.savez(a["out"], **got)
if a.get("save"):
    onnx.save(r.model, a["save"])
print(json.dumps(out))
"""


def child(args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rel(out, ref) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def finetune_epoch(pruned: Path, data: Path, out: Path, objective: str, dense: Path | None = None
                   ) -> tuple[float, str | None]:
    """One epoch of ``onnxprune finetune --objective OBJECTIVE`` through the CLI, as a user runs it."""
    t = time.perf_counter()
    teacher = ["--teacher", str(dense)] if dense is not None else []
    r = subprocess.run([sys.executable, "-m", "onnxprune", "finetune", str(pruned), "-o", str(out), *teacher,
                        "--data", f"npz:{data}", "--objective", objective, "--epochs", "1"], capture_output=True,
                       text=True, cwd=ROOT)
    return time.perf_counter() - t, (None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1])


def trained_models(tmp: Path) -> None:
    import onnx

    from calib_models import train_dense_prediction, train_digits_cnn
    from onnxprune.calibration.collect import run

    print("== 1. trained models: recovery at 2x / 4x fewer MACs (256 unlabeled calibration samples)")
    cases = []
    model, xtr, xte, yte, ytr = train_digits_cnn(with_train_labels=True)
    cases.append(("digits CNN (BN)", model, {"x": xtr[:256]}, {"x": xte}, lambda o: ("top-1", float((o["y"].argmax(1) == yte).mean())),
                  ytr[:256]))
    model, xc, xt, mask = train_dense_prediction()
    cases.append(("dense prediction, 2 outputs (BN folded)", model, {"x": xc}, {"x": xt},
                  lambda o: ("pixel acc", float((o["seg"].argmax(1) == mask).mean())), None))
    for name, model, calib, test, metric, labels in cases:
        mpath, cpath, tpath = tmp / "m.onnx", tmp / "calib.npz", tmp / "test.npz"
        onnx.save(model, str(mpath))
        np.savez(cpath, **calib)
        np.savez(tpath, **test)
        dense = run(model, test)
        label, dense_metric = metric(dense)
        print(f"\n{name}: dense {label} {dense_metric:.4f}")
        print(f"  {'MACs':>5} {'recovery':<16} {label:>9}  {'rel-L2 error per output vs dense':<36} {'time s':>7} {'peak MB':>8}")
        for macs in (0.5, 0.25):
            for method, shown in (("none", "none"), ("bn", "BN re-estimation"), ("refit", "reconstruction")):
                outp = tmp / "o.npz"
                res = child({"model": str(mpath), "calib": str(cpath), "test": str(tpath), "out": str(outp),
                             "method": method, "macs": macs, "save": str(tmp / f"p_{method}.onnx")})
                with np.load(outp) as z:
                    got = {k: z[k] for k in z.files}
                errs = ", ".join(f"{k} {rel(got[k], dense[k]):.3f}" for k in dense)
                print(f"  {res['achieved']:5.3f} {shown:<16} {metric(got)[1]:9.4f}  {errs:<36} {res['wall_s']:7.2f} "
                      f"{res['peak_rss_mb']:8.0f}")
            runs = [("+ 1 ep. distill", cpath, "distill", mpath)]
            if labels is not None:  # the same samples with their labels, the same budget
                np.savez(tmp / "labeled.npz", x=calib["x"], y=labels)
                runs.append(("+ 1 ep. labels", tmp / "labeled.npz", "labels", None))
            for shown, data, objective, teacher in runs:
                secs, failed = finetune_epoch(tmp / "p_refit.onnx", data, tmp / "d.onnx", objective, teacher)
                if failed:
                    print(f"  {'':5} {shown}: failed: {failed}")
                    continue
                got = run(onnx.load(str(tmp / "d.onnx")), test)
                errs = ", ".join(f"{k} {rel(got[k], dense[k]):.3f}" for k in dense)
                print(f"  {'':5} {shown:<16} {metric(got)[1]:9.4f}  {errs:<36} {secs:7.2f} {'':>8}")


def recovery_from_few_samples(sizes: tuple[int, ...], steps: int) -> None:
    import torch

    from calib_models import train_digits_cnn
    from onnxprune.calibration import StructuredCalibration
    from onnxprune.datasets.core import DatasetSplits, Split
    from onnxprune.datasets.fidelity import run_onnx
    from onnxprune.structured.prune import prune_structured
    from onnxprune.training import TrainConfig, finetune

    torch.set_num_threads(1)
    model, xtr, xte, yte, ytr = train_digits_cnn(with_train_labels=True)

    def acc(m) -> float:
        return float((run_onnx(m, {"x": xte})["y"].argmax(1) == yte).mean())

    print(f"\n== 3. digits CNN at ~4x fewer MACs from N unlabeled samples ({steps} steps per training, batch 64, "
          f"1 torch thread, this machine's CPU); dense top-1 {acc(model):.4f} on {len(yte)} held-out digits")
    print(f"  {'N':>5} {'recovery':<44} {'top-1':>7} {'MACs':>6} {'sel. step':>9} {'time s':>7}")
    for n in sizes:
        n = min(n, len(xtr))
        x, y = xtr[:n], ytr[:n]
        nv = n // 5
        unl = DatasetSplits(train=Split(x=x[nv:]), val=Split(x=x[:nv]), test=Split(x=xte[:0]), num_classes=10,
                            input_shape=(1, 8, 8))
        lab = DatasetSplits(train=Split(x=x[nv:], y=y[nv:]), val=Split(x=x[:nv], y=y[:nv]),
                            test=Split(x=xte[:0], y=yte[:0]), num_classes=10, input_shape=(1, 8, 8))
        t = time.perf_counter()
        pruned = prune_structured(model, target_macs=0.25)
        red = pruned.summary["macs_before"] / pruned.summary["macs_after"]
        print(f"  {n:5d} {'none (one-shot)':<44} {acc(pruned.model):7.4f} {red:5.2f}x {'':>9} {time.perf_counter() - t:7.1f}")
        t = time.perf_counter()
        cal = prune_structured(model, target_macs=0.25,
                               calibration=StructuredCalibration({"x": x[nv:]}, method="refit", progress=False)).model
        print(f"  {n:5d} {'calibration (reconstruction)':<44} {acc(cal):7.4f} {red:5.2f}x {'':>9} {time.perf_counter() - t:7.1f}")
        kinds = {"y": "scores"}
        runs = (("+ distillation, function matching (no labels)", unl, TrainConfig(steps=steps)),
                ("+ plain KL on the raw samples (no labels)", unl, TrainConfig(steps=steps, augment="none")),
                ("+ labelled finetuning, same samples", lab, TrainConfig(steps=steps, objective="labels")))
        for shown, data, cfg in runs:
            t = time.perf_counter()
            m, h = finetune(cal, data, cfg, teacher=model if cfg.objective != "labels" else None, progress=False,
                            output_kinds=kinds if cfg.objective != "labels" else None, evaluate_test=False)
            print(f"  {n:5d} {shown:<44} {acc(m):7.4f} {red:5.2f}x {h['best_step']:9d} {time.perf_counter() - t:7.1f}")


def export_resnet50(tmp: Path) -> Path:
    """ResNet-50 (bench/nets.py, seeded weights) as ONNX in ``tmp`` (reused when there)."""
    import torch

    from nets import build

    mpath = tmp / "r50.onnx"
    if not mpath.exists():
        torch.onnx.export(build("resnet50").eval(), torch.zeros(1, 3, 224, 224), str(mpath), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=13, dynamo=False)
    return mpath


def resnet50(tmp: Path, samples: int) -> None:
    print(f"\n== 2. calibrating ResNet-50 with {samples} samples at 224x224 ({os.cpu_count()} cores visible)")
    mpath = export_resnet50(tmp)
    rng = np.random.default_rng(0)
    # smooth random images (not white noise): low-resolution noise upsampled
    low = rng.normal(size=(samples, 3, 14, 14)).astype(np.float32)
    np.savez(tmp / "r50_calib.npz", x=np.repeat(np.repeat(low, 16, axis=2), 16, axis=3))
    del low
    base = child({"model": str(mpath), "method": "none", "macs": 0.5})
    res = child({"model": str(mpath), "calib": str(tmp / "r50_calib.npz"), "method": "refit", "macs": 0.5})
    load = os.getloadavg()[0]
    print(f"  prune --target-macs 0.5 alone:          {base['wall_s']:6.1f} s wall, {base['cpu_s']:6.1f} s CPU, "
          f"peak RSS {base['peak_rss_mb'] / 1024:.2f} GB")
    print(f"  prune + calibrate (reconstruction):     {res['wall_s']:6.1f} s wall, {res['cpu_s']:6.1f} s CPU, "
          f"peak RSS {res['peak_rss_mb'] / 1024:.2f} GB")
    print(f"  calibration itself:                     {res['calibration_s']:6.1f} s wall  (target < 60 s, < 4 GB)")
    for k, e in (res["outputs"] or {}).items():  # seeded weights, synthetic images: a sanity check, not accuracy
        print(f"  output {k} rel-L2 vs dense on the check samples: {e['rel_l2_before']:.3g} pruned, "
              f"{e['rel_l2_after']:.3g} calibrated")
    print(f"  load average now {load:.1f} on {os.cpu_count()} cores: wall times stretch on a shared machine; CPU time "
          "over the cores is the idle-machine floor")


REFIT_CHILD = r"""
import json, sys, time
import numpy as np, onnx
from onnxprune.calibration import StructuredCalibration
from onnxprune.calibration.collect import run
from onnxprune.structured.prune import prune_structured
from onnxprune.profiling.memory import peak_rss_bytes
a = json.loads(sys.argv[1])
with np.load(a["calib"]) as z:
    cal = StructuredCalibration({k: z[k] for k in z.files}, sequential=a["sequential"], stages=a.get("stages"))
with np.load(a["test"]) as z:
    test = {k: z[k] for k in z.files}
t = time.perf_counter()
model = onnx.load(a["model"])
r = prune_structured(model, target_macs=a["macs"], calibration=cal)
wall, c = time.perf_counter() - t, r.summary["calibration"]
dense, got = run(model, test)["y"], run(r.model, test)["y"]
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_rss_bytes()[0] / 2**20,
                  "test_rel_l2": float(np.linalg.norm(got - dense) / np.linalg.norm(dense)),
                  **{k: c.get(k) for k in ("method", "rejected", "candidates", "outputs", "stages", "check", "check_samples",
                                           "fit_samples", "seconds")},
                  "worst_condition": max((l.get("condition") or 0 for l in c["layers"]), default=None)}))
"""


def resnet50_refit(tmp: Path, samples: int, stages: int | None) -> None:
    """3. ResNet-50 (seeded weights, smooth random images) at 2x fewer MACs: the one-pass re-fit (on the
    dense model's activations) against the sequential one (on the pruned model's own), each checked
    on held-out samples: which one the never-worse check accepts, the output error, the cost."""
    print(f"\n== 4. ResNet-50 re-fit: one pass vs sequential ({samples} samples, {os.cpu_count()} cores visible)")
    mpath, cpath, tpath = export_resnet50(tmp), tmp / f"r50_refit_{samples}.npz", tmp / "r50_refit_test.npz"
    rng = np.random.default_rng(1)
    low = rng.normal(size=(samples + 32, 3, 14, 14)).astype(np.float32)
    images = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)
    np.savez(cpath, x=images[:samples])
    np.savez(tpath, x=images[samples:])  # 32 images no fit and no check sees
    del low, images
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name, seq in (("one pass (dense activations)", False), ("sequential (own activations)", True)):
        args = {"model": str(mpath), "calib": str(cpath), "test": str(tpath), "macs": 0.5, "sequential": seq,
                "stages": stages}
        r = subprocess.run([sys.executable, "-c", REFIT_CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
        if r.returncode:
            print(f"  {name}: failed: {r.stderr[-800:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rej = ", ".join(f"{x['method']} rejected (mean rel-L2 {x['mean_rel_l2_after']:.3g})" for x in res["rejected"] or [])
        cands = ", ".join(f"{m} {e:.3g}" for m, e in (res["candidates"] or {}).items())
        errs = ", ".join(f"{k} {e['rel_l2_before']:.3g} -> {e['rel_l2_after']:.3g}" for k, e in (res["outputs"] or {}).items())
        cond = "n/a" if not res["worst_condition"] else f"{res['worst_condition']:.3g}"
        print(f"  {name:<30} kept: {res['method']:<5} {rej or 'none rejected'}; candidates on the check: {cands}; "
              "output rel-L2 vs dense on "
              f"{res['check_samples']} held-out check samples: {errs}; on 32 unseen test images: "
              f"{res['test_rel_l2']:.3g}; stages {res['stages']}; worst condition {cond}; {res['wall_s']:.0f} s wall, "
              f"peak RSS {res['peak_rss_mb'] / 1024:.2f} GB")
    print(f"  load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 cost measurement")
    ap.add_argument("--no-trained", action="store_true", help="skip the trained small models")
    ap.add_argument("--samples", type=int, default=256, help="ResNet-50 calibration samples (default 256)")
    ap.add_argument("--workdir", default=None, help="keep files here (the ResNet-50 export is reused)")
    ap.add_argument("--no-few-samples", action="store_true", help="skip 3. (recovery at 4x from N unlabeled samples)")
    ap.add_argument("--quick", action="store_true", help="3. with 500 steps per training instead of 2000")
    ap.add_argument("--refit-only", action="store_true", help="only part 4: ResNet-50 one-pass vs sequential re-fit")
    ap.add_argument("--refit-samples", type=int, default=64, help="part 4's calibration samples (default 64)")
    ap.add_argument("--refit-stages", type=int, default=None,
                    help="part 4: group the sequential re-fit's depths into this many passes (default: one per depth)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        work = Path(a.workdir or d)
        work.mkdir(parents=True, exist_ok=True)
        if not a.no_trained and not a.refit_only:
            trained_models(work)
        if not a.no_few_samples and not a.refit_only:
            recovery_from_few_samples((256, 512, 2048), 500 if a.quick else 2000)
        if not a.no_resnet and not a.refit_only:
            resnet50(work, a.samples)
        if not a.no_resnet:
            resnet50_refit(work, a.refit_samples, a.refit_stages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
