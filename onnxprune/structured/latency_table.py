"""Per-layer latency tables for latency-aware channel allocation (HALP, Shen et al. 2022).

Every Conv / Gemm / MatMul-with-weights whose channels belong to a prunable group is timed *alone*
on the target hardware profile at a few kept widths of its output channels and of its input
channels (fractions :data:`WIDTHS` of the full count, the other side full). So is every attention
product (a MatMul of two activations, ``Q @ K^T`` and ``attn @ V``) whose head axis a head group
owns, at a few kept head counts; all at the model's input shapes (a transformer's sequence length
from ``--input-shape``: :func:`static_view`). A layer's latency at
any (out, in) width is then read off the two curves, assumed separable::

    t(out, in) = t_out(out) * t_in(in) / t(full, full)

each curve a robust line through its points (:func:`line_fit`), and a pruned model's latency is
estimated as the measured dense latency minus what its layers save.
The estimate guides the allocator; the result is always verified by an interleaved measurement.
A layer with a variant the profiler did not time (:attr:`LatencyTable.untimed`) is a *fixed* cost:
it is never credited a saving, and never counted as 0 ms.

Measuring is cheap on purpose: the layers' width variants are packed as independent nodes into a
few small models and timed with ONNX Runtime's per-node profiler through the central profiling API
(:func:`onnxprune.profiling.profile_model`, so a profile that runs on a remote device works as is),
with few runs. Tables are cached as JSON per profile, model structure (weights do not change
latency) and machine fingerprint (a table measured on another machine is measured again, never
reused), under :func:`cache_dir`, bounded in size (:mod:`onnxprune.profiling.diskcache`). A table
carries ``measured_on``: where and how its timings were taken.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..channels.types import Analysis
from ..core.errors import OnnxPruneError
from ..core.graph import GraphView
from ..core.quantized import quantization_kind
from ..core.shapes import is_static, skeleton
from ..profiling.diskcache import kind_dir
from ..profiling import profile_model, diskcache
from ..profiling.provider import ORT_PROVIDER
from ..profiling.provenance import machine_fingerprint, merge_measured_on
from ..core.model_io import atomic_path
from ..metrics.macs import resolve_shapes_for_macs

#: kept-width fractions each layer is timed at, per side (the full width is the shared point)
WIDTHS = (1.0, 0.75, 0.5, 0.25)
#: bytes of weights per packed measurement model (keeps the variant models small)
CHUNK_BYTES = 48 << 20
TABLE_VERSION = 4  # 2: measured_on, machine-keyed; 3: untimed variants are fixed costs (earlier: 0 ms); 4: attention products
_OPS = ("Conv", "Gemm", "MatMul")


def cache_dir() -> Path:
    """Where tables are cached: ``$ONNXPRUNE_CACHE_DIR/latency``, else ``latency/`` in the platform's
    user cache directory (``$XDG_CACHE_HOME/onnxprune/latency`` on Linux)."""

    return kind_dir("latency")


@dataclass
class Layer:
    """A weighted node whose input and/or output channels some prunable groups own.

    ``out_parts`` / ``in_parts``: (group id, positions per group channel) on that side.
    ``depthwise``: a Conv with one channel per group (its in and out widths are the same group).
    ``head_axis``: an attention product (MatMul of two activations): the output axis (and the
    inputs' axis) carrying the heads; its widths count positions on that axis, and it has no in side."""

    node: str
    op: str
    out_full: int
    in_full: int
    out_parts: list[tuple[int, int]] = field(default_factory=list)
    in_parts: list[tuple[int, int]] = field(default_factory=list)
    depthwise: bool = False
    head_axis: int | None = None
    #: a variant of this layer was not timed: its latency is fixed (no saving at any width)
    fixed: bool = False
    #: (kept width, ms) measured, ascending width, per side
    out_curve: list[tuple[int, float]] = field(default_factory=list)
    in_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def groups(self) -> set[int]:
        return {g for g, _ in self.out_parts + self.in_parts}

    def width(self, side: str, counts: Mapping[int, int], sizes: Mapping[int, int]) -> int:
        full, parts = (self.out_full, self.out_parts) if side == "out" else (self.in_full, self.in_parts)
        return max(1, full - sum((sizes[g] - counts.get(g, sizes[g])) * ppc for g, ppc in parts))

    @property
    def dense_ms(self) -> float:
        """The layer's time at full width; for a fixed layer the slowest variant that was timed (0 when
        none was: its time is then only inside the whole model's measured latency)."""
        if self.fixed:
            return max((t for _, t in self.out_curve + self.in_curve), default=0.0)
        return _at(self.out_curve, self.out_full)

    def kept_fraction(self, counts: Mapping[int, int], sizes: Mapping[int, int]) -> float:
        """The fraction of the layer's MACs kept at the groups' ``counts``."""
        f = self.width("out", counts, sizes) / self.out_full
        if self.in_parts and not self.depthwise:
            f *= self.width("in", counts, sizes) / self.in_full
        return f

    def ms(self, counts: Mapping[int, int], sizes: Mapping[int, int]) -> float:
        """Estimated latency at the groups' kept ``counts`` (absent groups: full); a fixed layer's
        time does not change with its widths."""
        if self.fixed or not self.out_curve:
            return self.dense_ms
        t = _at(self.out_curve, self.width("out", counts, sizes))
        if self.in_curve and not self.depthwise:
            full = _at(self.in_curve, self.in_full)
            t = t * _at(self.in_curve, self.width("in", counts, sizes)) / full if full > 0 else t
        return t


def layer_macs(view: GraphView, layer: Layer) -> float:
    """MACs of ``layer``'s node at full width (weight elements x output positions), or 0 when the
    output shape is not static: with :meth:`Layer.macs` it lets the allocator prefer the channels
    that buy the most time per MAC removed (the weights of a table read from the cache are not
    needed: only shapes)."""
    node = next(n for n in view.nodes if n.name == layer.node)
    y = view.shape(node.output[0])
    if y is None or any(not isinstance(d, int) or d < 1 for d in y):
        return 0.0
    if layer.head_axis is not None:  # [..., M, K] @ [..., K, N]: K MACs per output element
        a = view.shape(node.input[0])
        return float(int(np.prod(y, dtype=np.int64)) * a[-1]) if a and isinstance(a[-1], int) else 0.0
    w = int(np.prod(view.initializers[node.input[1]].dims))
    if layer.op == "Conv":  # w = [out, in/group, k...]: one MAC per weight per output position
        return float(w * int(np.prod(y[2:], dtype=np.int64)) * y[0])
    return float(w * int(np.prod(y[:-1], dtype=np.int64)))


def line_fit(curve: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of t = a + b * width through the measured points, Siegel's repeated median (each
    point's median slope to the others, their median; then the median intercept): one pre-empted
    measurement among four cannot bend it, and a conv's time is close to affine in its channel
    count. The slope is never negative."""
    per_point = [np.median([(t2 - t1) / (w2 - w1) for w2, t2 in curve if w2 != w1]) for w1, t1 in curve
                 if any(w2 != w1 for w2, _ in curve)]
    b = max(0.0, float(np.median(per_point))) if per_point else (curve[0][1] / curve[0][0] if curve else 0.0)
    a = float(np.median([t - b * w for w, t in curve])) if curve else 0.0
    return a, b


@functools.lru_cache(maxsize=4096)
def _fit(curve: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    return line_fit(curve)


def _at(curve: Sequence[tuple[int, float]], w: float) -> float:
    """The fitted time at width ``w`` (never below 0; fits are memoized: the knapsack asks often)."""
    a, b = _fit(tuple(map(tuple, curve)))
    return max(0.0, a + b * w)


# ---- which layers --------------------------------------------------------------------------------

def static_view(view: GraphView) -> GraphView:
    """``view`` with the shapes that run-time shape arithmetic leaves symbolic made static where the
    model's inputs are (the folding MACs use): a transformer export's stale ``unk__0`` batch after a
    run-time ``Slice`` of the position ids would otherwise hide every MatMul input's shape, and its
    layers would be timed at no sequence length at all. Nodes and tensors keep their names; only
    static shapes are taken over."""
    resolved = resolve_shapes_for_macs(view)
    if resolved is view:
        return view
    shapes = dict(view.shapes)
    shapes.update({k: v for k, v in resolved.shapes.items() if is_static(v) and not is_static(shapes.get(k))})
    return dataclasses.replace(view, shapes=shapes)


def find_layers(view: GraphView, analysis: Analysis, group_ids: Sequence[int]) -> list[Layer]:
    """The weighted nodes the groups ``group_ids`` resize, and the attention products whose heads
    they remove, with their widths and group shares.

    Grouped (non-depthwise) convs and weights without static shapes are left out: their latency
    counts as fixed (the final measurement still sees them)."""
    wanted = set(group_ids)
    by_node = {n.name: n for n in view.nodes}
    layers: dict[str, Layer] = {}
    for g in analysis.groups:
        if g.id not in wanted:
            continue
        for m in g.members:
            node = by_node.get(m.node)
            if node is not None and m.role == "act" and m.tensor == node.output[0]:  # an attention product?
                layer = layers.get(node.name) or _attention_layer(node, view, m)
                if layer is not None and layer.head_axis is not None and all(gid != g.id for gid, _ in layer.out_parts):
                    layers[node.name] = layer
                    layer.out_parts.append((g.id, int(m.positions.counts[0]) if len(m.positions) else 1))
                continue
            if node is None or node.op_type not in _OPS or m.role not in ("out", "in") or len(node.input) < 2:
                continue
            if m.tensor != node.input[1] or not view.is_const(m.tensor) or m.groups > 1:
                continue
            layer = layers.get(node.name) or _new_layer(node, view)
            if layer is None:
                continue
            layers[node.name] = layer
            ppc = int(m.positions.counts[0]) if len(m.positions) else 1
            side = layer.out_parts if m.role == "out" or layer.depthwise else layer.in_parts
            if all(gid != g.id for gid, _ in side):
                side.append((g.id, ppc))
    return list(layers.values())


def _attention_layer(node: onnx.NodeProto, view: GraphView, m) -> Layer | None:
    """An attention product: a MatMul of two float activations of static shapes whose output
    member ``m`` (a head group) is on a leading (batch) axis both inputs carry at full size; None
    for anything else (a broadcast head axis, a weight input)."""
    if node.op_type != "MatMul" or any(view.is_const(i) for i in node.input):
        return None
    y = view.shape(node.output[0])
    ins = [view.shape(i) for i in node.input]
    if not all(is_static(s) for s in (y, *ins)) or any(view.dtypes.get(i, 1) != 1 for i in node.input):
        return None
    ax = m.axis
    if ax >= len(y) - 2 or any(len(s) != len(y) or s[ax] != y[ax] for s in ins):
        return None
    return Layer(node.name, "MatMul", out_full=int(y[ax]), in_full=int(ins[0][-1]), head_axis=ax)


def _new_layer(node: onnx.NodeProto, view: GraphView) -> Layer | None:
    x = view.shape(node.input[0])
    w = list(view.initializers[node.input[1]].dims)
    if x is None or any(not isinstance(d, int) or d < 1 for d in x) or view.dtypes.get(node.input[0], 1) != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        group = int(attrs.get("group", 1))
        if group == 1:
            return Layer(node.name, "Conv", out_full=w[0], in_full=w[1])
        if w[1] == 1 and group == w[0] == x[1]:
            return Layer(node.name, "Conv", out_full=w[0], in_full=w[0], depthwise=True)
        return None
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or len(w) != 2:
            return None
        n, k = (w[0], w[1]) if attrs.get("transB", 0) else (w[1], w[0])
        return Layer(node.name, "Gemm", out_full=n, in_full=k)
    if len(w) != 2:  # MatMul with a 2-D weight
        return None
    return Layer(node.name, "MatMul", out_full=w[1], in_full=w[0])


# ---- variant models ------------------------------------------------------------------------------

def _variant(node: onnx.NodeProto, view: GraphView, layer: Layer, out_w: int, in_w: int, tag: str, rng):
    """(nodes, inputs, initializers, outputs, weight bytes) of ``node`` resized to (out_w, in_w)."""
    if layer.head_axis is not None:  # both operands at ``out_w`` positions on the head axis
        names, inputs = [f"a_{tag}", f"b_{tag}"], []
        for name, src in zip(names, node.input):
            dims = list(view.shape(src))
            dims[layer.head_axis] = out_w
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
        n = helper.make_node("MatMul", names, [f"y_{tag}"], name=tag)
        return n, inputs, [], helper.make_tensor_value_info(f"y_{tag}", onnx.TensorProto.FLOAT, None), 0
    x = list(view.shape(node.input[0]))
    attrs = [a for a in node.attribute]
    w_dims = list(view.initializers[node.input[1]].dims)
    if layer.op == "Conv":
        x[1] = in_w
        if layer.depthwise:
            w_dims = [out_w, 1, *w_dims[2:]]
            attrs = [a for a in attrs if a.name != "group"] + [helper.make_attribute("group", out_w)]
        else:
            w_dims = [out_w, in_w, *w_dims[2:]]
    elif layer.op == "Gemm":
        x[-1] = in_w
        trans_b = any(a.name == "transB" and a.i for a in attrs)
        w_dims = [out_w, in_w] if trans_b else [in_w, out_w]
    else:
        x[-1] = in_w
        w_dims = [in_w, out_w]
    names = [f"x_{tag}", f"w_{tag}"]
    inits = [numpy_helper.from_array(rng.standard_normal(w_dims).astype(np.float32), names[1])]
    if len(node.input) > 2 and node.input[2] and layer.op != "MatMul":
        names.append(f"b_{tag}")
        inits.append(numpy_helper.from_array(rng.standard_normal([out_w]).astype(np.float32), names[2]))
    n = helper.make_node(layer.op, names, [f"y_{tag}"], name=tag)
    n.attribute.extend(attrs)
    inp = helper.make_tensor_value_info(names[0], onnx.TensorProto.FLOAT, x)
    out = helper.make_tensor_value_info(f"y_{tag}", onnx.TensorProto.FLOAT, None)
    return n, [inp], inits, out, sum(t.ByteSize() for t in inits)


def _widths(full: int) -> list[int]:
    return sorted({max(1, round(full * f)) for f in WIDTHS})


def _plan_variants(layers: Sequence[Layer]) -> list[tuple[int, str, int]]:
    """(layer index, side, width) to time: every width on the out side (the full one is shared),
    the narrower ones on the in side."""
    out = []
    for i, layer in enumerate(layers):
        out += [(i, "out", w) for w in _widths(layer.out_full)]
        if layer.in_parts and not layer.depthwise:
            out += [(i, "in", w) for w in _widths(layer.in_full) if w != layer.in_full]
    return out


def _chunks(view, layers, variants, opset) -> list[tuple[onnx.ModelProto, dict[str, tuple[int, str, int]]]]:
    by_node = {n.name: n for n in view.nodes}
    rng = np.random.default_rng(0)
    models, cur, size = [], None, 0
    for j, (i, side, w) in enumerate(variants):
        layer = layers[i]
        out_w, in_w = (w, layer.in_full) if side == "out" else (layer.out_full, w)
        if layer.depthwise:
            in_w = out_w
        tag = f"v{j}"
        parts = _variant(by_node[layer.node], view, layer, out_w, in_w, tag, rng)
        if cur is None or size + parts[4] > CHUNK_BYTES:
            cur = ([], [], [], [], {})
            models.append(cur)
            size = 0
        cur[0].append(parts[0])
        cur[1].extend(parts[1])
        cur[2].extend(parts[2])
        cur[3].append(parts[3])
        cur[4][tag] = (i, side, w)
        size += parts[4]
    out = []
    for nodes, inputs, inits, outputs, tags in models:
        graph = helper.make_graph(nodes, "latency_table", inputs, outputs, inits)
        model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opset, ir_version=8))
        out.append((model, tags))  # (inference types the outputs: the checker wants their shapes)
    return out


# ---- measuring -----------------------------------------------------------------------------------

def table_profile(profile):
    """``profile`` with few runs and none of its own input shapes or budgets (tables are many tiny
    models; their precision comes from the final interleaved check, not from long runs)."""
    return profile.model_copy(update={"warmup_runs": min(profile.warmup_runs, 2), "min_runs": 5,
                                      "min_duration_s": 0.0, "input_shapes": {}, "latency_budget_ms": None,
                                      "memory_limit_mb": None})


def _measure_chunk(path: Path, profile, tags: Mapping[str, Any], batch: int,
                   where: list | None = None) -> dict[str, float]:
    """ms per run of each variant node: ONNX Runtime's per-node times where the backend has them,
    else one model per variant (p50). Each timing's ``measured_on`` is appended to ``where``."""
    where = [] if where is None else where

    if profile.backend in ORT_PROVIDER:
        rec = profile_model(path, [profile], per_node=True, memory=False, batch_sizes=[batch],
                            top_nodes=10 * len(tags) + 100)["results"][0]
        where.append(rec["per_node"].get("measured_on"))  # the kernel times below come from the per-node run
        times: dict[str, float] = {}
        for entry in rec["per_node"]["top_nodes"]:  # each kernel's fastest run (a busy machine pre-empts some)
            if entry.get("model_node") in tags:
                ms = float(entry.get("ms_min", entry["ms_per_run"]))
                times[entry["model_node"]] = times.get(entry["model_node"], 0.0) + ms
        return times  # a variant absent here (a kernel folded away, a cut top list) is untimed, not free
    model = onnx.load(str(path))
    times = {}
    for node in model.graph.node:
        one = onnx.ModelProto()
        one.CopyFrom(model)
        del one.graph.node[:]
        one.graph.node.append(node)
        keep_in = set(node.input)
        for coll in (one.graph.input, one.graph.initializer):
            kept = [v for v in coll if v.name in keep_in]
            del coll[:]
            coll.extend(kept)
        kept_out = [v for v in one.graph.output if v.name in node.output]
        del one.graph.output[:]
        one.graph.output.extend(kept_out)
        single = path.with_name(f"{node.name}.onnx")
        onnx.save(one, str(single))
        rec = profile_model(single, [profile], memory=False, batch_sizes=[batch])["results"][0]
        where.append(rec.get("measured_on"))
        times[node.name] = float(rec["latency_ms"]["p50"])
    return times


def _dense_ms(path: str | os.PathLike, profile, input_shapes, where: list | None = None) -> float:
    """The whole model's time measured the way the layers are (the sum of each ONNX Runtime
    kernel's fastest run; p50 on other backends), so the layers' share of it is not blurred by the
    scheduling noise a wall-clock figure carries on a busy machine."""

    where = [] if where is None else where
    if profile.backend not in ORT_PROVIDER:
        rec = profile_model(path, [profile], memory=False, input_shapes=input_shapes)["results"][0]
        where.append(rec.get("measured_on"))
        return float(rec["latency_ms"]["p50"])
    rec = profile_model(path, [profile], per_node=True, memory=False, input_shapes=input_shapes, top_nodes=1)["results"][0]
    where.append(rec["per_node"].get("measured_on"))
    per_node = rec["per_node"]
    return float(per_node.get("kernel_ms_min", per_node["kernel_ms_per_run"]))


def _activation_input(view: GraphView, layer: Layer) -> str:
    """The activation input of ``layer``'s node."""
    return next(n.input[0] for n in view.nodes if n.name == layer.node)


def table_key(view: GraphView, profile, group_ids: Sequence[int]) -> str:
    """Cache key: the model's structure and shapes (no weights), the profile, and the machine
    fingerprint (host, CPU, cores, GPU and driver, runtime versions, default threads)."""

    h = hashlib.sha256()
    h.update(skeleton(view.model).SerializeToString(deterministic=True))
    h.update(json.dumps({"profile": profile.model_dump(mode="json"), "machine": machine_fingerprint(profile),
                         "widths": WIDTHS, "groups": sorted(group_ids), "v": TABLE_VERSION},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


@dataclass
class LatencyTable:
    """Measured per-layer curves and the dense model's latency on one profile (both kernel times
    on ONNX Runtime: the estimate is used as a fraction of ``dense_ms``)."""

    profile: str
    dense_ms: float
    layers: list[Layer]
    sizes: dict[int, int]
    measure_s: float = 0.0
    cached: bool = False
    path: str | None = None
    #: where and how the table's timings were taken (merged over them: ``shared`` if any was)
    measured_on: dict[str, Any] | None = None
    #: variants the profiler gave no time for, ``{"node", "side", "width"}``; their layers are fixed
    untimed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """ms of the whole model per ms of the layers timed alone. The whole model's time is taken
        to shrink in proportion to its layers' time: the ops the table does not time (activations,
        adds, pooling, layout reorders) sit between the layers and shrink with their channels.
        (A fixed rest underestimated savings: on ResNet-50 an estimated 2.00x measured 2.45x and
        1.63x measured 1.97x; in proportion they read 2.59x and 1.91x.)"""
        layers = sum(layer.dense_ms for layer in self.layers)
        return self.dense_ms / layers if layers > 0 else 1.0

    def estimate(self, counts: Mapping[int, int]) -> float:
        """Estimated latency (ms) of the model pruned to ``counts`` (group id -> kept channels)."""
        return self.dense_ms - self.scale * sum(layer.dense_ms - layer.ms(counts, self.sizes) for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "profile": self.profile, "dense_ms": self.dense_ms, "measure_s": self.measure_s,
                "measured_on": self.measured_on,
                "sizes": {str(k): v for k, v in self.sizes.items()}, "untimed": self.untimed,
                "layers": [{"node": l.node, "op": l.op, "out_full": l.out_full, "in_full": l.in_full,
                            "out_parts": l.out_parts, "in_parts": l.in_parts, "depthwise": l.depthwise,
                            "head_axis": l.head_axis,
                            "fixed": l.fixed, "out_curve": l.out_curve, "in_curve": l.in_curve} for l in self.layers]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LatencyTable":
        layers = [Layer(node=l["node"], op=l["op"], out_full=l["out_full"], in_full=l["in_full"],
                        out_parts=[tuple(p) for p in l["out_parts"]], in_parts=[tuple(p) for p in l["in_parts"]],
                        depthwise=l["depthwise"], head_axis=l.get("head_axis"), fixed=bool(l["fixed"]), out_curve=[tuple(c) for c in l["out_curve"]],
                        in_curve=[tuple(c) for c in l["in_curve"]]) for l in d["layers"]]
        return cls(profile=d["profile"], dense_ms=float(d["dense_ms"]), layers=layers,
                   sizes={int(k): int(v) for k, v in d["sizes"].items()}, measure_s=float(d.get("measure_s", 0.0)),
                   measured_on=d.get("measured_on"), untimed=list(d.get("untimed", [])))


def latency_table(view: GraphView, analysis: Analysis, group_ids: Sequence[int], profile, dense_path: str | os.PathLike,
                  *, input_shapes: Mapping[str, tuple[int, ...]] | None = None, cache: Path | None = None) -> LatencyTable:
    """The table of the groups ``group_ids`` of the model indexed by ``view`` on ``profile``, from
    the cache when this model structure was measured there before. ``dense_path`` is the model's
    file (its whole-model latency anchors the estimate), ``input_shapes`` its concrete input shapes."""

    bounded = cache is None  # the shared platform cache is size-bounded; a folder the caller names is theirs
    if bounded:
        diskcache.max_bytes()  # a bad ONNXPRUNE_CACHE_MAX_MB fails now, not after the measuring
    cache = cache_dir() if cache is None else Path(cache)
    file = cache / f"{profile.name}-{table_key(view, profile, group_ids)}.json"
    if file.exists():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if data.get("version") != TABLE_VERSION:
                raise ValueError("older table")
            table = LatencyTable.from_json(data)
            if profile.remote or (table.measured_on or {}).get("fingerprint") == machine_fingerprint():
                table.cached, table.path = True, str(file)
                diskcache.touch(file)
                return table
            # a file copied from another machine under this key: measured again here, never reused
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a corrupt or older cache file is measured again and replaced
    start = time.perf_counter()
    view = static_view(view)  # MatMuls are timed at the given sequence length (a no-op when shapes are static)
    layers = find_layers(view, analysis, group_ids)
    sizes = {g.id: g.size for g in analysis.groups if g.id in set(group_ids)}
    if not layers:
        q = quantization_kind(view.model)
        if q is not None:  # its layers read int8 weights through DequantizeLinear: not timed alone
            raise OnnxPruneError(f"latency-aware allocation times float layers only and the model is {q['label']}: "
                                 "use --ratio or --target-macs, or prune the float model with this target, then run "
                                 "onnxprune quantize")
        symbolic = [i.name for i in view.model.graph.input
                    if i.name not in view.initializers and not is_static(view.shape(i.name))]
        if symbolic:
            raise OnnxPruneError("latency-aware allocation times every layer at the model's input shapes, and input(s) "
                                 f"{', '.join(map(repr, symbolic))} have symbolic dims: pass --input-shape NAME=DIMS "
                                 "(a transformer's batch and sequence length, e.g. input_ids=1x128)")
        raise OnnxPruneError("latency-aware allocation: no prunable group resizes a Conv/Gemm/MatMul weight here")
    tprof = table_profile(profile)
    batch = int(view.shape(_activation_input(view, layers[0]))[0])
    opset = [o for o in view.model.opset_import if o.domain in ("", "ai.onnx")]
    variants = _plan_variants(layers)
    where: list = []
    untimed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-lat-") as tmp:
        for k, (model, tags) in enumerate(_chunks(view, layers, variants, opset)):
            path = Path(tmp) / f"chunk{k}.onnx"
            onnx.save(model, str(path))
            times = _measure_chunk(path, tprof, tags, int(batch), where)
            for tag, (i, side, w) in tags.items():
                if tag in times:
                    (layers[i].out_curve if side == "out" else layers[i].in_curve).append((w, float(times[tag])))
                else:
                    layers[i].fixed = True
                    untimed.append({"node": layers[i].node, "side": side, "width": w})
    for layer in layers:
        layer.out_curve.sort()
        if layer.in_curve and not layer.fixed:  # the full width is the out curve's widest point
            layer.in_curve = sorted(layer.in_curve + [(layer.in_full, layer.out_curve[-1][1])])
        layer.in_curve.sort()
    dense = _dense_ms(dense_path, tprof, input_shapes, where)
    table = LatencyTable(profile=profile.name, dense_ms=float(dense), layers=layers, sizes=sizes,
                         measure_s=time.perf_counter() - start, measured_on=merge_measured_on(where), untimed=untimed)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp_file:
            tmp_file.write_text(json.dumps(table.to_json()), encoding="utf-8")
        table.path = str(file)
        if bounded:
            diskcache.enforce_bound("latency", keep=file)
    except OSError:
        pass  # an unwritable cache costs time next run, never the result
    return table
