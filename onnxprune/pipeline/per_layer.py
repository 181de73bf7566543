"""Pruning with one ratio per channel group or layer: what ``per_layer:`` in a recipe stage (explicit
ratios, or ratios derived from the sensitivity analysis) prunes with, and what the sensitivity
analysis itself sweeps (one group at a time)."""
from __future__ import annotations

import math
from typing import Any, Mapping
from ..core.errors import OnnxPruneError
from ..recipes.schema import Stage
from ..core.pruning_result import PruneResult
import fnmatch
from ..sparsity.prune import prune_unstructured
from ..metrics.inspection import inspect_model
from ..channels.analyze import analyze_channels
from ..core.prepare import prepare
from ..structured.importance import ScoreInputs, score_groups
from ..structured.allocate import Limits, final_count, select
import numpy as np
from ..structured.fallback import prune_dropping_broken
from ..structured.prune import validated_builder


class StructuredGroups:
    """The dense model analysed once: groups, scores, and a pruner for any per-group ratios."""

    def __init__(self, source, criterion: str, seed: int = 0, gradients=None):
        self.prep = prepare(source)
        self.analysis = analyze_channels(self.prep.view)
        groups = list(self.analysis.prunable)
        self.scores, unavailable = score_groups(groups, criterion,
                                                ScoreInputs.from_view(self.prep.view, gradients=gradients, seed=seed))
        if groups and not self.scores:
            raise OnnxPruneError(f"criterion {criterion} cannot score any group: {next(iter(unavailable.values()))}")
        self.groups = [g for g in groups if g.id in self.scores]
        self.dropped: dict[int, str] = {}

    @staticmethod
    def key(g) -> str:
        return f"g{g.id}"

    @staticmethod
    def name(g) -> str:
        return (list(g.nodes) or [f"group {g.id}"])[0]

    def plan(self, ratios: Mapping[int, float]):
        limits = Limits(max_ratio=0.99)
        plan = {}
        for g in self.groups:
            r = ratios.get(g.id, 0.0)
            width = g.size // g.blocks
            desired = g.blocks * math.floor(width * (1.0 - r) + 1e-9)
            plan[g.id] = select(self.scores[g.id], final_count(g.size, desired, g.blocks, limits), g.blocks)
        return plan

    def prune(self, ratios: Mapping[int, float]):
        """The pruned model and its plan; groups whose rewrite fails validation are kept whole
        (recorded in ``self.dropped`` with the reason) instead of failing the run."""


        plan = self.plan(ratios)
        sizes = {g.id: g.size for g in self.groups}
        model, dropped = prune_dropping_broken(validated_builder(self.prep, self.analysis), plan,
                                               [gid for gid, kept in plan.items() if len(kept) < sizes[gid]])
        for gid in dropped:
            plan[gid] = np.arange(sizes[gid])
        self.dropped.update(dropped)
        return model, plan


def prune_per_layer(source, stage: Stage, ratios: Mapping[str, float], *, seed: int = 0, gradients=None) -> PruneResult:
    """Prune with one ratio per group (structured: keys ``g<id>`` or node-name patterns) or per layer
    (unstructured: node names or patterns); unnamed groups/layers are left whole."""

    if stage.kind == "structured":
        st = StructuredGroups(source, stage.criterion, seed=seed, gradients=gradients)
        chosen: dict[int, float] = {}
        for g in st.groups:
            if st.key(g) in ratios:
                chosen[g.id] = float(ratios[st.key(g)])
                continue
            for pat, r in ratios.items():
                if any(fnmatch.fnmatchcase(n, pat) for n in g.nodes):
                    chosen[g.id] = float(r)
                    break
        model, plan = st.prune(chosen)

        before, after = inspect_model(st.prep.model), inspect_model(model)
        summary = {"method": "structured", "criterion": stage.criterion, "scope": "per-layer", "per_layer": dict(ratios),
                   "params_before": before["params"], "params_after": after["params"],
                   "macs_before": before["macs"], "macs_after": after["macs"],
                   "macs_reduction": before["macs"] / after["macs"] if before["macs"] and after["macs"] else None,
                   "groups": [{"id": g.id, "nodes": list(g.nodes), "kept": int(len(plan[g.id])), "total": g.size}
                              for g in st.groups if g.id not in st.dropped],
                   "dropped_groups": [{"id": g.id, "nodes": list(g.nodes), "reason": st.dropped[g.id]}
                                      for g in st.groups if g.id in st.dropped],
                   "notes": [f"{len(st.dropped)} group(s) left whole because pruning them breaks the model "
                             "(see 'dropped_groups')"] if st.dropped else []}
        return PruneResult(model=model, summary=summary)

    current: Any = source
    res = None
    names = [l["node"] for l in prune_unstructured(source, sparsity=0.0).summary["layers"]]
    for node in names:
        r = ratios.get(node)
        if r is None:
            r = next((v for pat, v in ratios.items() if fnmatch.fnmatchcase(node, pat)), None)
        if not r:
            continue
        res = prune_unstructured(current, sparsity=float(r), scope="layer", criterion=stage.criterion, seed=seed,
                                 ignore=[escape(n) for n in names if n != node], gradients=gradients)
        current = res.model
    if res is None:
        res = prune_unstructured(source, sparsity=0.0)
    res.summary["per_layer"] = dict(ratios)
    return res


def escape(name: str) -> str:
    """A node name as an fnmatch pattern matching only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)
