"""``profile_model`` and ``compare_models``: the Python API behind ``onnxprune profile`` / ``compare``.

``profile_model`` returns (the ``profile --json`` object; key names are stable, reports read them)::

    {"model", "file_bytes", "params", "macs", "sparsity",   # of the model (MACs per sample, batch 1)
     "results": [ one record per profile and batch size ],
     "skipped": [ {"profile", "batch_size", "reason"} ]}   # e.g. a batch size a fixed-batch model cannot run

and each record holds::

    profile, profile_source, description, backend, precision, provenance, emulates, provider,
    batch_size, input_shapes, threads {intra_op, inter_op, intra_op_effective}, cpu_affinity,
    latency_ms {min, mean, p50, p90, p95, p99, max, std}, runs, warmup_runs, duration_s, throughput_per_s,
    peak_rss_bytes, rss_before_load_bytes, memory_method, [peak_rss_bytes_arena_off],
    [gpu_memory_bytes, gpu_memory_method], [engine_device_memory_bytes | torch_cuda_max_allocated_bytes], latency_budget_ms, meets_latency_budget, memory_limit_mb, meets_memory_limit,
    file_bytes, params, macs, sparsity, versions {...}, notes [...], [per_node {..., measured_on}],
    measured_on {host, cpu_model, cores {logical, physical, usable}, gpu, gpu_driver, onnxruntime, tensorrt,
                 [torch], backend, threads {intra_op, inter_op, source}, co_tenancy (exclusive | shared),
                 co_tenancy_basis {method, window_s, others_cores, threshold_cores, load_avg_1m, busy_processes,
                 reason}, fingerprint, at}   (where and how it was measured: :mod:`.provenance`)

Memory keys are absent with ``memory=False``. ``meets_latency_budget`` compares p90 (MLPerf's
single-stream percentile) with the budget; ``meets_memory_limit`` compares peak RSS plus GPU memory
with the limit; both are null when the profile sets no budget or memory was not measured.
``provenance`` is the profile's, downgraded to ``emulated`` when the machine is not the one the
profile describes (another CPU architecture or GPU).

A profile with ``remote:`` set is measured on that device over SSH (:mod:`.remote`): same record,
plus ``remote`` {target, host, platform, arch, cpu_model, cpu_cores, memory_bytes, onnxruntime,
providers, python, onnxprune, workdir, model_copied}; ``compare_models`` then adds it at the top.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from ..core.errors import OnnxPruneError
from ..metrics.inspection import inspect_model
from ..core.model_io import load_graph
from .environment import effective_provenance, effective_threads, thread_notes, versions
from .hw_profile import HwProfile, load_hw_profile
from .measure import Timing, cpu_affinity, measure, measure_interleaved
from .memory import measure_memory
from .pernode import per_node_profile
from .provenance import machine_facts, measured_on, merge_measured_on, observe, runner_threads
from .provider import ORT_PROVIDER
from .remote import compare_remote, profile_remote, sessions
from .runners import BatchSizeError, batch_input_shapes, check_available, make_feeds, make_runner
from .stats import latency_summary, throughput

DEFAULT_PROFILE = "x86-server-cpu"
#: arena-off peak is reported only when it differs from arena-on by more than this
ARENA_DIFF_BYTES = 1 << 20

ProfileArg = Union[str, os.PathLike, HwProfile]


def load_profiles(profiles: ProfileArg | Iterable[ProfileArg] | None) -> list[HwProfile]:
    """Profiles by name, path or object (one or several); none -> the default x86 server CPU."""
    if profiles is None or isinstance(profiles, (str, os.PathLike, HwProfile)):
        profiles = [profiles or DEFAULT_PROFILE]
    return [load_hw_profile(p) for p in profiles] or [load_hw_profile(DEFAULT_PROFILE)]


def _explicit_batches(batch_sizes: Sequence[int] | None,
                      input_shapes: Mapping[str, tuple[int, ...]] | None) -> list[int] | None:
    """Batch sizes that replace the profiles' own: ``batch_sizes`` when given, else the batch
    dimension of explicit ``input_shapes`` (``--input-shape x=4x3x32x32`` means batch 4)."""
    if batch_sizes:
        if any(int(b) < 1 for b in batch_sizes):
            raise OnnxPruneError(f"batch sizes must be positive, got {list(batch_sizes)}")
        return [int(b) for b in batch_sizes]
    firsts = sorted({int(s[0]) for s in (input_shapes or {}).values() if len(s)})
    if len(firsts) > 1:
        raise OnnxPruneError(f"--input-shape gives different batch dimensions {firsts}; say which with --batch-size")
    return firsts or None


def _timing_figures(t: Timing, batch: int) -> dict[str, Any]:
    return {"latency_ms": latency_summary(t.seconds), "runs": t.runs, "warmup_runs": t.warmup_runs,
            "duration_s": t.duration_s, "throughput_per_s": throughput(t.seconds, batch)}


class _ModelFigures:
    """Size, params, MACs (per sample) and sparsity of one model, inspected once per input geometry."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: dict[tuple, dict[str, Any]] = {}

    def at(self, shapes: Mapping[str, tuple[int, ...]], batch: int) -> dict[str, Any]:
        key = tuple(sorted((n, tuple(s[1:])) for n, s in shapes.items()))
        if key not in self._cache:
            info = inspect_model(self.path, dict(shapes))
            macs = info["macs"]
            self._cache[key] = {"file_bytes": info["file_bytes"], "params": info["params"],
                                "macs": None if macs is None else macs // max(batch, 1), "sparsity": info["sparsity"]}
        return self._cache[key]


def _profile_context(profile: HwProfile) -> dict[str, Any]:
    machine_facts()  # read once, before any cpu_affinity pinning narrows the usable cores
    vers = versions(profile)
    provenance, notes = effective_provenance(profile, vers)
    return {"profile": profile.name, "profile_source": profile.source, "description": profile.description,
            "backend": profile.backend, "precision": profile.precision, "provenance": provenance,
            "emulates": profile.emulates, "threads": effective_threads(profile), "cpu_affinity": profile.cpu_affinity,
            "versions": vers, "notes": [*profile.notes, *thread_notes(profile), *notes]}


def _budgets(record: dict[str, Any], profile: HwProfile) -> None:
    record["latency_budget_ms"] = profile.latency_budget_ms
    record["meets_latency_budget"] = (record["latency_ms"]["p90"] <= profile.latency_budget_ms
                                      if profile.latency_budget_ms is not None else None)
    record["memory_limit_mb"] = profile.memory_limit_mb
    used = record.get("peak_rss_bytes")
    if profile.memory_limit_mb is None or used is None:
        record["meets_memory_limit"] = None
    else:
        record["meets_memory_limit"] = used + (record.get("gpu_memory_bytes") or 0) <= profile.memory_limit_mb * 2**20


def _memory(path: Path, profile: HwProfile, feeds: Mapping[str, Any]) -> dict[str, Any]:
    on = measure_memory(path, profile, feeds, arena=True)
    out = {"peak_rss_bytes": on["peak_rss_bytes"], "rss_before_load_bytes": on["rss_before_load_bytes"],
           "memory_method": on["method"]}
    if "gpu_memory_bytes" in on:
        out["gpu_memory_bytes"] = on["gpu_memory_bytes"]
        out["gpu_memory_method"] = on["gpu_memory_method"]
    if profile.backend in ORT_PROVIDER:
        off = measure_memory(path, profile, feeds, arena=False)
        if abs(off["peak_rss_bytes"] - on["peak_rss_bytes"]) > ARENA_DIFF_BYTES:
            out["peak_rss_bytes_arena_off"] = off["peak_rss_bytes"]
    return out


@sessions()  # several remote profiles on one device share one copy of the model
def profile_model(path: str | os.PathLike, profiles: ProfileArg | Iterable[ProfileArg] | None = None,
                  per_node: bool = False, input_shapes: Mapping[str, tuple[int, ...]] | None = None, *,
                  batch_sizes: Sequence[int] | None = None, memory: bool = True, top_nodes: int = 15) -> dict[str, Any]:
    """Measure ``path`` on each profile and batch size (see the module docstring for the result).

    ``batch_sizes`` replaces the profiles' own; ``input_shapes`` (``--input-shape``, full dims) wins
    over a profile's input shapes, its dimension 0 replaced by each batch size (without
    ``batch_sizes``, that dimension 0 is the batch size). Every profile's
    backend is checked before anything is measured, so a missing GPU fails at once.
    """
    path = Path(path)
    profs = load_profiles(profiles)
    for prof in profs:
        check_available(prof)
    batch_sizes = _explicit_batches(batch_sizes, input_shapes)
    model = load_graph(path)  # inputs only: ONNX Runtime holds the weights
    figures = _ModelFigures(path)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for prof in profs:
        if prof.remote:
            part = profile_remote(path, prof, per_node=per_node, input_shapes=input_shapes, batch_sizes=batch_sizes,
                                  memory=memory, top_nodes=top_nodes)
            results.extend(part["results"])
            skipped.extend(part["skipped"])
            continue
        context = _profile_context(prof)
        for batch in batch_sizes or prof.batch_sizes:
            try:
                shapes = batch_input_shapes(model, batch, prof.shapes_for_batch(batch), input_shapes)
            except BatchSizeError as exc:
                skipped.append({"profile": prof.name, "batch_size": batch, "reason": str(exc)})
                continue
            record = {**context, "notes": list(context["notes"]), "batch_size": batch,
                      "input_shapes": {k: list(v) for k, v in shapes.items()}}
            feeds = make_feeds(model, shapes)
            record.update(_measure_one(path, prof, feeds, batch, record["notes"]))
            if memory:
                record.update(_memory(path, prof, feeds))
            _budgets(record, prof)
            record.update(figures.at(shapes, batch))
            if per_node:
                if prof.backend in ORT_PROVIDER:
                    record["per_node"] = per_node_profile(path, prof, feeds, top=top_nodes)
                else:
                    record["notes"].append("per-node breakdown is available for the ONNX Runtime backends only")
            results.append(record)
    if not results:
        raise OnnxPruneError(f"{path}: nothing measured: " + "; ".join(s["reason"] for s in skipped))
    static = figures.at(*next((r["input_shapes"], r["batch_size"]) for r in results))
    return {"model": str(path), **static, "results": results, "skipped": skipped}


def _measure_one(path: Path, prof: HwProfile, feeds: Mapping[str, Any], batch: int, notes: list[str]) -> dict[str, Any]:
    with cpu_affinity(prof.cpu_affinity, f"profile {prof.name}") as affinity_notes, contextlib.ExitStack() as stack:
        runner = make_runner(prof, path, feeds)
        stack.callback(runner.close)
        with observe(prof) as seen:
            timing = measure(runner, warmup_runs=prof.warmup_runs, min_runs=prof.min_runs, min_duration_s=prof.min_duration_s)
        info = runner.info()
        threads = runner_threads(runner, prof)
    notes.extend(affinity_notes)
    notes.extend(n for n in runner.notes if n not in notes)
    return {"provider": runner.provider, **_timing_figures(timing, batch), **info,
            "measured_on": measured_on(prof, threads, seen)}


def compare_models(a: str | os.PathLike, b: str | os.PathLike, profile: ProfileArg | None = None, *,
                   batch_sizes: Sequence[int] | None = None, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   memory: bool = False) -> dict[str, Any]:
    """Time ``a`` and ``b`` interleaved (A B A B ..., same inputs) on one profile, side by side.

    Returns ``{"profile", "backend", "precision", "provenance", "provider", "threads", "versions",
    "notes", "a": {model, file_bytes, params, macs, sparsity}, "b": {...}, "ratios": {macs_b_over_a,
    params_b_over_a, file_bytes_b_over_a, macs_reduction}, "comparisons": [{"batch_size", "a": timing,
    "b": timing, "ratios": {latency_p50_b_over_a, latency_mean_b_over_a, speedup_p50, speedup_mean}}]}``
    where ``timing`` holds ``latency_ms``, ``runs``, ``duration_s``, ``throughput_per_s`` (and the
    memory keys with ``memory=True``). ``speedup = a / b`` latency; ``macs_reduction = a / b`` MACs.
    Each comparison has its ``measured_on`` (:mod:`.provenance`); the top-level ``measured_on`` merges
    them (``shared`` if any timing was).
    """
    prof = load_profiles(profile)[0]
    check_available(prof)
    batch_sizes = _explicit_batches(batch_sizes, input_shapes)
    pa, pb = Path(a), Path(b)
    if prof.remote:
        load_graph(pa), load_graph(pb)  # a bad file fails here, before any copying
        return compare_remote(pa, pb, prof, batch_sizes=batch_sizes, input_shapes=input_shapes, memory=memory)
    ma, mb = load_graph(pa), load_graph(pb)
    fa, fb = _ModelFigures(pa), _ModelFigures(pb)
    context = _profile_context(prof)
    comparisons, skipped = [], []
    static_a = static_b = None
    provider = None
    for batch in batch_sizes or prof.batch_sizes:
        try:
            sa = batch_input_shapes(ma, batch, prof.shapes_for_batch(batch), input_shapes)
            sb = batch_input_shapes(mb, batch, prof.shapes_for_batch(batch), input_shapes)
        except BatchSizeError as exc:
            skipped.append({"batch_size": batch, "reason": str(exc)})
            continue
        if sa != sb:
            raise OnnxPruneError(f"{pa} and {pb} take different inputs ({sa} vs {sb}); compare needs models with the same inputs")
        feeds = make_feeds(ma, sa)
        with cpu_affinity(prof.cpu_affinity, f"profile {prof.name}") as affinity_notes, contextlib.ExitStack() as stack:
            ra = make_runner(prof, pa, feeds)
            stack.callback(ra.close)
            rb = make_runner(prof, pb, feeds)
            stack.callback(rb.close)
            with observe(prof) as seen:
                ta, tb = measure_interleaved([ra, rb], warmup_runs=prof.warmup_runs, min_runs=prof.min_runs,
                                             min_duration_s=prof.min_duration_s)
            where = measured_on(prof, runner_threads(ra, prof), seen)
        provider = ra.provider
        context["notes"].extend(n for n in [*affinity_notes, *ra.notes] if n not in context["notes"])
        xa, xb = _timing_figures(ta, batch), _timing_figures(tb, batch)
        if memory:
            xa.update(_memory(pa, prof, feeds))
            xb.update(_memory(pb, prof, feeds))
        la, lb = xa["latency_ms"], xb["latency_ms"]
        comparisons.append({"batch_size": batch, "input_shapes": {k: list(v) for k, v in sa.items()}, "a": xa, "b": xb,
                            "measured_on": where,
                            "ratios": {"latency_p50_b_over_a": lb["p50"] / la["p50"],
                                       "latency_mean_b_over_a": lb["mean"] / la["mean"],
                                       "speedup_p50": la["p50"] / lb["p50"], "speedup_mean": la["mean"] / lb["mean"]}})
        if static_a is None:
            static_a, static_b = fa.at(sa, batch), fb.at(sb, batch)
    if not comparisons:
        raise OnnxPruneError("nothing compared: " + "; ".join(s["reason"] for s in skipped))
    return {**context, "provider": provider, "interleaved": True,
            "measured_on": merge_measured_on([c["measured_on"] for c in comparisons]),
            "a": {"model": str(pa), **static_a}, "b": {"model": str(pb), **static_b},
            "ratios": _static_ratios(static_a, static_b), "comparisons": comparisons, "skipped": skipped}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _static_ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    return {"macs_b_over_a": _ratio(b["macs"], a["macs"]), "params_b_over_a": _ratio(b["params"], a["params"]),
            "file_bytes_b_over_a": _ratio(b["file_bytes"], a["file_bytes"]), "macs_reduction": _ratio(a["macs"], b["macs"])}
