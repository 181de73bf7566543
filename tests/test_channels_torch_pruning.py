"""Cross-check the ONNX coupling groups with torch-pruning's DependencyGraph on the same models.

For every group on each side we compare the set of conv/linear layers whose *output* channels the
group removes (ONNX: "out" members, matched to PyTorch modules through the initializer names the
exporter keeps, ``<module>.weight``; torch-pruning: dependencies handled by an out-channel pruning
function).

Deliberate difference: torch-pruning treats a broadcast elementwise op as a coupling, so the
1-channel spatial gate of ``squeeze_excite`` (``x * sigmoid(conv(x))`` with a ``[N,1,H,W]`` map) lands
in the gated group there — pruning it would be wrong (a 1-channel map is broadcast, not per-channel).
onnxprune keeps it in its own, unprunable group; the comparison drops it from torch-pruning's sets.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
tp = pytest.importorskip("torch_pruning")

import torch.nn as nn  # noqa: E402

from arch_zoo import ARCHS, build_arch, export_arch  # noqa: E402
from onnxprune.channels.analyze import analyze_channels  # noqa: E402
from onnxprune.core.prepare import prepare  # noqa: E402

LAYERS = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
BROADCAST_GATES = {"squeeze_excite": {"spatial"}}


def _tp_sets(name):
    model = build_arch(name)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(*ARCHS[name][1]))
    names = {m: n for n, m in model.named_modules()}
    sets = set()
    for group in dg.get_all_groups(root_module_types=list(LAYERS)):
        outs = {names[dep.target.module] for dep, _ in group
                if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, LAYERS)}
        outs -= BROADCAST_GATES.get(name, set())
        if outs:
            sets.add(frozenset(outs))
    return sets


def _onnx_sets(name, tmp_path):
    prep = prepare(export_arch(name, tmp_path))
    sets = set()
    for g in analyze_channels(prep.view).groups:
        outs = {m.tensor.rsplit(".weight", 1)[0] for m in g.members_with_role("out")}
        if outs and not (len(outs) == 1 and next(iter(outs)) in BROADCAST_GATES.get(name, set())):
            sets.add(frozenset(outs))
    return sets


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "resnext", "mobilenet_v2", "squeeze_excite",
                                  "densenet", "inception", "shufflenet", "fpn", "decoder"])
def test_same_coupling_groups_as_torch_pruning(name, tmp_path):
    assert _onnx_sets(name, tmp_path) == _tp_sets(name)
