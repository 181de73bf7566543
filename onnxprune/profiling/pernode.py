"""Per-node breakdown from ONNX Runtime's own profiler (``--per-node``).

ONNX Runtime optimizes the graph before running it (Conv+BatchNorm+Relu fuse into one kernel, NCHWc
layout nodes appear), so times belong to the *runtime's* nodes. Each entry names that node, its
kernel op, and ``model_node``: the node of the model file it comes from (same name, or the producer
of the tensor a layout-converted kernel writes), or null for nodes the runtime inserted.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from .hw_profile import HwProfile
from ..core.model_io import load_graph
from .runners import ort_session
from types import SimpleNamespace
from .provenance import measured_on, observe, runner_threads

_SUFFIXES = ("_nchwc", "_fused")


def parse_trace(events: Iterable[Mapping[str, Any]], skip_runs: int = 0) -> list[dict[str, Any]]:
    """Node kernel events of an ORT profile trace (``cat == "Node"``, ``*_kernel_time``), after the
    first ``skip_runs`` ``model_run`` events (warm-up). Returns ``{"node", "op_type", "provider", "us"}``."""
    events = list(events)
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    since = runs[skip_runs] if skip_runs and len(runs) > skip_runs else (runs[0] if runs else 0)
    out = []
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or e.get("ts", 0) < since:
            continue
        args = e.get("args", {})
        out.append({"node": name[: -len("_kernel_time")], "op_type": args.get("op_name", "?"),
                    "provider": args.get("provider"), "us": float(e.get("dur", 0))})
    return out


def model_node_map(model: onnx.ModelProto) -> tuple[set[str], dict[str, str]]:
    """(node names, output tensor -> producing node name) of the model file."""
    names = {n.name for n in model.graph.node if n.name}
    producer = {o: n.name for n in model.graph.node for o in n.output if o}
    return names, producer


def to_model_node(runtime_name: str, names: set[str], producer: Mapping[str, str]) -> str | None:
    """The model's node behind a runtime node name, or None when the runtime inserted it."""
    if runtime_name in names:
        return runtime_name
    base = runtime_name
    for suffix in _SUFFIXES:
        base = base.removesuffix(suffix)
    if base in names:
        return base
    return producer.get(base)


def summarize(kernels: list[dict[str, Any]], runs: int, model: onnx.ModelProto, top: int = 15) -> dict[str, Any]:
    """Top nodes and ops by total kernel time (per run, in ms), with their share of all kernel time."""
    names, producer = model_node_map(model)
    total_us = sum(k["us"] for k in kernels) or 1.0
    runs = max(runs, 1)
    per_node: dict[str, dict[str, Any]] = {}
    per_op: dict[str, dict[str, Any]] = {}
    for k in kernels:
        n = per_node.setdefault(k["node"], {"node": k["node"], "op_type": k["op_type"], "provider": k["provider"],
                                            "model_node": to_model_node(k["node"], names, producer), "us": 0.0})
        n["us"] += k["us"]
        n["min_us"] = min(n.get("min_us", k["us"]), k["us"])
        o = per_op.setdefault(k["op_type"], {"op_type": k["op_type"], "nodes": set(), "us": 0.0})
        o["us"] += k["us"]
        o["nodes"].add(k["node"])

    def finish(d: dict[str, Any]) -> dict[str, Any]:
        us = d.pop("us")
        if "nodes" in d:
            d["nodes"] = len(d["nodes"])
        if "min_us" in d:  # the fastest single run: robust to a run pre-empted on a busy machine
            d["ms_min"] = d.pop("min_us") / 1e3
        return {**d, "ms_per_run": us / runs / 1e3, "share": us / total_us}

    nodes = sorted(per_node.values(), key=lambda d: -d["us"])
    min_total_us = sum(d["min_us"] for d in nodes)  # (before finish() folds min_us into ms_min)
    ops = sorted(per_op.values(), key=lambda d: -d["us"])
    return {
        "runs": runs,
        "kernel_ms_per_run": total_us / runs / 1e3,
        "kernel_ms_min": min_total_us / 1e3,  # sum of each node's fastest run
        "top_nodes": [finish(d) for d in nodes[:top]],
        "top_ops": [finish(d) for d in ops[:top]],
        "nodes_total": len(nodes),
        "note": "times of ONNX Runtime's optimized graph (fused kernels carry the time of the nodes fused into them)",
    }


def per_node_profile(path: str | os.PathLike, profile: HwProfile, feeds: Mapping[str, np.ndarray], *,
                     runs: int | None = None, top: int = 15) -> dict[str, Any]:
    """Run ``path`` with ONNX Runtime's profiler on and summarize the kernels (ORT backends only)."""

    runs = runs or max(1, min(profile.min_runs, 50))
    warmup = max(1, min(profile.warmup_runs, 10))


    with tempfile.TemporaryDirectory(prefix="onnxprune-prof-") as tmp:
        sess = ort_session(path, profile, profiling_prefix=str(Path(tmp) / "ort"))
        with observe(profile) as seen:  # these kernel times are figures of their own (latency tables use them)
            for _ in range(warmup + runs):
                sess.run(None, dict(feeds))
        threads = runner_threads(SimpleNamespace(session=sess), profile)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text(encoding="utf-8"))
    kernels = parse_trace(events, skip_runs=warmup)
    return {**summarize(kernels, runs, load_graph(path), top=top), "measured_on": measured_on(profile, threads, seen)}
