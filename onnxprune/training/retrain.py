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

from ..datasets import DatasetSplits, evaluate_onnx, load_dataset
from ..errors import OnnxPruneError
from ..model_io import load_model
from .config import TrainConfig
from .loop import DistContext, train_module

Source = "str | os.PathLike | onnx.ModelProto"


def _as_model(source) -> onnx.ModelProto:
    return source if isinstance(source, onnx.ModelProto) else load_model(source)


def outputs_probabilities(model: onnx.ModelProto) -> bool:
    """True when the first graph output comes straight out of a Softmax (probabilities, not logits)."""
    out = model.graph.output[0].name
    prod = next((n for n in model.graph.node if out in n.output), None)
    return prod is not None and prod.op_type == "Softmax"


def check_bridge(model: onnx.ModelProto, data: DatasetSplits, label: str = "model") -> dict[str, Any]:
    """Bridge outputs vs ONNX Runtime (random inputs of the data's sample shape, batch 2); raises one
    clear error naming the first diverging node."""
    from ..bridge import assert_bridge_faithful
    from ..shapes import graph_inputs

    inp = graph_inputs(model)[0]
    dims = inp.type.tensor_type.shape.dim
    fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    try:
        report = assert_bridge_faithful(model, {inp.name: (fixed or 2, *data.input_shape)})
    except OnnxPruneError as exc:
        raise OnnxPruneError(f"{label}: {exc}") from None
    if fixed is not None and fixed < 2:  # training runs batches: the graph must not depend on batch 1
        import torch

        from ..bridge import to_torch

        try:
            with torch.no_grad():
                to_torch(model).eval()(torch.zeros((2, *data.input_shape)))
        except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
            raise OnnxPruneError(f"{label}: input {inp.name!r} has a fixed batch size of {fixed} and the graph "
                                 f"depends on it ({str(exc).splitlines()[0][:160]}); re-export it with a dynamic "
                                 "batch dimension to retrain") from None
    return report


def torch_module(model: onnx.ModelProto, *, train_bn: bool = False):
    from ..bridge import to_torch

    return to_torch(model, train_bn=train_bn)


def resolve_masks(model: onnx.ModelProto, masks: Mapping[str, np.ndarray] | None, keep_sparsity: bool) -> dict[str, np.ndarray]:
    if masks is not None:
        return {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
    if not keep_sparsity:
        return {}
    from ..sparsity.masks import masks_of

    return masks_of(model)


def finetune(model: "Source", data: "str | Mapping | DatasetSplits", config: TrainConfig | None = None,
             teacher: "Source | None" = None, masks: Mapping[str, np.ndarray] | None = None, progress: bool = True,
             *, keep_sparsity: bool = True, check: bool = True, evaluate_test: bool = True,
             dist: DistContext | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Retrain ``model`` on ``data`` with ``config``; return the retrained ModelProto and its history.

    ``teacher``: a dense ONNX model distilled into the student (``config.distill_alpha``,
    ``config.distill_temperature``); run through the bridge in eval mode, never trained.
    History: ``config``, ``data``, per-epoch ``train_loss``/``val_top1``, ``best_epoch``,
    ``sparsity`` (masks and whether the zeros survived exactly) and ``test`` (ONNX Runtime, once).
    """
    t0 = time.perf_counter()
    config = config or TrainConfig()
    original = _as_model(model)
    data = load_dataset(data)  # a spec is split with seed 0 (as `onnxprune eval`), whatever the training seed
    from ..shapes import graph_inputs

    if len(graph_inputs(original)) != 1:
        raise OnnxPruneError(f"finetune supports models with exactly one input; this one has {len(graph_inputs(original))}")
    if check:
        check_bridge(original, data)
    module = torch_module(original, train_bn=config.train_bn)
    mask_arrays = resolve_masks(original, masks, keep_sparsity)
    after_step = None
    if mask_arrays:
        from ..bridge import apply_masks

        apply_masks(module, mask_arrays)
        after_step = module.enforce_masks
    t_module, teacher_name = None, None
    if teacher is not None:
        t_model = _as_model(teacher)
        teacher_name = str(teacher) if not isinstance(teacher, onnx.ModelProto) else (t_model.graph.name or "teacher")
        if check:
            check_bridge(t_model, data, "teacher")
        t_module = torch_module(t_model, train_bn=False)
    hist = train_module(module, data, config, teacher=t_module, after_step=after_step, progress=progress,
                        output_is_prob=outputs_probabilities(original), dist=dist)
    from ..bridge import write_back

    trained = write_back(original, module)
    sparsity = _sparsity_report(trained, mask_arrays)
    history: dict[str, Any] = {"config": config.to_dict(), "data": data.describe(), "teacher": teacher_name, **hist,
                               "sparsity": sparsity}
    history["val_onnx"] = evaluate_onnx(trained, data, "val", config.eval_batch_size)
    if evaluate_test and len(data.test):
        history["test"] = evaluate_onnx(trained, data, "test", config.eval_batch_size)
    else:
        history["test"] = None
    history["seconds"] = round(time.perf_counter() - t0, 3)
    return trained, history


def _sparsity_report(model: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from onnx import numpy_helper

    from ..sparsity.storage import densify

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
