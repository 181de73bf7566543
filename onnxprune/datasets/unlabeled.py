"""Unlabeled data: ``npz`` with only ``x`` or one array per model input, ``images:DIR``, arrays from
``python:``. What distillation, calibration and fidelity need when no labels exist.

Pixels: ``uint8`` (and bool) arrays are multiplied by ``scale`` (default 1/255, so [0, 1]); other
integer arrays (token ids, indices) are kept as they are; floats become float32. The spec's
preprocessing (resize, mean/std, layout) applies to float image arrays (N x C x H x W; N x H x W
gets C = 1 when resize or layout asks for images); per-input arrays that are not float are fed as
stored. Validation and test splits are carved at random (seeded) from the data, 20% each by
default, exactly as for labeled data without its own splits (but not stratified: no classes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.errors import OnnxPruneError
from .types import SPLITS, DatasetSplits, Split, _existing, first_array, take
from .spec import ParsedSpec, Preprocess

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

Arrays = "np.ndarray | dict[str, np.ndarray]"


def pixel_scale(parsed: ParsedSpec) -> float | None:
    """The ``scale=`` option as a float (None when not given)."""
    v = parsed.options.get("scale")
    if v in (None, ""):
        return None
    try:
        f = float(v) if not (isinstance(v, str) and "/" in v) else float(v.split("/")[0]) / float(v.split("/")[1])
    except (TypeError, ValueError, ZeroDivisionError):
        raise OnnxPruneError(f"data spec {parsed.text!r}: scale={v!r} is not a number (e.g. scale=1 or scale=1/255)") from None
    if not np.isfinite(f) or f <= 0:
        raise OnnxPruneError(f"data spec {parsed.text!r}: scale={v!r} must be positive")
    return f


def unit_pixels(a: Any, scale: float | None = None) -> np.ndarray:
    """uint8/bool pixels times ``scale`` (default 1/255) as float32; other integers kept; floats as float32."""
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)
    if a.dtype == np.uint8 or a.dtype == np.bool_:
        return (a.astype(np.float32) * np.float32(1.0 / 255.0 if scale is None else scale))
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        return np.ascontiguousarray(a, dtype=np.float32)
    raise OnnxPruneError(f"arrays of dtype {a.dtype} cannot be fed to a model")


def _preprocess_one(pre: Preprocess, a: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        return a
    if a.ndim == 3 and (pre.resize or pre.layout != "nchw"):
        a = a[:, None]
    if a.ndim != 4 and (pre.resize or pre.layout != "nchw"):
        raise OnnxPruneError(f"{what}: resize/layout need images (N x C x H x W); got shape {list(a.shape)}")
    return pre.apply(a)


def preprocess_arrays(pre: Preprocess, x: Arrays, what: str) -> Arrays:
    """The spec's preprocessing on one array or on every float per-input array."""
    if isinstance(x, Mapping):
        return {k: _preprocess_one(pre, v, f"{what}: array {k!r}") for k, v in x.items()}
    return _preprocess_one(pre, x, what)


def check_lengths(x: Arrays, what: str) -> None:
    if isinstance(x, Mapping):
        if not x:
            raise OnnxPruneError(f"{what}: no arrays")
        lens = {k: (len(v) if np.ndim(v) else 0) for k, v in x.items()}
        if len(set(lens.values())) > 1:
            raise OnnxPruneError(f"{what}: per-input arrays have different sample counts {lens}")
    elif np.ndim(x) == 0:
        raise OnnxPruneError(f"{what}: expected an array of samples (N x ...), got a scalar")
    if len(first_array(x)) == 0:
        raise OnnxPruneError(f"{what}: no samples (the array is empty)")


def assemble_unlabeled(parsed: ParsedSpec, pre: Preprocess, seed: int, x: Arrays, *, val: Arrays | None = None,
                       test: Arrays | None = None, notes: list[str] | None = None) -> DatasetSplits:
    """Carve missing val/test at random (seeded), preprocess, and wrap as an unlabeled dataset."""
    what = f"data {parsed.text!r}"
    check_lengths(x, what)
    notes = list(notes or []) + ["unlabeled"]
    fr = {k: parsed.fraction(k, 0.2) for k, given in (("val", val), ("test", test)) if given is None}
    if sum(fr.values()) >= 1.0:
        raise OnnxPruneError(f"{what}: val + test fractions leave no training data")
    n = len(first_array(x))
    if fr:
        perm = np.random.default_rng(seed).permutation(n)
        start, carved = 0, {}
        for name, f in fr.items():
            k = int(round(n * f))
            carved[name] = np.sort(perm[start:start + k])
            start += k
        keep = np.sort(perm[start:])
        val = take(x, carved["val"]) if "val" in carved else val
        test = take(x, carved["test"]) if "test" in carved else test
        x = take(x, keep)
        notes.append(f"{' and '.join(fr)} carved at random from the data "
                     f"({', '.join(f'{f:.0%}' for f in fr.values())}, seed {seed})")
    out = {name: Split(x=preprocess_arrays(pre, a, what), y=None) for name, a in (("train", x), ("val", val), ("test", test))}
    if len(out["train"]) == 0:
        raise OnnxPruneError(f"{what}: the train split is empty ({n} samples; lower val=/test= or add data)")
    first = first_array(out["train"].x)
    return DatasetSplits(train=out["train"], val=out["val"], test=out["test"], num_classes=0,
                         input_shape=tuple(first.shape[1:]), notes=notes)


def npz_unlabeled(parsed: ParsedSpec, pre: Preprocess, seed: int, path: Path, arrays: dict[str, np.ndarray]) -> DatasetSplits:
    """``x`` only (with optional ``x_val``/``x_test``), or one array per model input named like it."""
    scale = pixel_scale(parsed)
    stored = str(parsed.options.get("stored") or "nchw").lower()

    def conv(a: np.ndarray) -> np.ndarray:
        a = unit_pixels(a, scale)
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if stored == "nhwc" and a.ndim == 4 else a

    if "x" in arrays:
        extra = sorted(set(arrays) - {"x", "x_val", "x_test"})
        if extra:
            raise OnnxPruneError(f"{path}: unexpected arrays {', '.join(extra)} next to 'x' (an unlabeled npz holds "
                                 "'x' [, 'x_val', 'x_test'], or one array per model input named like the input)")
        split = {k: conv(arrays[f"x_{k}"]) for k in ("val", "test") if f"x_{k}" in arrays}
        return assemble_unlabeled(parsed, pre, seed, conv(arrays["x"]), val=split.get("val"), test=split.get("test"),
                                  notes=[f"{path}: x only"])
    if not arrays:
        raise OnnxPruneError(f"{path}: the archive holds no arrays (expected 'x', or one array per model input)")
    return assemble_unlabeled(parsed, pre, seed, {k: conv(v) for k, v in arrays.items()},
                              notes=[f"{path}: one array per input ({', '.join(arrays)})"])


def python_unlabeled(parsed: ParsedSpec, pre: Preprocess, seed: int, out: Any, fname: str) -> DatasetSplits | None:
    """A ``python:`` function's return value when it is unlabeled arrays (one array, or a dict of
    arrays keyed by input name); None when it is something else (splits, DatasetSplits)."""
    if is_array(out):
        return assemble_unlabeled(parsed, pre, seed, unit_pixels(out), notes=[f"{fname}() returned one array"])
    if isinstance(out, Mapping) and out and not (set(out) & set(SPLITS)) and all(is_array(v) for v in out.values()):
        return assemble_unlabeled(parsed, pre, seed, {str(k): unit_pixels(v) for k, v in out.items()},
                                  notes=[f"{fname}() returned arrays for {', '.join(map(str, out))}"])
    return None


def is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "detach"))


# --------------------------------------------------------------------------- images:DIR

def image_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted, hidden files and folders skipped)."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise OnnxPruneError(f"{root}: no image files found (extensions {', '.join(sorted(IMAGE_EXTS))}, "
                             "searched recursively)")
    return sorted(files)


def read_images(files: list[Path], *, color: str = "rgb", size: tuple[int, int] | None = None,
                scale: float | None = None) -> np.ndarray:
    """Image files -> float32 N x C x H x W (pixels times ``scale``, default 1/255), resized to
    ``size`` (H, W) with Pillow's bilinear filter when given; all must have one size otherwise."""
    try:
        from PIL import Image  # lazy: pillow ([images] extra)
    except ImportError:
        raise OnnxPruneError("images:DIR needs the Python package 'Pillow' (pip install pillow)") from None
    if color not in ("rgb", "bgr", "grey", "gray", "l"):
        raise OnnxPruneError(f"color={color!r} must be rgb, bgr or grey")
    mode = "L" if color in ("grey", "gray", "l") else "RGB"
    xs: list[np.ndarray] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise OnnxPruneError(f"{f}: cannot read image ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
        if first is None:
            first = (f, a.shape)
        elif a.shape != first[1]:
            raise OnnxPruneError(f"{f}: image is {a.shape[0]}x{a.shape[1]} but {first[0].name} is "
                                 f"{first[1][0]}x{first[1][1]}; add size=HxW to the spec")
        a = a[:, :, None] if a.ndim == 2 else a
        xs.append(a[:, :, ::-1] if color == "bgr" else a)
    x = np.stack(xs).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x.astype(np.float32) * np.float32(1.0 / 255.0 if scale is None else scale))


def load_images(parsed: ParsedSpec, pre: Preprocess, seed: int, *, limit: int | None = None) -> DatasetSplits:
    """``images:DIR``: every image under DIR, no class folders, unlabeled. ``limit``: read only a
    seeded random subset of that many files (calibration needs a few hundred, not the folder)."""

    root = _existing(parsed.arg, parsed, want_dir=True)
    files = image_files(root)
    if limit is not None and limit < len(files):
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in pick]
    color = str(parsed.options.get("color") or "rgb").lower()
    x = read_images(files, color=color, size=pre.resize, scale=pixel_scale(parsed))
    return assemble_unlabeled(parsed, pre, seed, x, notes=[f"{len(files)} images under {root}, {color}"])
