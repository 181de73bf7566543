"""``onnxprune finetune MODEL -o OUT --data SPEC``: retrain in PyTorch, write the weights back.

Data-parallel under ``torchrun`` (see :mod:`onnxprune.training.ddp`): rank 0 writes and prints.
``--torch module:factory`` takes the PyTorch-source path instead (prune with torch-pruning, retrain,
export to ONNX).
"""
from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ..core.errors import OnnxPruneError
from ..core.model_io import refuse_overwrite_input, save_model, write_text_atomic, load_model
from .common import emit_json, json_option
from ..training.config import TrainConfig
from ..datasets.output_kind import parse_output_kinds
from ..training.ddp import init_from_env
from ..training.retrain import finetune
import re
from ..datasets import load_dataset, evaluate_onnx
from ..training.loop import train_module
from ..training.torch_source import count_macs_params, load_torch_factory, prune_torch_model


def _config(**kw):
    return TrainConfig().replace(**kw)


@click.command("finetune")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Where to write the retrained ONNX model (never the input).")
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="Dataset spec: digits, npz:PATH, imagefolder:PATH, images:DIR, cifar10:PATH, python:module:function. "
                   "Unlabeled data (npz with only x or one array per input, images:DIR) need --teacher.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Epochs (default 10). With function matching an epoch is at least 200 steps of augmented views.")
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="Size the run in optimizer steps instead of epochs (checkpoints evaluated 20 times over the run).")
@click.option("--augment", default=None, metavar="auto|none|LIST",
              help="Function matching when distilling without labels: teacher and student see the same augmented "
                   "batch. LIST of crop,hflip,vflip,jitter,mixup,noise; auto (default): crop,jitter,mixup for image "
                   "inputs, mixup,noise for other float inputs, none for integer inputs. Flips only when listed.")
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME=KIND",
              help="What an output is: scores, probs, embedding or value (repeatable). Decides its distillation loss "
                   "(KL, KL, 1-cosine, per-channel smooth-L1) and its figures; inferred from the graph otherwise.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 0.01).")
@click.option("--schedule", type=click.Choice(["cosine", "step", "constant"]), default=None, help="LR schedule (default cosine).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None, help="Optimizer (default sgd, momentum 0.9).")
@click.option("--momentum", type=float, default=None)
@click.option("--weight-decay", type=float, default=None, help="Weight decay of weight tensors (default 5e-4).")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing (default 0).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Global batch size (default 64).")
@click.option("--warmup-epochs", type=float, default=None, help="Linear LR warm-up epochs (default 0).")
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Dense ONNX model to distil from (knowledge distillation).")
@click.option("--distill-alpha", type=float, default=None, help="Weight of the distillation loss (default 0.5).")
@click.option("--distill-temperature", type=float, default=None, help="Distillation temperature (default 4).")
@click.option("--objective", type=click.Choice(["labels", "distill", "both"]), default=None,
              help="labels (cross-entropy), distill (match --teacher on every graph output: no labels needed) or "
                   "both. Default: both with labels and a teacher, labels without a teacher, distill without labels.")
@click.option("--distill-features", is_flag=True, default=None,
              help="Also match the teacher's intermediate features: a transformer's residual stream (every block's "
                   "output, MSE per channel over the teacher's std, padding left out), else the pruned layers' outputs.")
@click.option("--feature-weight", type=float, default=None,
              help="With --distill-features: weight of the feature loss, added to the output loss (default 1).")
@click.option("--feature-mask", default=None, metavar="auto|none|INPUT",
              help="With --distill-features: the 0/1 attention-mask input whose padding positions the feature loss "
                   "leaves out (default auto: found by name; none: every position counts).")
@click.option("--train-bn", is_flag=True, default=None, help="Batch-norm uses and updates batch statistics.")
@click.option("--seed", type=int, default=None,
              help="Training seed: shuffling and anything random in training (default 0). "
                   "The data split always uses seed 0, as eval does.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default=None, help="Training device (default cpu).")
@click.option("--no-keep-sparsity", is_flag=True, help="Let pruned (zero) weights grow back instead of keeping masks.")
@click.option("--history", "history_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write the training history (config, per-epoch figures) as JSON here.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--torch", "torch_factory", default=None, metavar="MODULE:FACTORY",
              help="PyTorch-source path: build the model from this factory instead of reading MODEL.")
@click.option("--state-dict", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="With --torch: weights to load into the factory's module.")
@click.option("--input-shape", "torch_input_shape", default=None, metavar="DIMS",
              help="With --torch: example input shape, e.g. 1x3x32x32 (default: from the data).")
@click.option("--prune-ratio", type=float, default=None, help="With --torch: channels removed per layer.")
@click.option("--target-macs", type=float, default=None, help="With --torch: fraction of MACs kept (0.5 = 2x).")
@json_option
def finetune_cmd(model: str | None, output: str, data_spec: str, no_keep_sparsity: bool, history_path: str | None,
                 no_progress: bool, teacher: str | None, torch_factory: str | None, state_dict: str | None,
                 torch_input_shape: str | None, prune_ratio: float | None, target_macs: float | None, as_json: bool,
                 output_kind: tuple[str, ...], **train_kw) -> None:
    """Retrain MODEL (e.g. after pruning) on --data and write it to OUT, sparsity kept exactly.

    Checkpoint selection uses the validation split; the test split is scored once at the end, on the
    written ONNX file with ONNX Runtime.
    """
    cfg = _config(**train_kw)

    kinds = parse_output_kinds(output_kind)

    ctx = init_from_env(cfg.device)
    if torch_factory:
        if model:
            raise OnnxPruneError("give either MODEL or --torch, not both")
        if kinds:
            raise OnnxPruneError("--output-kind names graph outputs of an ONNX MODEL; it does not go with --torch")
        result = _torch_path(torch_factory, state_dict, torch_input_shape, prune_ratio, target_macs, data_spec, cfg,
                             output, teacher, not no_progress and not as_json, ctx.is_main)
    else:
        if not model:
            raise OnnxPruneError("missing MODEL (an .onnx file), or use --torch module:factory")
        if state_dict or torch_input_shape or prune_ratio is not None or target_macs is not None:
            raise OnnxPruneError("--state-dict, --input-shape, --prune-ratio and --target-macs go with --torch")
        refuse_overwrite_input(model, output)
        if teacher:
            refuse_overwrite_input(teacher, output)

        src = load_model(model)
        trained, history = finetune(src, data_spec, cfg, teacher=teacher, progress=not no_progress and not as_json,
                                    keep_sparsity=not no_keep_sparsity, output_kinds=kinds)
        history["model"] = model
        result = history
        if ctx.is_main:
            save_model(trained, output)
    result["output"] = output
    if not ctx.is_main:
        return
    if history_path:
        write_text_atomic(history_path, json.dumps(result, indent=2, default=str) + "\n")
    if as_json:
        emit_json(result)
    else:
        _print(result)


def _torch_path(factory: str, state_dict: str | None, shape: str | None, ratio: float | None, target_macs: float | None,
                data_spec: str, cfg, output: str, teacher: str | None, progress: bool, is_main: bool) -> dict:
    import torch  # lazy: torch ([train] extra)

    from ..bridge.torch_export import export_torch  # lazy: imports torch

    if teacher:
        raise OnnxPruneError("--teacher is not supported with --torch yet; retrain without it")
    data = load_dataset(data_spec)
    if shape:
        try:
            dims = tuple(int(d) for d in re.split(r"[x,]", shape.split("=")[-1]))
        except ValueError:
            raise OnnxPruneError(f"bad --input-shape {shape!r}: expected e.g. 1x3x32x32") from None
    else:
        dims = (1, *data.input_shape)
    example = torch.zeros(dims)
    module = load_torch_factory(factory, state_dict)
    summary = None
    if ratio is not None or target_macs is not None:
        module, summary = prune_torch_model(module, example, ratio=ratio, target_macs=target_macs, seed=cfg.seed)
    else:
        macs, params = count_macs_params(module, (example,))
        summary = {"method": "none", "macs_after": macs, "params_after": params}
    history = train_module(module, data, cfg, progress=progress)
    module.eval()
    if is_main:
        export_torch(module, (example,), output)

    test = evaluate_onnx(output, data, "test", cfg.eval_batch_size) if is_main and len(data.test) else None
    return {"source": factory, "state_dict": state_dict, "prune": summary, "data": data.describe(), **history,
            "test": test}


def _print(h: dict) -> None:
    con = Console()
    cfg = h["config"]
    size = (f"{h['steps']} steps" if cfg.get("steps") or h.get("function_matching") else f"{cfg['epochs']} epochs")
    fm = f", function matching ({','.join(h['augment'])})" if h.get("function_matching") else ""
    con.print(f"[bold]{h.get('model') or h.get('source')}[/bold] -> [bold]{h['output']}[/bold]  "
              f"({size}, {cfg['optimizer']} lr {cfg['lr']:g} {cfg['schedule']}, "
              f"batch {cfg['batch_size']}, seed {cfg['seed']}{', teacher ' + str(h['teacher']) if h.get('teacher') else ''}"
              f"{', objective ' + h['objective'] if h.get('objective') else ''}{fm})")
    if h.get("distill_features"):
        at = "residual-stream tensors" if h.get("distill_features_at") == "residual_stream" else "pruned layers' outputs"
        pad = f", padding of {h['distill_features_mask']} left out" if h.get("distill_features_mask") else ""
        con.print(f"features matched: {len(h['distill_features'])} {at} (weight {cfg.get('feature_weight', 1.0):g}{pad})")
    for note in h.get("notes") or []:
        con.print(f"[yellow]note:[/yellow] {note}")
    labeled = h.get("selection", "val_top1") == "val_top1"
    t = Table(title="evaluations on the held-out val split (never augmented)")
    cols = (("epoch", "step", "lr", "train loss", "train top-1", "val top-1") if labeled
            else ("epoch", "step", "lr", "train loss", "val rel_l2", "val agreement", "val cosine"))
    for col in cols:
        t.add_column(col, justify="right")
    best_step = h.get("best_step")
    for e in h["epochs"]:
        mark = " *" if e.get("step") == best_step else ""
        head = (str(e["epoch"]), str(e.get("step", "")), f"{e['lr']:.2e}", f"{e['train_loss']:.4f}")
        if labeled:
            tr = f"{e['train_top1']:.2%}" if e.get("train_top1") is not None else "-"
            t.add_row(*head, tr, f"{e['val_top1']:.2%}{mark}")
        else:
            agree = f"{e['val_top1_agreement']:.2%}" if e.get("val_top1_agreement") is not None else "-"
            cos = f"{e['val_mean_cosine']:.4f}" if e.get("val_mean_cosine") is not None else "-"
            t.add_row(*head, f"{e['val_rel_l2']:.4f}", agree, f"{cos}{mark}")
    con.print(t)
    kept = " (the starting weights were kept)" if not best_step else ""
    if labeled:
        con.print(f"start val top-1 {h['initial_val_top1']:.2%}; best val top-1 {h['best_val_top1']:.2%} at step "
                  f"{best_step} (epoch {h['best_epoch']}){kept}")
    else:
        kinds = h.get("output_kinds") or {}
        figs = "; ".join(_fig_text(name, f, f.get("kind")) for name, f in zip(kinds, h.get("best_val") or []))
        con.print(f"start val rel_l2 {h['initial_val_rel_l2']:.4f}; selected step {best_step} of {h.get('steps')} "
                  f"(closest to the teacher on val, each output by its kind){kept}: {figs or h['best_val_rel_l2']}")
    sp = h.get("sparsity")
    if sp and sp.get("masked_tensors"):
        con.print(f"sparsity kept: {sp['pruned_weights']} pruned weights in {sp['masked_tensors']} tensors, "
                  f"{'all still zero' if sp['preserved'] else '[red]NOT all zero[/red]'}")
    if h.get("test"):
        top5 = f", top-5 {h['test']['top5']:.2%}" if h["test"].get("top5") is not None else ""
        con.print(f"[bold]test top-1 {h['test']['top1']:.2%}{top5}[/bold] ({h['test']['samples']} samples, ONNX Runtime)")
    for name, f in (h.get("test_fidelity") or {}).items():
        con.print(f"test fidelity {_fig_text(name, f, (h.get('output_kinds') or {}).get(name))} (vs teacher, ONNX Runtime)")


def _fig_text(name: str, f: dict, kind: str | None) -> str:
    """One output's figures, in its kind's units (agreement and cosine never mixed with rel_l2)."""
    parts = [f"rel_l2 {f['rel_l2']:.4f}"]
    if "top1_agreement" in f:
        parts.append(f"top-1 agreement {f['top1_agreement']:.2%}")
    if "mean_cosine" in f:
        parts.append(f"mean cosine {f['mean_cosine']:.4f}")
    if "nn_agreement" in f:
        parts.append(f"nearest-neighbour agreement {f['nn_agreement']:.2%}")
    return f"{name}{f' ({kind})' if kind else ''}: " + ", ".join(parts)
