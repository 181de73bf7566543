"""Over-2-GB check (not a test: it writes ~5 GB and needs ~12 GB of RAM): the CLI on a model whose
weights exceed protobuf's 2 GB limit, so they must live in an external data file.

    python bench/bench_large_model.py [--hidden 36864] [--keep]

Builds an MLP (Gemm 8192 -> HIDDEN -> 8192 -> 10, ~2.4 GB of float32 weights at the default),
saves it (external data), then runs the real commands on it in fresh processes, as a user would:
``inspect --json``, ``prune --structured --ratio 0.5``, ``prune --unstructured --sparsity 0.5``
and ``profile --hw ci-cpu``. Prints each command's wall time and peak memory and checks the
results: exit code 0, figures that match the model, pruned files that ONNX Runtime runs and that
reference their own external data files (the input file is never touched).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.core.model_io import PROTOBUF_LIMIT, file_bytes, model_files, save_model  # noqa: E402


def build(hidden: int, d_in: int = 8192, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Relu -> Gemm with seeded random weights (transB=1, as exporters write)."""
    rng = np.random.default_rng(seed)
    dims = [d_in, hidden, d_in, classes]
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = rng.standard_normal((b, a), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(a))
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(rng.standard_normal(b, dtype=np.float32) * np.float32(0.1), f"fc{i}.bias")]
        y = "output" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"{y}_pre" if y != "output" else y],
                                      name=f"fc{i}", transB=1))
        if y != "output":
            nodes.append(helper.make_node("Relu", [f"{y}_pre"], [y], name=f"relu{i}"))
        x = y
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, d_in])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what exporters write for opset 17 (helper's default is the newest IR, which ORT may not know)
    return model


def run(label: str, args: list[str]) -> tuple[float, dict | None]:
    """One onnxprune command in a fresh process: wall time, peak RSS of that process, parsed JSON."""
    # VmHWM, not ru_maxrss: a child inherits the ru_maxrss of this (large) process at fork
    code = ("import sys; from onnxprune.cli import main; from onnxprune.profiling.memory import peak_rss_bytes\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('PEAK_RSS_KB', peak_rss_bytes()[0] // 1024, file=sys.stderr)\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = next((int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    print(f"  {label:34} exit {r.returncode}  {wall:6.1f} s  peak RSS {peak / 2**20:5.1f} GiB")
    if r.returncode != 0:
        print("    " + "\n    ".join(line for line in r.stderr.splitlines() if not line.startswith("PEAK_RSS_KB")))
        raise SystemExit(f"{label} failed")
    return wall, (json.loads(r.stdout) if "--json" in args else None)


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def check_runs(path: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.ones((1, 8192), dtype=np.float32)})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all(), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=36864, help="hidden width (36864: ~2.4 GB of weights)")
    ap.add_argument("--keep", type=Path, help="write the models here and keep them (default: a temporary folder)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="onnxprune-large-") as tmp:
        d = args.keep or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        src = d / "big.onnx"
        t0 = time.perf_counter()
        model = build(args.hidden)
        weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        save_model(model, src)
        del model
        files = model_files(src)
        print(f"model: {params / 1e6:.1f} M params, {weight_bytes / 2**30:.2f} GiB of weights "
              f"({'over' if weight_bytes > PROTOBUF_LIMIT else 'UNDER'} the 2 GiB protobuf limit), "
              f"written in {time.perf_counter() - t0:.1f} s as {', '.join(p.name for p in files)}; "
              f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
        assert len(files) == 2 or weight_bytes <= PROTOBUF_LIMIT, "over 2 GiB the weights must be in an external data file"
        before = digest(files)

        _, info = run("inspect --json", ["inspect", str(src), "--json"])
        assert info["params"] == params and info["file_bytes"] == file_bytes(src), (info["params"], params)

        out_s = d / "big_structured.onnx"
        _, res = run("prune --structured --ratio 0.5", ["prune", str(src), "-o", str(out_s), "--structured",
                                                        "--ratio", "0.5", "--json"])
        kept = res["params_after"] / res["params_before"]
        print(f"    params {res['params_before'] / 1e6:.1f} M -> {res['params_after'] / 1e6:.1f} M ({kept:.2f}), "
              f"MACs {res['macs_before'] / 1e6:.1f} M -> {res['macs_after'] / 1e6:.1f} M; files "
              f"{', '.join(p.name for p in model_files(out_s))}")
        h, m = args.hidden // 2, 8192 // 2  # ratio 0.5 halves both hidden layers (the classifier keeps its 10)
        assert res["params_after"] == 8192 * h + h + h * m + m + m * 10 + 10, res["params_after"]
        check_runs(out_s)

        out_u = d / "big_unstructured.onnx"
        _, res = run("prune --unstructured --sparsity 0.5", ["prune", str(src), "-o", str(out_u), "--unstructured",
                                                             "--sparsity", "0.5", "--json"])
        print(f"    achieved sparsity {res['achieved_sparsity']:.4f} (target 0.5); files "
              f"{', '.join(p.name for p in model_files(out_u))}")
        assert abs(res["achieved_sparsity"] - 0.5) < 1e-3
        check_runs(out_u)

        _, prof = run("profile --hw ci-cpu --json", ["profile", str(src), "--hw", "ci-cpu", "--json"])
        r = prof["results"][0]
        print(f"    p50 {r['latency_ms']['p50']:.1f} ms, peak RSS of the profiling process "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, provider {r['provider']}")

        assert digest(files) == before, "the input model was modified"
        print("input model unchanged; all commands succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
