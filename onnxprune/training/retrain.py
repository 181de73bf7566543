"""``finetune``: retrain an ONNX model in PyTorch through the bridge and write the weights back.

ONNX in, ONNX out: the bridge is checked against ONNX Runtime first (training a module that does not
compute what the file computes would be pointless), the weights are trained with
:func:`~onnxprune.training.loop.train_module`, written back into the same graph (names, structure,
opset kept), and the written model is scored once on the test split with ONNX Runtime.

Sparsity: by default (``masks=None``) every prunable weight that has exact zeros keeps them:
``onnxprune.sparsity.masks.masks_of(model)`` gives the masks and they are re-applied after every
optimizer step, so unstructured / N:M sparsity is exactly what it was. A dense weight (no zero) has
no mask and trains freely. Pass ``keep_sparsity=False`` to let pruned weights grow back, or
``masks={name: bool array}`` to choose.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import onnx

from ..datasets import DatasetSplits, evaluate_onnx, load_dataset, model_inputs, bind_dataset
from ..core.errors import OnnxPruneError
from ..core.model_io import load_model
from .config import TrainConfig, resolve_objective
from .loop import DistContext, train_module
from .features import select_features
from ..datasets.types import first_array
from ..sparsity.masks import masks_of
from ..datasets.output_kind import infer_output_kinds, kinds_note
from ..datasets.fidelity import evaluate_fidelity, mean_rel_l2
from onnx import numpy_helper
from ..sparsity.storage import densify

Source = "str | os.PathLike | onnx.ModelProto"


def _as_model(source) -> onnx.ModelProto:
    return source if isinstance(source, onnx.ModelProto) else load_model(source)


def outputs_probabilities(model: onnx.ModelProto) -> bool:
    """True when the first graph output comes straight out of a Softmax (probabilities, not logits)."""
    out = model.graph.output[0].name
    prod = next((n for n in model.graph.node if out in n.output), None)
    return prod is not None and prod.op_type == "Softmax"


def check_bridge(model: onnx.ModelProto, data: DatasetSplits, label: str = "model") -> dict[str, Any]:
    """Bridge outputs vs ONNX Runtime (random inputs of the data's sample shapes, batch 2); raises one
    clear error naming the first diverging node. Symbolic dims are taken from the data."""
    from ..bridge import assert_bridge_faithful  # lazy: imports torch

    inputs = model_inputs(model)
    sample = data.train.x if data.train.x is not None else None
    shapes = {}
    for inp in inputs:
        if isinstance(sample, Mapping):
            per = tuple(first_array({inp.name: sample[inp.name]}).shape[1:])
        else:
            per = tuple(data.input_shape)
        fixed0 = inp.dims[0] if inp.dims and isinstance(inp.dims[0], int) else None
        shapes[inp.name] = (fixed0 or 2, *per)
    fixed = next(iter(shapes.values()))[0] if all(inp.dims and isinstance(inp.dims[0], int) for inp in inputs) else None
    try:
        report = assert_bridge_faithful(model, shapes)
    except OnnxPruneError as exc:
        raise OnnxPruneError(f"{label}: {exc}") from None
    if fixed is not None and fixed < 2:  # training runs batches: the graph must not depend on batch 1
        import torch

        from ..bridge import to_torch  # lazy: imports torch

        try:
            with torch.no_grad():
                to_torch(model).eval()(*[torch.zeros((2, *shp[1:]), dtype=_torch_dtype(inp.dtype))
                                         for inp, shp in zip(inputs, shapes.values())])
        except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
            raise OnnxPruneError(f"{label}: input {inputs[0].name!r} has a fixed batch size of {fixed} and the graph "
                                 f"depends on it ({str(exc).splitlines()[0][:160]}); re-export it with a dynamic "
                                 "batch dimension to retrain") from None
    return report


def _torch_dtype(np_dtype):
    import torch  # lazy: torch ([train] extra)

    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


def torch_module(model: onnx.ModelProto, *, train_bn: bool = False):
    from ..bridge import to_torch  # lazy: imports torch

    return to_torch(model, train_bn=train_bn)


def resolve_masks(model: onnx.ModelProto, masks: Mapping[str, np.ndarray] | None, keep_sparsity: bool) -> dict[str, np.ndarray]:
    if masks is not None:
        return {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
    if not keep_sparsity:
        return {}

    return masks_of(model)


def finetune(model: "Source", data: "str | Mapping | DatasetSplits", config: TrainConfig | None = None,
             teacher: "Source | None" = None, masks: Mapping[str, np.ndarray] | None = None, progress: bool = True,
             *, keep_sparsity: bool = True, check: bool = True, evaluate_test: bool = True,
             dist: DistContext | None = None,
             output_kinds: Mapping[str, str] | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Retrain ``model`` on ``data`` with ``config``; return the retrained ModelProto and its history.

    ``teacher``: a dense ONNX model distilled into the student (``config.objective``,
    ``config.distill_alpha``, ``config.distill_temperature``); run through the bridge in eval mode,
    never trained. Unlabeled data need a teacher: the student then matches it on every graph output
    (any number of inputs and outputs), and checkpoints are chosen by validation fidelity.
    History: ``config``, ``objective``, ``data``, per-epoch ``train_loss`` and ``val_top1`` (labels)
    or ``val_rel_l2`` (no labels), ``best_epoch``, ``sparsity`` (masks and whether the zeros survived
    exactly), ``test`` (top-1 with ONNX Runtime, once, with labels) and, with a teacher,
    ``test_fidelity`` (per graph output against the teacher, ONNX Runtime).
    ``output_kinds``: ``{output name: scores|probs|embedding|value}`` declared (``--output-kind``);
    the rest are inferred from the graph (:func:`~onnxprune.datasets.output_kind.infer_output_kinds`)
    and decide each output's loss and figures (history ``output_kinds``).
    """
    t0 = time.perf_counter()
    config = config or TrainConfig()
    original = _as_model(model)
    data = load_dataset(data)  # a spec is split with seed 0 (as `onnxprune eval`), whatever the training seed

    n_inputs = len(model_inputs(original))
    if data.labeled and n_inputs != 1 and config.objective != "distill":
        raise OnnxPruneError(f"training on labels supports models with one input; this one has {n_inputs}: "
                             "use --objective distill with --teacher DENSE")
    if data.train.x is not None:
        data = bind_dataset(data, original)  # checked against the model's inputs; symbolic dims from the data
    elif n_inputs != 1:
        raise OnnxPruneError("DataLoaders feed models with one input; give per-input arrays for this model")
    t_model, teacher_name = None, None
    if teacher is not None:
        t_model = _as_model(teacher)
        teacher_name = str(teacher) if not isinstance(teacher, onnx.ModelProto) else (t_model.graph.name or "teacher")

    resolve_objective(config.objective, data.labeled, t_model is not None)  # one clear error before any work
    bridge_report = None
    if check:
        bridge_report = check_bridge(original, data)
        if t_model is not None:
            check_bridge(t_model, data, "teacher")
    n_outputs = len(original.graph.output)

    kinds = infer_output_kinds(t_model if t_model is not None else original, labeled=data.labeled, declared=output_kinds)
    match = None
    student_src, teacher_src = original, t_model
    if config.distill_features and t_model is not None:
        match = select_features(original, t_model, data, config.feature_mask)
        student_src, teacher_src = with_outputs(original, match.names), with_outputs(t_model, match.names)
    module = torch_module(student_src, train_bn=config.train_bn)
    mask_arrays = resolve_masks(original, masks, keep_sparsity)
    after_step = None
    if mask_arrays:
        from ..bridge import apply_masks  # lazy: imports torch

        apply_masks(module, mask_arrays)
        after_step = module.enforce_masks
    t_module = torch_module(teacher_src, train_bn=False) if teacher_src is not None else None
    hist = train_module(module, data, config, teacher=t_module, after_step=after_step, progress=progress,
                        output_is_prob=outputs_probabilities(original), dist=dist, n_outputs=n_outputs,
                        output_kinds=list(kinds.values()), feature_loss=match.loss if match else None)
    from ..bridge import write_back  # lazy: imports torch

    trained = write_back(original, module)
    sparsity = _sparsity_report(trained, mask_arrays)
    history: dict[str, Any] = {"config": config.to_dict(), "data": data.describe(), "teacher": teacher_name, **hist,
                               "sparsity": sparsity, "output_kinds": kinds}
    if bridge_report is not None:  # the pre-training check's figures (onnxprune.bridge.check)
        history["bridge_check"] = {k: bridge_report[k] for k in ("status", "max_rel_diff", "noise_floor_rel",
                                                                  "tolerance_rel", "worst_output")}
    if t_model is not None and hist["objective"] != "labels":
        shapes = {o.name: tuple(d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim)
                  for o in original.graph.output if o.type.tensor_type.HasField("shape")}
        history["notes"] = kinds_note(kinds, output_kinds, shapes)
    if config.distill_features:
        history.update(match.describe() if match else {"distill_features": [], "distill_features_at": None,
                                                       "distill_features_mask": None})
    if data.labeled and n_inputs == 1:
        history["val_onnx"] = evaluate_onnx(trained, data, "val", config.eval_batch_size)
        history["test"] = evaluate_onnx(trained, data, "test", config.eval_batch_size) if evaluate_test and len(data.test) else None
    else:
        history["test"] = None
    if t_model is not None:
        for split in ("val", "test"):
            part = getattr(data, split)
            if (split == "test" and not evaluate_test) or part is None or part.x is None or not len(part):
                continue
            fid, _ = evaluate_fidelity(trained, t_model, part.x, config.eval_batch_size, output_kinds=kinds)
            history[f"{split}_fidelity"] = fid["outputs"]
            history[f"{split}_mean_rel_l2"] = mean_rel_l2(fid["outputs"])
    history["seconds"] = round(time.perf_counter() - t0, 3)
    return trained, history


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` exposing ``names`` as extra graph outputs, after its own (for training only:
    the written model is the original graph with the trained weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in names:
        out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def _sparsity_report(model: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:


    inits = {t.name: t for t in densify(model).graph.initializer} if masks else {}
    pruned = kept_zero = 0
    for name, m in masks.items():
        if name not in inits:
            raise OnnxPruneError(f"mask for {name!r} but the model has no such initializer")
        w = numpy_helper.to_array(inits[name])
        off = ~np.asarray(m, dtype=bool)
        pruned += int(off.sum())
        kept_zero += int((w[off] == 0).sum())
    return {"masked_tensors": len(masks), "pruned_weights": pruned, "preserved": kept_zero == pruned}
