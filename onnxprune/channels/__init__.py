"""Channel-dependency analysis: which channels of which tensors must be removed together.

Usage::

    from onnxprune.core.prepare import prepare
    from onnxprune.channels import analyze_channels, apply_plan

    prep = prepare("model.onnx")                      # normalized model + shape-fixed view
    analysis = analyze_channels(prep.view)           # groups of coupled channels
    plan = {g.id: kept_indices for g in analysis.prunable}
    pruned = apply_plan(prep.model, analysis, plan)  # physically smaller, checked ONNX model

- :mod:`.rules`: one documented rule per op type (the table ``RULES``), how channels flow through it;
- :mod:`.context`: atoms (channels as first produced), tracks (which axis of a tensor carries
  which channels), members and unprunable marks;
- :mod:`.analyze`: the walk over the graph and the groups it yields (:mod:`.types`);
- :mod:`.dims`: run-time shape values read from channels (adapt, keep their value, or refuse);
- :mod:`.quantized`: QDQ weights (DequantizeLinear of an int8 initializer) read dequantized and
  sliced in their integer tensor with their per-channel scale/zero point;
- :mod:`.rewrite`: slicing initializers and rewriting channel counts in attributes/constants;
- :mod:`.slices`: reading/zeroing one group channel of a member (grouped conv weights included).
"""
from .analyze import analyze_channels
from .rewrite import apply_plan, validate_plan
from .types import Analysis, Group, KeepPlan, Member

__all__ = ["Analysis", "Group", "KeepPlan", "Member", "analyze_channels", "apply_plan", "validate_plan"]
