"""Loading datasets from specs into train / validation / test splits (numpy; torch only for loaders).

Every loader returns a :class:`DatasetSplits`. Images are handled as float32 NCHW scaled to [0, 1]
(integer pixels are divided by their maximum: 255, or 16 for digits) and then run through the
declared :class:`~onnxprune.datasets.spec.Preprocess`. Labels are int64 class indices.

Splits: a source's own validation/test splits are used when it has them; otherwise they are carved
from the training data, stratified by class and seeded (``seed``), so the same spec and seed always
give the same split. Checkpoint selection uses ``val`` only; ``test`` is for the one final report.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..core.errors import OnnxPruneError
from ..core.user_code import import_callable
from .spec import ParsedSpec, Preprocess, parse_spec
from .types import SPLITS, DatasetSplits, Split, _existing, _is_pair
from .unlabeled import npz_unlabeled, pixel_scale, python_unlabeled, load_images
from .text import load_text
import inspect

_EMBEDDED_DIGITS = Path(__file__).with_name("digits.npz")
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_dataset(spec: "str | Mapping[str, Any] | DatasetSplits", *, seed: int = 0,
                 preprocess: "Preprocess | Mapping[str, Any] | None" = None) -> DatasetSplits:
    """Load ``spec`` into train/val/test splits (see :mod:`onnxprune.datasets.spec` for the syntax).

    ``preprocess`` (a :class:`Preprocess` or mapping of spec keys) overrides the spec's own options.
    A :class:`DatasetSplits` is returned unchanged.
    """
    if isinstance(spec, DatasetSplits):
        return spec
    parsed = parse_spec(spec)
    if preprocess is not None:
        if isinstance(preprocess, Preprocess):
            parsed.options.update({k: v for k, v in preprocess.to_dict().items() if v is not None})
        else:
            parsed.options.update(dict(preprocess))
    pre = parsed.preprocess()
    loader = _LOADERS[parsed.kind]
    splits = loader(parsed, pre, seed)
    splits.spec = parsed.text or str(spec)
    splits.preprocess = pre
    splits.seed = seed
    return splits


# --------------------------------------------------------------------------- building blocks

def stratified_split(y: np.ndarray, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Split indices of ``y`` into ``1 + len(fractions)`` sorted index arrays, per class, seeded.

    Each class contributes ``round(n_c * f)`` samples to each carved part; the rest stays in the
    first part. Deterministic for a given ``y`` and ``seed``.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for k, f in enumerate(fractions, start=1):
            n = int(round(len(idx) * f))
            parts[k].append(idx[start:start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _to_nchw_unit(x: np.ndarray, *, stored: str = "nchw", scale: float | None = None) -> np.ndarray:
    """Images to float32 NCHW in [0, 1] (integers divided by ``scale`` or 255); N x H x W gets C=1."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and stored == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        x = x.astype(np.float32) / np.float32(scale or 255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(y: Any, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise OnnxPruneError(f"{what}: labels must be a 1-D array of class indices, got shape {list(y.shape)}")
    if y.size and (not np.issubdtype(y.dtype, np.integer)):
        if np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise OnnxPruneError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise OnnxPruneError(f"{what}: labels must be non-negative class indices")
    return y.astype(np.int64)


def _assemble(parsed: ParsedSpec, pre: Preprocess, seed: int, train: tuple, val: tuple | None, test: tuple | None,
              *, default_val: float = 0.2, default_test: float = 0.2, num_classes: int | None = None,
              notes: list[str] | None = None) -> DatasetSplits:
    """Carve missing splits from train (stratified), preprocess, and wrap."""
    x, y = train
    notes = list(notes or [])
    if len(x) != len(y):
        raise OnnxPruneError(f"data {parsed.text!r}: {len(x)} inputs but {len(y)} labels")
    fr: list[float] = []
    carved_names = [n for n, s in (("val", val), ("test", test)) if s is None]
    if val is None:
        fr.append(parsed.fraction("val", default_val))
    if test is None:
        fr.append(parsed.fraction("test", default_test))
    if sum(fr) >= 1.0:
        raise OnnxPruneError(f"data {parsed.text!r}: val + test fractions leave no training data")
    if fr:
        parts = stratified_split(y, tuple(fr), seed)
        carved = iter(parts[1:])
        if val is None:
            iv = next(carved)
            val = (x[iv], y[iv])
        if test is None:
            it = next(carved)
            test = (x[it], y[it])
        x, y = x[parts[0]], y[parts[0]]
        notes.append(f"{' and '.join(carved_names)} carved from the training data "
                     f"({', '.join(f'{f:.0%}' for f in fr)}, stratified, seed {seed})")
    out = {}
    for name, (sx, sy) in (("train", (x, y)), ("val", val), ("test", test)):
        out[name] = Split(x=pre.apply(sx), y=np.asarray(sy, dtype=np.int64))
        if len(out[name].x) == 0 and name != "test":
            raise OnnxPruneError(f"data {parsed.text!r}: the {name} split is empty")
    ys = [out[k].y for k in SPLITS if len(out[k].y)]
    n_cls = num_classes or int(max(int(v.max()) for v in ys) + 1)
    return DatasetSplits(train=out["train"], val=out["val"], test=out["test"], num_classes=n_cls,
                         input_shape=tuple(out["train"].x.shape[1:]), notes=notes)


# --------------------------------------------------------------------------- the kinds

def _load_digits(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    if _EMBEDDED_DIGITS.exists():
        with np.load(_EMBEDDED_DIGITS) as z:
            x, y = z["x"], z["y"]
    else:  # pragma: no cover - the embedded copy ships with the package
        try:
            from sklearn.datasets import load_digits  # lazy: scikit-learn ([train] extra)
        except ImportError:
            raise OnnxPruneError("digits: the embedded copy is missing and scikit-learn is not installed") from None
        d = load_digits()
        x, y = d.images.astype(np.uint8), d.target
    x = _to_nchw_unit(x, scale=16.0)
    return _assemble(parsed, pre, seed, (x, _labels(y, "digits")), None, None, num_classes=10,
                     notes=["scikit-learn's handwritten digits (UCI optdigits test set), 8x8 grey, scaled to [0, 1]"])


def _load_npz(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    path = _existing(parsed.arg, parsed, want_dir=False)
    stored = str(parsed.options.get("stored") or "nchw").lower()
    if stored not in ("nchw", "nhwc"):
        raise OnnxPruneError(f"data {parsed.text!r}: stored={stored!r} must be nchw or nhwc")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise OnnxPruneError(f"{path}: not a readable .npz archive ({str(exc).splitlines()[0][:200]})") from None
    if "y" not in arrays:  # unlabeled: x only, or one array per model input
        return npz_unlabeled(parsed, pre, seed, path, arrays)
    if "x" not in arrays:
        raise OnnxPruneError(f"{path}: a labeled npz dataset needs arrays 'x' and 'y' (found {', '.join(sorted(arrays)) or 'none'})")

    def pair(sx: str, sy: str) -> tuple | None:
        if (sx in arrays) != (sy in arrays):
            raise OnnxPruneError(f"{path}: has {sx if sx in arrays else sy} without {sy if sx in arrays else sx}")
        if sx not in arrays:
            return None
        scale = pixel_scale(parsed)
        return (_to_nchw_unit(arrays[sx], stored=stored, scale=1.0 / scale if scale else None),
                _labels(arrays[sy], f"{path}:{sy}"))

    train = pair("x", "y")
    x = train[0]
    if x.ndim == 2 and (pre.resize or pre.layout != "nchw"):
        raise OnnxPruneError(f"{path}: x is N x features; resize/layout apply to images only")
    if x.ndim not in (2, 4):
        raise OnnxPruneError(f"{path}: x must be N x C x H x W, N x H x W or N x features; got shape {list(x.shape)}")
    return _assemble(parsed, pre, seed, train, pair("x_val", "y_val"), pair("x_test", "y_test"))


def _load_cifar10(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    root = _existing(parsed.arg, parsed, want_dir=True)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    present = [n for n in names if (root / n).exists()]
    if not present or not (root / "test_batch").exists():
        raise OnnxPruneError(f"{root}: expected CIFAR-10 python batches data_batch_1..5 and test_batch "
                             "(the 'CIFAR-10 python version' archive, extracted)")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            with open(root / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise OnnxPruneError(f"{root / name}: not a CIFAR-10 pickle batch ({exc})") from None
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        if "data" not in d or "labels" not in d:
            raise OnnxPruneError(f"{root / name}: not a CIFAR-10 batch (needs 'data' and 'labels')")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise OnnxPruneError(f"{root / name}: data must be N x 3072 uint8, got {list(data.shape)}")
        return _to_nchw_unit(data.reshape(-1, 3, 32, 32)), _labels(d["labels"], str(root / name))

    parts = [read(n) for n in present]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    notes = [] if len(present) == 5 else [f"only {len(present)} of 5 training batches found"]
    return _assemble(parsed, pre, seed, train, None, read("test_batch"), default_val=0.1, num_classes=10, notes=notes)


def _load_imagefolder(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    root = _existing(parsed.arg, parsed, want_dir=True)
    try:
        from PIL import Image  # lazy: pillow ([images] extra)
    except ImportError:
        raise OnnxPruneError("imagefolder needs the Python package 'Pillow' (pip install pillow)") from None
    color = str(parsed.options.get("color") or "rgb").lower()
    if color not in ("rgb", "bgr", "grey", "gray", "l"):
        raise OnnxPruneError(f"data {parsed.text!r}: color={color!r} must be rgb, bgr or grey")
    mode = "RGB" if color in ("rgb", "bgr") else "L"
    scale = pixel_scale(parsed)

    def classes_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    # Either class folders directly under PATH, or train/ [val/] [test/] each holding class folders.
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" in split_dirs:
        class_names = [p.name for p in classes_in(split_dirs["train"])]
    else:
        split_dirs = {"train": root}
        class_names = [p.name for p in classes_in(root)]
    if not class_names:
        raise OnnxPruneError(f"{root}: no class subfolders (expected PATH/CLASS/image.png or PATH/train/CLASS/...)")
    index = {c: i for i, c in enumerate(class_names)}

    def read(d: Path) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, sizes = [], [], set()
        for cdir in classes_in(d):
            if cdir.name not in index:
                raise OnnxPruneError(f"{cdir}: class {cdir.name!r} is not among the training classes")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() not in _IMAGE_EXTS:
                    continue
                try:
                    with Image.open(f) as im:
                        im = im.convert(mode)
                        if pre.resize:
                            im = im.resize((pre.resize[1], pre.resize[0]), Image.BILINEAR)
                        a = np.asarray(im, dtype=np.uint8)
                except OSError as exc:
                    raise OnnxPruneError(f"{f}: cannot read image ({exc})") from None
                sizes.add(a.shape[:2])
                xs.append(a[:, :, ::-1] if color == "bgr" else a if a.ndim == 3 else a[:, :, None])
                ys.append(index[cdir.name])
        if not xs:
            raise OnnxPruneError(f"{d}: no images found (extensions {', '.join(sorted(_IMAGE_EXTS))})")
        if len(sizes) > 1:
            raise OnnxPruneError(f"{d}: images have different sizes {sorted(sizes)[:3]}...; add resize=HxW to the spec")
        return _to_nchw_unit(np.stack(xs), stored="nhwc", scale=1.0 / scale if scale else None), np.asarray(ys, dtype=np.int64)

    got = {k: read(v) for k, v in split_dirs.items()}
    return _assemble(parsed, pre, seed, got["train"], got.get("val"), got.get("test"), num_classes=len(class_names),
                     notes=[f"classes: {', '.join(class_names[:20])}{' ...' if len(class_names) > 20 else ''}"])


def _load_python(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    """``python:module:function`` (or ``python:path/to/file.py:function``).

    The function is called with the spec's non-preprocessing options as string keyword arguments
    (plus ``seed`` if it accepts it) and returns one of:

    * unlabeled data: one array (N x ...), or a dict of arrays named like the model inputs (see
      :mod:`onnxprune.datasets.unlabeled`);
    * a :class:`DatasetSplits` (used as is; the spec's preprocessing is not applied again);
    * a mapping with keys ``train``, ``val`` [, ``test``], each an ``(x, y)`` pair of arrays (images
      NCHW; integer pixels are divided by 255) or an iterable of ``(x, y)`` batches such as a
      ``torch.utils.data.DataLoader`` (batches are preprocessed as they are read), and optionally
      ``num_classes``. A missing ``val``/``test`` is carved from array data; loaders must supply
      ``val`` themselves.
    """
    modname, _, fname = parsed.arg.rpartition(":")
    fn = import_callable(modname, fname, f"data {parsed.text!r}", namespace="onnxprune_user_data")
    kwargs = {k: v for k, v in parsed.options.items() if k not in ("resize", "size", "normalize", "mean", "std", "layout", "val", "test")}
    try:
        params = inspect.signature(fn).parameters
        if "seed" in params and "seed" not in kwargs:
            kwargs["seed"] = seed
    except (TypeError, ValueError):
        pass
    try:
        out = fn(**kwargs)
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: report it as one line
        raise OnnxPruneError(f"data {parsed.text!r}: {fname}() raised {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    if isinstance(out, DatasetSplits):
        return out
    unlabeled = python_unlabeled(parsed, pre, seed, out, fname)
    if unlabeled is not None:
        return unlabeled
    if not isinstance(out, Mapping) or "train" not in out:
        raise OnnxPruneError(f"data {parsed.text!r}: {fname}() must return unlabeled arrays (one array, or a dict of "
                             "arrays named like the model inputs), a DatasetSplits or a dict with 'train', "
                             f"'val' [, 'test'] (each (x, y) arrays or a DataLoader); got {type(out).__name__}")
    loaders = {k: v for k, v in out.items() if k in SPLITS and not _is_pair(v)}
    if not loaders:
        pairs = {k: (_to_nchw_unit(out[k][0]), _labels(out[k][1], f"{fname}()[{k!r}]")) for k in SPLITS if k in out}
        return _assemble(parsed, pre, seed, pairs["train"], pairs.get("val"), pairs.get("test"),
                         num_classes=out.get("num_classes"))
    if "val" not in out:
        raise OnnxPruneError(f"data {parsed.text!r}: with DataLoaders, {fname}() must return a 'val' loader too "
                             "(checkpoints are selected on validation data)")

    def transform(x: np.ndarray) -> np.ndarray:
        return pre.apply(_to_nchw_unit(x))

    splits: dict[str, Split] = {}
    for k in SPLITS:
        v = out.get(k)
        if v is None:
            splits[k] = Split(x=np.zeros((0,), np.float32), y=np.zeros((0,), np.int64))
        elif _is_pair(v):
            splits[k] = Split(x=pre.apply(_to_nchw_unit(v[0])), y=_labels(v[1], f"{fname}()[{k!r}]"))
        else:
            splits[k] = Split(loader=v, transform=transform)
    first = next(iter(splits["val"].batches()), None)
    if first is None:
        raise OnnxPruneError(f"data {parsed.text!r}: the val loader yields no batches")
    num_classes = out.get("num_classes")
    if num_classes is None:
        raise OnnxPruneError(f"data {parsed.text!r}: with DataLoaders, {fname}() must also return 'num_classes'")
    return DatasetSplits(train=splits["train"], val=splits["val"], test=splits["test"], num_classes=int(num_classes),
                         input_shape=tuple(first[0].shape[1:]), notes=["batches come from the user's DataLoaders"])


_LOADERS: dict[str, Callable[[ParsedSpec, Preprocess, int], DatasetSplits]] = {
    "digits": _load_digits, "npz": _load_npz, "cifar10": _load_cifar10,
    "imagefolder": _load_imagefolder, "python": _load_python,
}


def _load_images(parsed: ParsedSpec, pre: Preprocess, seed: int) -> DatasetSplits:
    return load_images(parsed, pre, seed)


_LOADERS["images"] = _load_images
_LOADERS["text"] = load_text
