"""A trained transformer encoder at 1.5x and 2x fewer MACs: what calibration and one epoch of
label-free distillation recover (issue 21.7). Not a test.

    python bench/bench_transformer.py                    # 6 layers, hidden 384, 12 heads, FFN 1536 (~6 min, quiet 2 cores)
    python bench/bench_transformer.py --quick            # 6 layers, hidden 192, 6 heads, FFN 768
    python bench/bench_transformer.py --hidden 256 --heads 8 --ffn 1024 --train-steps 200 --workdir /tmp/bt

1. A BERT-style sentence encoder (tests/transformer_models.py: post-LN layers, attention mask,
   masked mean pooling and L2 normalisation in the graph) is trained here with linear heads on the
   generated sequence task (does token 1 outnumber token 2, the task metric; first and last token;
   each token's share; sequences of ``--seq`` tokens, 0 to half of them padding), and exported by the TorchScript exporter at opset 17 with dynamic batch and
   sequence axes.
2. ``--samples`` unlabeled sequences are written as text, one sentence per line, with a
   ``tokenizers`` WordLevel ``tokenizer.json`` whose ids are the model's (tests/text_data.py), and read
   back by the ``text:`` data spec: the way a user feeds sentences.
3. For each MAC target (``--target-macs`` 0.667 and 0.5: 1.5x and 2x fewer), through the CLI as a
   user runs it, each command in a fresh process (wall time and peak RSS of that process):
   ``prune --structured --target-macs F`` (heads and FFN columns, L2 criterion) /
   the same with ``--calibrate text:...?split=all --calibration-samples N`` /
   from the calibrated model, ``finetune --teacher DENSE --data text:... --epochs 1`` (label-free;
   the output kind, embedding, is inferred from the graph's L2 normalisation, so the loss is
   ``1 - cosine``; ``--distill-features`` matches the residual stream too;
   ``--distill-uncalibrated`` also distils the uncalibrated pruned model).
4. On held-out labelled sequences none of them saw: mean cosine of each model's embeddings to the
   dense model's, nearest-neighbour agreement, and the task metric (the trained probe's accuracy on
   the model's embeddings).

Targets (issue 21.7): calibrated 2x mean cosine >= 0.95, distilled >= 0.985, calibration of a
6-layer encoder on 1024 sequences of 64 tokens under 60 s on 2 cores.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# one CLI command in a fresh process; reports its own wall time and peak RSS (VmHWM)
CHILD = r"""
import json, sys, time
from onnxprune.cli import main
from onnxprune.profiling.memory import peak_rss_bytes
argv, report = json.loads(sys.argv[1]), sys.argv[2]
t, code = time.perf_counter(), 0
try:
    main(argv)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
with open(report, "w") as f:
    json.dump({"code": code, "wall_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_bytes()[0] / 2**20}, f)
"""


def cli(argv: list[str], tmp: Path) -> tuple[dict, str]:
    """Run ``onnxprune ARGV`` in a fresh process: ({code, wall_s, peak_rss_mb}, stdout)."""
    report = tmp / "child.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(a) for a in argv]), str(report)],
                       capture_output=True, text=True, env=env)
    res = json.loads(report.read_text()) if report.exists() else {"code": r.returncode}
    if res["code"]:
        raise SystemExit(f"onnxprune {' '.join(map(str, argv[:2]))} failed: {r.stderr.strip()[-1500:]}")
    report.unlink()
    return res, r.stdout


def task_targets(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """What the encoder is trained to tell from its embedding, so that the embedding carries more than
    one bit: does token 1 outnumber token 2 (``label``, the task metric), the first and the last real
    token (order), and the share of each token (content)."""
    from transformer_models import VOCAB

    last = ids[np.arange(len(ids)), mask.sum(1) - 1]
    hist = np.stack([(ids == t).sum(1) for t in range(1, VOCAB)], 1) / mask.sum(1, keepdims=True)
    return {"label": ((ids == 1).sum(1) > (ids == 2).sum(1)).astype(np.int64), "first": ids[:, 0],
            "last": last, "hist": hist.astype(np.float32)}


def train_encoder(args: argparse.Namespace):
    """BertLike trained with linear heads on :func:`task_targets`; returns (model, label probe)."""
    import torch  # lazy: the benchmark trains with torch ([train] extra)
    import torch.nn.functional as F

    from transformer_models import VOCAB, BertLike, sequence_task

    torch.manual_seed(0)
    model = BertLike(d=args.hidden, heads=args.heads, ffn=args.ffn, layers=args.layers, max_len=args.seq)
    heads = torch.nn.ModuleDict({"label": torch.nn.Linear(args.hidden, 2), "first": torch.nn.Linear(args.hidden, VOCAB),
                                 "last": torch.nn.Linear(args.hidden, VOCAB), "hist": torch.nn.Linear(args.hidden, VOCAB - 1)})
    ids, mask, _ = sequence_task(4096, args.seq, seed=0)
    tg = {k: torch.from_numpy(v) for k, v in task_targets(ids, mask).items()}
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.train_steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    hits = []
    for step in range(args.train_steps):
        b = torch.randint(0, len(ids), (args.batch,))
        e = model(ids[b], mask[b]) * 8
        out = {k: h(e) for k, h in heads.items()}
        loss = sum(F.cross_entropy(out[k], tg[k][b]) for k in ("label", "first", "last")) \
            + 10 * F.mse_loss(out["hist"], tg["hist"][b])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        hits.append([float((out[k].argmax(1) == tg[k][b]).float().mean()) for k in ("label", "first", "last")])
        if (step + 1) % max(1, args.train_steps // 5) == 0:
            acc = np.mean(hits[-20:], 0)
            print(f"  step {step + 1}/{args.train_steps}: loss {loss.item():.3f}, train acc (last 20 steps) "
                  f"label {acc[0]:.3f} first {acc[1]:.3f} last {acc[2]:.3f}", flush=True)
    return model.eval(), heads["label"].eval()


def run_model(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input_ids": ids[i:i + 64], "attention_mask": mask[i:i + 64]})[0]
                           for i in range(0, len(ids), 64)])


def figures(e: np.ndarray, dense: np.ndarray, probe_w: np.ndarray, probe_b: np.ndarray, y: np.ndarray) -> dict:
    """Mean cosine and nearest-neighbour agreement to dense, and the probe's accuracy (task metric)."""
    en, dn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (e, dense))
    sims_e, sims_d = en @ en.T, dn @ dn.T
    np.fill_diagonal(sims_e, -np.inf)
    np.fill_diagonal(sims_d, -np.inf)
    acc = float(((e * 8 @ probe_w.T + probe_b).argmax(1) == y).mean())
    return {"mean_cosine": float((en * dn).sum(1).mean()),
            "nn_agreement": float((sims_e.argmax(1) == sims_d.argmax(1)).mean()),
            "rel_l2": float(np.linalg.norm(e - dense) / np.linalg.norm(dense)), "task_accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="hidden 192, 6 heads, FFN 768 (about 4x cheaper)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--samples", type=int, default=1024, help="unlabeled sentences (calibration and distillation)")
    ap.add_argument("--held-out", type=int, default=512)
    ap.add_argument("--targets", default="0.667,0.5", help="fractions of MACs kept")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--distill-features", action="store_true",
                    help="distil with finetune --distill-features (the residual stream too)")
    ap.add_argument("--distill-uncalibrated", action="store_true",
                    help="also distil the uncalibrated pruned model (what distillation alone recovers)")
    ap.add_argument("--distill-lr", type=float, default=5e-4, help="AdamW peak learning rate of the epoch")
    ap.add_argument("--distill-batch", type=int, default=16)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    size = (192, 6, 768) if args.quick else (384, 12, 1536)
    args.hidden, args.heads, args.ffn = (v if v is not None else d for v, d in zip((args.hidden, args.heads, args.ffn), size))
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="bench-transformer-"))
    tmp.mkdir(parents=True, exist_ok=True)
    import torch  # lazy: the benchmark trains with torch ([train] extra)

    from text_data import word_tokenizer, write_sentences
    from transformer_models import export_bert, sequence_task

    print(f"machine: {platform.machine()}, {os.cpu_count()} logical cores, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"== encoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN {args.ffn}, "
          f"sequences of {args.seq} tokens; training {args.train_steps} steps at batch {args.batch}")
    t = time.perf_counter()
    model, probe = train_encoder(args)
    dense = export_bert(model, tmp / "dense.onnx", seq=args.seq)
    print(f"  trained and exported in {time.perf_counter() - t:.0f} s")

    ids, mask, _ = sequence_task(args.samples, args.seq, seed=5)
    tok = word_tokenizer(tmp / "tokenizer.json")
    write_sentences(tmp / "sentences.txt", ids, mask)
    text = f"text:{tmp / 'sentences.txt'}?tokenizer={tok}&max_length={args.seq}"
    hid, hmask, _ = sequence_task(args.held_out, args.seq, seed=9)
    hy = task_targets(hid, hmask)["label"]
    dense_e = run_model(dense, hid, hmask)
    pw, pb = probe.weight.detach().numpy(), probe.bias.detach().numpy()
    dense_acc = figures(dense_e, dense_e, pw, pb, hy)["task_accuracy"]
    print(f"  {args.samples} unlabeled sentences ({1 - mask.mean():.0%} of positions padding); held out: "
          f"{args.held_out} labelled sequences; dense task accuracy {dense_acc:.4f}")

    shapes = ["--input-shape", f"input_ids=1x{args.seq}", "--input-shape", f"attention_mask=1x{args.seq}"]
    rows = []
    print(f"\n{'MACs':>6} {'recovery':<36} {'cosine':>7} {'NN agr':>7} {'rel_l2':>7} {'task acc':>8} "
          f"{'time s':>7} {'peak MB':>8}  notes")
    for frac in (float(f) for f in args.targets.split(",")):
        base = ["prune", dense, "--structured", "--target-macs", frac, *shapes, "--json"]
        runs = [("none", base + ["-o", tmp / "none.onnx"], tmp / "none.onnx"),
                ("calibration", base + ["-o", tmp / "cal.onnx", "--calibrate", f"{text}&split=all",
                                        "--calibration-samples", args.samples], tmp / "cal.onnx")]
        if not args.no_distill:
            features = ["--distill-features"] if args.distill_features else []
            starts = [("+ 1 epoch distillation", "cal")]
            if args.distill_uncalibrated:
                starts.append(("none + 1 epoch distillation", "none"))
            for label, start in starts:
                runs.append((label + (" (stream)" if features else ""),
                             ["finetune", tmp / f"{start}.onnx", "-o", tmp / f"dist_{start}.onnx", "--teacher", dense,
                              "--data", text, "--epochs", "1", "--optimizer", "adamw", "--lr", args.distill_lr,
                              "--batch-size", args.distill_batch, *features, "--no-progress", "--json"],
                             tmp / f"dist_{start}.onnx"))
        reduction = None
        for name, argv, out in runs:
            res, stdout = cli(argv, tmp)
            note = ""
            if argv[0] == "prune":
                s = json.loads(stdout)
                reduction = s["macs_reduction"]
                cal = s.get("calibration")
                if cal:
                    note = (f"calibration {cal['seconds']:.1f} s ({cal['method']}, {cal['samples']} samples, "
                            f"{cal['stages']} stages, mask {cal.get('mask')})")
                    res["calibration_s"] = cal["seconds"]
            else:
                hist = json.loads(stdout)
                v0, v1 = hist["initial_val"][0], hist["best_val"][0]
                res["finetune"] = {"best_step": hist["best_step"], "steps": hist["steps"], "seconds": hist["seconds"],
                                   "val_mean_cosine": [v0.get("mean_cosine"), v1.get("mean_cosine")]}
                note = (f"step {hist['best_step']} of {hist['steps']} kept; val cosine {v0.get('mean_cosine'):.4f} -> "
                        f"{v1.get('mean_cosine'):.4f} ({v1['kind']})")
            fig = figures(run_model(out, hid, hmask), dense_e, pw, pb, hy)
            rows.append({"macs_kept": frac, "macs_reduction": reduction, "recovery": name, **fig, **res})
            print(f"{reduction:5.2f}x {name:<36} {fig['mean_cosine']:7.4f} {fig['nn_agreement']:7.3f} "
                  f"{fig['rel_l2']:7.4f} {fig['task_accuracy']:8.4f} {res['wall_s']:7.1f} {res['peak_rss_mb']:8.0f}  "
                  f"{note}", flush=True)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "dense_task_accuracy": dense_acc, "rows": rows, "load_average_end": os.getloadavg()[0]}
    (tmp / "bench_transformer.json").write_text(json.dumps(result, indent=1))
    print(f"\nfigures: {tmp / 'bench_transformer.json'}; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
