"""``onnxprune prune MODEL -o OUT (--structured | --unstructured | --nm N:M)``.

Flags are parsed here (not by click's type system) so that every bad value is one clear line and
a non-zero exit. The input is never overwritten; the output is written atomically, and nothing is
written when anything fails.
"""
from __future__ import annotations

import math
from typing import Any

import click

from ..core.errors import OnnxPruneError
from .common import emit_json, human, json_option, model_argument
from ..core.model_io import refuse_overwrite_input, file_bytes, save_model, load_graph
from ..report.guidance import speedup_guidance
from ..structured.prune import prune_structured
from ..profiling.hw_profile import profile_channel_multiple, load_hw_profile
from ..calibration import StructuredCalibration, calibration_split, calibration_inputs
from ..datasets import data_input_shapes, load_dataset
from ..structured.latency_alloc import prune_for_latency
from ..core.shapes import parse_input_shapes
from ..sparsity.prune import prune_unstructured, parse_nm, prune_nm
from concurrent.futures import ThreadPoolExecutor
from ..sparsity.storage import gzip_file_bytes, to_sparse_storage
from ..training import weight_gradients
from ..calibration.weights import WeightCalibration
from rich.markup import escape
from rich.table import Table
from rich.console import Console

STRUCTURED_CRITERIA = ("l1", "l2", "bn", "fpgm", "lamp", "random", "taylor", "activation", "fisher")
STRUCTURED_SCOPES = ("local", "global")
UNSTRUCTURED_CRITERIA = ("magnitude", "random", "lamp", "magnitude_x_gradient", "wanda")
NM_CRITERIA = ("magnitude", "wanda")
UNSTRUCTURED_SCOPES = ("global", "layer")
GRADIENT_CRITERIA = ("taylor", "magnitude_x_gradient")
#: modes whose summary has gzip sizes unless --no-gzip: zeros compress, so gzip is their size gain
GZIP_BY_DEFAULT = ("unstructured", "nm")
BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "torch-cpu", "torch-cuda")

# flag -> modes that accept it (click parameter name, shown name)
_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "ratio": ("--ratio", ("structured",)),
    "target_macs": ("--target-macs", ("structured",)),
    "target_params": ("--target-params", ("structured",)),
    "target_latency": ("--target-latency", ("structured",)),
    "target_speedup": ("--target-speedup", ("structured",)),
    "round_to": ("--round-to", ("structured",)),
    "min_keep": ("--min-keep", ("structured",)),
    "max_ratio": ("--max-ratio", ("structured",)),
    "sparsity": ("--sparsity", ("unstructured",)),
    "min_threshold": ("--min-threshold", ("unstructured",)),
    "scope": ("--scope", ("structured", "unstructured")),
    "criterion": ("--criterion", ("structured", "unstructured", "nm")),
    "seed": ("--seed", ("structured", "unstructured")),
    "data": ("--data", ("structured", "unstructured")),
    "exclude_first": ("--exclude-first", ("unstructured", "nm")),
    "exclude_last": ("--exclude-last", ("unstructured", "nm")),
    "sparse_storage": ("--sparse-storage", ("unstructured", "nm")),
    "reconstruct": ("--reconstruct", ("unstructured", "nm")),
    "allow_io_change": ("--allow-io-change", ("structured",)),
    "prune_hidden": ("--prune-hidden", ("structured",)),
    "mask_rearrangement": ("--mask-rearrangement", ("structured",)),
    "calibration_mask": ("--calibration-mask", ("structured",)),
}


@click.command("prune")
@model_argument
@click.option("-o", "--output", default=None, metavar="OUT", help="Where to write the pruned model (never the input).")
@click.option("--structured", is_flag=True, help="Remove whole channels (less work for the dense kernels of every runtime).")
@click.option("--unstructured", is_flag=True, help="Zero individual weights (smaller when compressed; not faster).")
@click.option("--nm", default=None, metavar="N:M", help="Keep N of every M weights along the input channels, e.g. 2:4.")
@click.option("--ratio", default=None, metavar="R", help="[structured] fraction of channels removed.")
@click.option("--target-macs", default=None, metavar="F", help="[structured] fraction of MACs kept.")
@click.option("--target-params", default=None, metavar="F", help="[structured] fraction of params kept.")
@click.option("--target-latency", default=None, metavar="MS",
              help="[structured] p50 latency to reach on the --hw profile (latency-aware allocation, measured).")
@click.option("--target-speedup", default=None, metavar="X",
              help="[structured] speedup over the dense model to reach on the --hw profile (measured, interleaved).")
@click.option("--round-to", default=None, metavar="N", help="[structured] kept channel counts are multiples of N.")
@click.option("--min-keep", default=None, metavar="K", help="[structured] keep at least K channels per group.")
@click.option("--max-ratio", default=None, metavar="F", help="[structured] remove at most this fraction of any group.")
@click.option("--input-shape", multiple=True, metavar="NAME=DIMS", help="Fix an input's shape, e.g. input=1x3x224x224 (repeatable).")
@click.option("--sparsity", default=None, metavar="S", help="[unstructured] fraction of prunable weights zeroed, in [0, 1).")
@click.option("--min-threshold", default=None, metavar="F",
              help="[unstructured, global] every layer keeps at least this fraction of its weights.")
@click.option("--scope", default=None, metavar="SCOPE", help="structured: local|global; unstructured: global|layer.")
@click.option("--criterion", default=None, metavar="NAME",
              help="structured: l1|l2|bn|fpgm|lamp|random|taylor|activation|fisher; unstructured: "
                   "magnitude|random|lamp|magnitude_x_gradient|wanda; N:M: magnitude|wanda.")
@click.option("--exclude-first", is_flag=True, help="[unstructured, N:M] leave the first layer(s) dense.")
@click.option("--exclude-last", is_flag=True, help="[unstructured, N:M] leave the last layer(s) (classifier) dense.")
@click.option("--allow-io-change", is_flag=True, default=None,
              help="[structured] let KV-cache inputs/outputs shrink with the heads they carry (lists every changed shape).")
@click.option("--prune-hidden", is_flag=True, default=None,
              help="[structured] prune the hidden size (residual stream) that embedding tables start too.")
@click.option("--mask-rearrangement", is_flag=True, default=None,
              help="[structured, --criterion fisher] re-choose which heads/columns of each layer go on its whole "
                   "Fisher matrix (Kwon et al.), the count kept.")
@click.option("--ignore", multiple=True, metavar="PATTERN", help="Leave layers whose node name matches this glob (repeatable).")
@click.option("--sparse-storage", is_flag=True, help="[unstructured, N:M] store weights as sparse initializers where smaller.")
@click.option("--seed", default=None, metavar="S", help="Seed of the random criterion (default 0).")
@click.option("--hw", default=None, metavar="PROFILE",
              help="Hardware profile or backend the speed note is about (default ort-cpu); with --structured, the "
                   "profile's channel_multiple is the default --round-to.")
@click.option("--data", default=None, metavar="SPEC", help="Dataset for gradient criteria (taylor, magnitude_x_gradient).")
@click.option("--gzip/--no-gzip", "gzip", default=None,
              help="Measure gzip sizes of input and output (default: on for --unstructured/--nm, where zeros "
                   "compress; off for --structured, where it says nothing and costs seconds on large models).")
@click.option("--calibrate", default=None, metavar="SPEC",
              help="Unlabeled data: structured: re-fit the layers reading pruned channels toward the dense model; "
                   "enables --criterion activation|fisher|wanda and --reconstruct.")
@click.option("--calibration-samples", default=None, metavar="N", help="Samples taken from --calibrate (default 256).")
@click.option("--calibration-mask", default=None, metavar="NAME",
              help="[structured] with --calibrate: the input holding a 0/1 attention mask; padding positions count "
                   "in no statistic (default: an integer input named like *mask*).")
@click.option("--reconstruct", is_flag=True,
              help="[unstructured, N:M] with --calibrate: update the remaining weights to compensate the zeroed ones.")
@json_option
def prune_cmd(model: str, output: str | None, structured: bool, unstructured: bool, nm: str | None, as_json: bool,
              **opts: Any) -> None:
    """Prune MODEL into OUT with exactly one of --structured, --unstructured or --nm N:M; print a summary
    and what the result will (not) buy in speed on the target (--hw, default ONNX Runtime CPU)."""
    modes = [name for name, on in (("structured", structured), ("unstructured", unstructured), ("nm", nm is not None)) if on]
    if len(modes) != 1:
        raise OnnxPruneError("choose exactly one of --structured, --unstructured, --nm N:M"
                             + (f" (got {', '.join('--' + m if m != 'nm' else '--nm' for m in modes)})" if modes else ""))
    mode = modes[0]
    if not output:
        raise OnnxPruneError("missing -o/--output OUT: where to write the pruned model")
    _reject_foreign(mode, opts)
    backend, cc, precision, sparse_weights = _backend(opts["hw"])

    refuse_overwrite_input(model, output)
    opts["progress"] = not as_json

    if mode == "structured":
        result = _structured(model, opts)

        lines = speedup_guidance("structured", backend, cc)
        if (result.summary.get("limits") or {}).get("round_to", 1) >= 8:  # already on kernel-friendly counts
            lines = [line for line in lines if "--round-to" not in line]
        result.summary.setdefault("guidance", lines)
    elif mode == "unstructured":
        result = _unstructured(model, opts, backend, cc, precision, sparse_weights)
    else:
        result = _nm(model, nm or "", opts, backend, cc, precision, sparse_weights)


    save_model(result.model, output)
    summary = dict(result.summary)
    summary.update(output=str(output), file_bytes=file_bytes(output), input_file_bytes=file_bytes(model))
    want_gzip = opts["gzip"] if opts["gzip"] is not None else mode in GZIP_BY_DEFAULT
    summary.update(zip(("gzip_bytes", "input_gzip_bytes"), _gzip_sizes(output, model) if want_gzip else (None, None)))
    if as_json:
        emit_json({"input": str(model), **summary})
    else:
        _print_human(model, summary)


# ------------------------------------------------------------------------------------------ modes

def _structured(model: str, opts: dict[str, Any]):
    targets = {k: opts[k] for k in ("ratio", "target_macs", "target_params", "target_latency", "target_speedup")
               if opts[k] is not None}
    if len(targets) != 1:
        raise OnnxPruneError("--structured needs exactly one of --ratio R, --target-macs F, --target-params F, "
                             "--target-latency MS, --target-speedup X")
    (kind, raw), = targets.items()
    flag = _ONLY[kind][0]
    value = _number(raw, flag)
    if kind in ("target_latency", "target_speedup"):
        return _latency_target(model, opts, kind, value)
    if kind == "ratio" and not 0 <= value < 1:
        raise OnnxPruneError(f"{flag} must be in [0, 1) (fraction of channels removed), not {raw}")
    if kind != "ratio" and not 0 < value <= 1:
        raise OnnxPruneError(f"{flag} must be in (0, 1] (fraction kept), not {raw}")
    criterion = _choice(opts["criterion"], STRUCTURED_CRITERIA, "l1", "--criterion", "--structured")
    scope = _choice(opts["scope"], STRUCTURED_SCOPES, "local", "--scope", "--structured")
    kwargs: dict[str, Any] = {kind: value, "scope": scope, **_structured_options(model, opts, criterion, max_ratio_one=True)}
    note = None
    if "round_to" not in kwargs:  # the profile's kernel-friendly channel multiple (an explicit --round-to wins)

        multiple, prof_name = profile_channel_multiple(opts["hw"])
        if prof_name:
            kwargs.update(round_to=multiple, round_columns=True)  # heads: whole heads, columns a multiple
            note = (f"kept weight columns rounded to multiples of {multiple} (heads kept whole): channel_multiple of "
                    f"hardware profile {prof_name} (--round-to N overrides)")
    inputs = _calibration_inputs(model, opts, criterion)
    if inputs is not None:
        if "input_shapes" not in kwargs:  # the data's shapes fix symbolic dims (batch 1 for the figures)
            kwargs["input_shapes"] = data_input_shapes(inputs, batch=1)

        kwargs["calibration"] = StructuredCalibration(inputs, progress=opts["progress"], mask=opts["calibration_mask"],
                                                      split=calibration_split(opts["calibrate"]))

    for flag in ("allow_io_change", "prune_hidden"):
        if opts[flag]:
            kwargs[flag] = True
    if opts["mask_rearrangement"]:
        kwargs["rearrange"] = True
    result = prune_structured(model, **kwargs)
    if note:
        result.summary.setdefault("notes", []).append(note)
    return result


def _latency_target(model: str, opts: dict[str, Any], kind: str, value: float):
    """Latency-aware allocation on the --hw profile (``structured/latency_alloc.py``); without
    --round-to it rounds to the profile's channel_multiple itself."""
    flag = _ONLY[kind][0]
    if opts["hw"] is None or opts["hw"] in BACKENDS:
        raise OnnxPruneError(f"{flag} needs --hw PROFILE: the hardware profile it is measured on (e.g. --hw ci-cpu)")
    if opts["scope"] is not None:
        raise OnnxPruneError(f"--scope does not apply to {flag}: the allocation ranks all groups together")
    for key in ("allow_io_change", "prune_hidden", "mask_rearrangement"):
        if opts[key]:
            raise OnnxPruneError(f"{_ONLY[key][0]} does not apply to {flag} yet: use --ratio or --target-macs")
    criterion = _choice(opts["criterion"], STRUCTURED_CRITERIA, "l1", "--criterion", "--structured")
    kwargs = _structured_options(model, opts, criterion, max_ratio_one=False)

    inputs = _calibration_inputs(model, opts, criterion)
    if inputs is not None:  # --criterion activation scores heads/FFN on it; the chosen model is re-fitted
        kwargs["calibration"] = StructuredCalibration(inputs, progress=opts["progress"], mask=opts["calibration_mask"],
                                                      split=calibration_split(opts["calibrate"]))
    target = {"target_speedup": value} if kind == "target_speedup" else {"target_latency_ms": value}
    return prune_for_latency(model, opts["hw"], **target, **kwargs)


def _structured_options(model: str, opts: dict[str, Any], criterion: str, *, max_ratio_one: bool) -> dict[str, Any]:
    """The options every structured target takes: criterion (and its gradients), --ignore, --seed,
    --round-to, --min-keep, --max-ratio (``max_ratio_one``: 1 allowed) and --input-shape."""
    kwargs: dict[str, Any] = {"criterion": criterion, "ignore": tuple(opts["ignore"]),
                              "seed": _int(opts["seed"], "--seed", 0)}
    if opts["round_to"] is not None:
        kwargs["round_to"] = _int(opts["round_to"], "--round-to", 1, minimum=1)
    if opts["min_keep"] is not None:
        kwargs["min_keep"] = _int(opts["min_keep"], "--min-keep", 1, minimum=1)
    if opts["max_ratio"] is not None:
        mr = _number(opts["max_ratio"], "--max-ratio")
        if not (0 < mr <= 1 if max_ratio_one else 0 < mr < 1):
            raise OnnxPruneError(f"--max-ratio must be in (0, {'1]' if max_ratio_one else '1)'}, not {opts['max_ratio']}")
        kwargs["max_ratio"] = mr
    if opts["input_shape"]:
        kwargs["input_shapes"] = parse_input_shapes(opts["input_shape"])
    kwargs["gradients"] = _gradients(model, opts["data"], criterion)
    return kwargs


def _unstructured(model: str, opts: dict[str, Any], backend: str, cc, precision, sparse_weights):
    if opts["sparsity"] is None:
        raise OnnxPruneError("--unstructured needs --sparsity S (fraction of prunable weights zeroed, in [0, 1))")
    sparsity = _number(opts["sparsity"], "--sparsity")
    if not 0 <= sparsity < 1:
        raise OnnxPruneError(f"--sparsity must be in [0, 1), not {opts['sparsity']}")
    min_threshold = 0.0
    if opts["min_threshold"] is not None:
        min_threshold = _number(opts["min_threshold"], "--min-threshold")
        if not 0 <= min_threshold <= 1:
            raise OnnxPruneError(f"--min-threshold must be in [0, 1] (fraction of each layer kept), not {opts['min_threshold']}")
    criterion = _choice(opts["criterion"], UNSTRUCTURED_CRITERIA, "magnitude", "--criterion", "--unstructured")
    # wanda compares weights within a layer (activation norms differ in scale between layers)
    scope = _choice(opts["scope"], UNSTRUCTURED_SCOPES, "layer" if criterion == "wanda" else "global", "--scope",
                    "--unstructured")
    seed = _int(opts["seed"], "--seed", 0)
    gradients = _gradients(model, opts["data"], criterion)
    cal = _weight_calibration(model, opts, criterion)

    result = prune_unstructured(model, sparsity=sparsity, scope=scope, min_threshold=min_threshold, criterion=criterion,
                                exclude_first=opts["exclude_first"], exclude_last=opts["exclude_last"],
                                ignore=tuple(opts["ignore"]), seed=seed, gradients=gradients,
                                sparse_storage=opts["sparse_storage"] and cal is None, backend=backend,
                                gpu_compute_capability=cc, measure_size=False,
                                input_shapes=parse_input_shapes(opts["input_shape"]),
                                activations=cal.norms() if criterion == "wanda" else None)
    _reconstruct(result, cal, opts)
    _refine_guidance(result.summary, "unstructured", backend, cc, precision, sparse_weights)
    return result


def _nm(model: str, spec: str, opts: dict[str, Any], backend: str, cc, precision, sparse_weights):
    n, m = parse_nm(spec)
    criterion = _choice(opts["criterion"], NM_CRITERIA, "magnitude", "--criterion", "--nm")
    cal = _weight_calibration(model, opts, criterion)
    result = prune_nm(model, n=n, m=m, exclude_first=opts["exclude_first"], exclude_last=opts["exclude_last"],
                      ignore=tuple(opts["ignore"]), sparse_storage=opts["sparse_storage"] and cal is None,
                      backend=backend, gpu_compute_capability=cc, measure_size=False,
                      input_shapes=parse_input_shapes(opts["input_shape"]),
                      activations=cal.norms() if criterion == "wanda" else None)
    _reconstruct(result, cal, opts)
    _refine_guidance(result.summary, "nm", backend, cc, precision, sparse_weights, nm=(n, m))
    return result


def _refine_guidance(summary: dict[str, Any], method: str, backend: str, cc, precision, sparse_weights, nm=None) -> None:
    summary["guidance"] = speedup_guidance(method, backend, cc, nm=nm, precision=precision, sparse_weights=sparse_weights)


# ---------------------------------------------------------------------------------------- helpers

def _gzip_sizes(output: str, model: str) -> tuple[int, int]:
    """gzip sizes of the output and input files, compressed at once (zlib releases the GIL)."""


    with ThreadPoolExecutor(2) as pool:
        gz_out, gz_in = pool.submit(gzip_file_bytes, output), pool.submit(gzip_file_bytes, model)
        return gz_out.result(), gz_in.result()


def _reject_foreign(mode: str, opts: dict[str, Any]) -> None:
    """A flag of another mode is an error, not silently ignored."""
    shown = {"structured": "--structured", "unstructured": "--unstructured", "nm": "--nm"}
    for key, (flag, modes) in _ONLY.items():
        val = opts.get(key)
        given = bool(val) if isinstance(val, (bool, tuple)) else val is not None
        if given and mode not in modes:
            raise OnnxPruneError(f"{flag} does not apply to {shown[mode]} (it is for {' and '.join(shown[m] for m in modes)})")


def _choice(value: str | None, choices: tuple[str, ...], default: str, flag: str, mode: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise OnnxPruneError(f"{flag} {value!r} is not valid with {mode}; choose one of {', '.join(choices)}")
    return value


def _number(raw: str, flag: str) -> float:
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"{flag} expects a number, not {raw!r}") from None
    if not math.isfinite(v):
        raise OnnxPruneError(f"{flag} expects a finite number, not {raw!r}")
    return v


def _int(raw: str | None, flag: str, default: int, *, minimum: int | None = None) -> int:
    if raw is None:
        return default
    try:
        v = int(str(raw).strip())
    except ValueError:
        raise OnnxPruneError(f"{flag} expects an integer, not {raw!r}") from None
    if minimum is not None and v < minimum:
        raise OnnxPruneError(f"{flag} must be at least {minimum}, not {raw}")
    return v


def _backend(hw: str | None) -> tuple[str, str | None, str | None, bool | None]:
    """(backend, GPU compute capability, precision, sparse_weights) from ``--hw`` (a backend name or a profile)."""
    if hw is None:
        return "ort-cpu", None, None, None
    if hw in BACKENDS:
        return hw, None, None, None

    prof = load_hw_profile(hw)
    gpu = getattr(prof, "gpu", None)
    return (prof.backend, getattr(gpu, "compute_capability", None) if gpu else None,
            getattr(prof, "precision", None), getattr(prof, "sparse_weights", None))


def _gradients(model: str, data: str | None, criterion: str):
    """Gradients of the weights on ``data`` when ``criterion`` needs them."""
    if criterion not in GRADIENT_CRITERIA:
        if data is not None:
            raise OnnxPruneError(f"--data is used only by the gradient criteria ({', '.join(GRADIENT_CRITERIA)}), "
                                 f"not by {criterion}")
        return None
    if data is None:
        raise OnnxPruneError(f"criterion {criterion} needs gradients: pass --data SPEC (e.g. --data digits)")

    return weight_gradients(model, load_dataset(data))


def _calibration_inputs(model: str, opts: dict[str, Any], criterion: str):
    """The ``--calibrate`` samples (None without it); criteria that need them ask for it."""
    if opts["calibrate"] is None:
        if criterion in ("activation", "wanda", "fisher") or opts.get("reconstruct"):
            what = "--reconstruct" if opts.get("reconstruct") else f"criterion {criterion}"
            raise OnnxPruneError(f"{what} needs calibration data: pass --calibrate SPEC (unlabeled inputs)")
        for flag in ("calibration_samples", "calibration_mask"):
            if opts[flag] is not None:
                raise OnnxPruneError(f"--{flag.replace('_', '-')} needs --calibrate SPEC")
        return None

    n = _int(opts["calibration_samples"], "--calibration-samples", 256, minimum=1)
    return calibration_inputs(opts["calibrate"], load_graph(model), n)


def _weight_calibration(model: str, opts: dict[str, Any], criterion: str):
    inputs = _calibration_inputs(model, opts, criterion)
    if inputs is None:
        return None
    if criterion != "wanda" and not opts["reconstruct"]:
        raise OnnxPruneError("--calibrate with --unstructured or --nm is used by --criterion wanda and --reconstruct: "
                             "pass one of them")

    return WeightCalibration(model, inputs, progress=opts["progress"])


def _reconstruct(result, cal, opts: dict[str, Any]) -> None:
    """``--reconstruct``: the pruned weights re-fitted in ``result`` (in place), then the sparse storage."""
    if cal is None:
        return
    if opts["reconstruct"]:
        result.model, result.summary["calibration"] = cal.reconstruct(result.model)
        result.summary["calibration"]["split"] = calibration_split(opts["calibrate"])
    if opts["sparse_storage"]:
        result.model, moved, storage_notes = to_sparse_storage(result.model, cal.weights)
        result.summary.update(storage="sparse" if moved else "dense", sparse_initializers=moved)
        result.summary.setdefault("notes", []).extend(storage_notes)


def _print_calibration(con, cal: dict[str, Any]) -> None:
    """Each re-fitted layer's output error relative to the dense model, before and after."""

    split = f" from the {cal['split']} split" if cal.get("split") else ""
    check = {"held_out": f"{cal.get('fit_samples')} fitted, {cal.get('check_samples')} held out for the check",
             "in_sample": f"checked on {cal.get('check_samples')} of the fitted samples"}.get(cal.get("check"))
    fit_on = f"; fitted on {cal['fit_on']}" if cal.get("fit_on") and cal["method"] == "refit" else ""
    con.print(f"calibration: {cal['method']}, {cal['samples']} samples{split}" + (f" ({check})" if check else "")
              + f"{escape(fit_on)}, {cal['seconds']:.1f} s")
    table = Table(title="calibration: output error relative to the dense model")
    for col in ("node", "fix", "before", "after"):
        table.add_column(col, justify="left" if col in ("node", "fix") else "right")
    for layer in cal.get("layers", []):
        table.add_row(escape(layer["node"]), layer["method"], *(("n/a" if layer.get(k) is None else f"{layer[k]:.4f}")
                                                                for k in ("error_before", "error_after")))
    for name, o in cal.get("outputs", {}).items():
        table.add_row(f"[bold]output {escape(name)}[/bold]", "", f"{o['rel_l2_before']:.4f}", f"{o['rel_l2_after']:.4f}")
    con.print(table)
    for sk in cal.get("skipped", []):
        con.print(f"  {escape(sk['node'])}: {escape(sk['reason'])}")
    for rj in cal.get("rejected", []):
        con.print(f"  {rj['method']} not used: {escape(rj['reason'])} (mean rel_l2 {rj['mean_rel_l2_after']:.4g}); "
                  f"kept: {cal['method']}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _print_human(model: str, s: dict[str, Any]) -> None:
    con = Console()
    method = s.get("method")
    what = {"unstructured": f"unstructured, {s.get('criterion')}, {s.get('scope')} scope",
            "nm": f"N:M {s.get('pattern')}", "structured": f"structured, {s.get('criterion')}, {s.get('scope')} scope"}
    con.print(f"[bold]{escape(str(model))}[/bold] -> [bold]{escape(s['output'])}[/bold] ({what.get(method, method)})")
    if method in ("unstructured", "nm"):
        ratio = s.get("compression_ratio")
        con.print(f"sparsity: target {_pct(s['target_sparsity'])}, achieved {_pct(s['achieved_sparsity'])} of "
                  f"{human(s['prunable_params'])} prunable weights; {_pct(s['sparsity_all_params'])} of all "
                  f"{human(s['params'])} params (nonzero {human(s['nonzero_params'])}, compression ratio "
                  + (f"{ratio:.2f}x)" if ratio else "n/a)"))
        table = Table(title="layers")
        for col in ("node", "op", "weights", "sparsity") + (("pattern",) if method == "nm" else ()):
            table.add_column(col, justify="left" if col in ("node", "op") else "right")
        for layer in s["layers"]:
            row = [escape(layer["node"]), layer["op_type"], human(layer["size"]), _pct(layer["sparsity"])]
            if method == "nm":
                row.append("ok" if layer.get("nm_ok") else "dense")
            table.add_row(*row)
        con.print(table)
        for sk in s.get("skipped", []):
            con.print(f"  skipped {escape(sk['node'])}: {escape(sk['reason'])}")
        for ex in s.get("excluded", []):
            con.print(f"  excluded {escape(ex['node'])}: {escape(ex['reason'])}")
    elif method == "structured":
        con.print(f"params {human(s.get('params_before'))} -> {human(s.get('params_after'))}  "
                  f"MACs {human(s.get('macs_before'))} -> {human(s.get('macs_after'))}  "
                  f"channels {s.get('channels_before')} -> {s.get('channels_after')}")
        groups = s.get("groups", [])
        if groups:
            table = Table(title="channel groups")
            for col in ("group", "nodes", "kept", "of"):
                table.add_column(col, justify="left" if col == "nodes" else "right")
            for g in groups:
                nodes = g.get("nodes", [])
                shown = ", ".join(nodes[:2]) + (f" +{len(nodes) - 2}" if len(nodes) > 2 else "")
                table.add_row(str(g.get("id")), escape(shown), str(g.get("kept")), str(g.get("total")))
            con.print(table)
        unprunable = s.get("unprunable", [])
        for g in unprunable[:10]:
            nodes = ", ".join(g.get("nodes", [])[:2])
            con.print(f"  left whole: group {g.get('id')} ({escape(nodes)}): {escape(str(g.get('reason')))}")
        if len(unprunable) > 10:
            con.print(f"  ... and {len(unprunable) - 10} more groups left whole (see --json)")
    if s.get("calibration"):
        _print_calibration(con, s["calibration"])

    def gz(key: str) -> str:
        return "" if s.get(key) is None else f" (gzip {human(s[key], 'B')})"

    con.print(f"size: {human(s['file_bytes'], 'B')}{gz('gzip_bytes')}; input {human(s['input_file_bytes'], 'B')}"
              f"{gz('input_gzip_bytes')}")
    for note in s.get("notes", []):
        con.print(f"[dim]{escape(note)}[/dim]")
    for line in s.get("guidance", []):
        con.print(f"[yellow]note:[/yellow] {escape(line)}")
