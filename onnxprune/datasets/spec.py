"""Dataset specs and preprocessing options: parsing only (numpy, no torch).

A spec is one string, usable on the CLI (``--data``) and in recipes::

    KIND[:ARG][?KEY=VALUE&KEY=VALUE...]

    digits                                  the embedded default (scikit-learn's handwritten digits)
    digits?resize=16x16                     ... upsampled to 16x16
    npz:data/mnist.npz?normalize=0.1307,0.3081
    imagefolder:photos/?resize=64x64&color=rgb
    cifar10:~/data/cifar-10-batches-py?normalize=0.49/0.48/0.45,0.25/0.24/0.26
    python:mypkg.data:make_splits?root=/data   (other keys are passed to the function as strings)
    npz:calib.npz                           unlabeled: only ``x``, or one array per model input name
    images:photos/?size=224x224&mean=0.485/0.456/0.406&std=0.229/0.224/0.225&color=bgr
                                            unlabeled: every image file under the folder (recursive)
    text:sentences.txt?tokenizer=model/tokenizer.json&max_length=64
                                            unlabeled: one sentence per line, tokenized into int64
                                            input_ids / attention_mask / token_type_ids

Unlabeled data (no ``y``) serves distillation, calibration and fidelity (``eval --reference``); the
val/test splits are carved from it at random (seeded), as for labeled data without its own splits.

Preprocessing keys (every kind):

``resize=HxW`` (or ``size=HxW``)
    bilinear resize (half-pixel centres, as ``torch.nn.functional.interpolate``) of every image.
``normalize=MEAN,STD``
    ``(x - mean) / std`` after scaling to [0, 1]; MEAN and STD are one number or one per channel
    separated by ``/`` (``0.49/0.48/0.45,0.25/0.24/0.26``). ``mean=`` and ``std=`` also work.
``layout=nchw|nhwc``
    the layout the *model* expects; data are handled as NCHW and transposed last for ``nhwc``.

Split keys: ``val=FRACTION`` / ``test=FRACTION`` (carved, stratified and seeded, from the training
data when the source has no such split; defaults 0.2 / 0.2, cifar10's validation 0.1).
``split=train|val|test|all`` chooses the split read where one is read (``prune --calibrate``: train
by default; see :func:`selected_split`).
Kind-specific keys: ``color=rgb|bgr|grey`` (images, imagefolder: channel order fed to the model),
``scale=FACTOR`` (images, imagefolder, npz: integer pixels are multiplied by it; default 1/255, so
``scale=1`` keeps 0..255), ``stored=nchw|nhwc`` (npz: how ``x`` is stored), ``tokenizer=PATH``,
``max_length=N``, ``padding=max_length|longest`` (text: see :mod:`onnxprune.datasets.text`).

In a recipe the same can be a mapping: ``{spec: "cifar10:/data", resize: [32, 32],
normalize: {mean: [...], std: [...]}, layout: nchw}``; keys given there override the string's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..core.errors import OnnxPruneError

KINDS = ("digits", "npz", "imagefolder", "images", "cifar10", "python", "text")
PREPROCESS_KEYS = ("resize", "size", "normalize", "mean", "std", "layout")
SPLIT_KEYS = ("val", "test")
#: ``split=train|val|test|all``: which split a consumer of unlabeled inputs reads (``prune --calibrate``)
SELECT_KEY = "split"
SELECTABLE = ("train", "val", "test", "all")
KIND_KEYS = {"imagefolder": ("color", "scale"), "images": ("color", "scale"), "npz": ("stored", "scale"),
             "text": ("tokenizer", "max_length", "padding")}


@dataclass(frozen=True)
class Preprocess:
    """Declared preprocessing, applied to NCHW float32 arrays already scaled to [0, 1]."""

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if self.layout not in ("nchw", "nhwc"):
            raise OnnxPruneError(f"bad layout {self.layout!r}: expected nchw or nhwc")
        if (self.mean is None) != (self.std is None):
            raise OnnxPruneError("normalize needs both a mean and a std")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise OnnxPruneError(f"normalize: std must be positive, got {list(self.std)}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) <= 0):
            raise OnnxPruneError(f"bad resize {self.resize!r}: expected HxW with positive sizes")

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> "Preprocess":
        size = opts.get("resize") if opts.get("resize") not in (None, "") else opts.get("size")
        resize = _parse_resize(size) if size not in (None, "") else None
        mean = std = None
        if opts.get("normalize") not in (None, ""):
            mean, std = _parse_normalize(opts["normalize"])
        if opts.get("mean") not in (None, ""):
            mean = _floats(opts["mean"], "mean")
        if opts.get("std") not in (None, ""):
            std = _floats(opts["std"], "std")
        layout = str(opts.get("layout") or "nchw").lower()
        return cls(resize=resize, mean=mean, std=std, layout=layout)

    def to_dict(self) -> dict[str, Any]:
        return {"resize": list(self.resize) if self.resize else None,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None,
                "layout": self.layout}

    def apply(self, x: np.ndarray) -> np.ndarray:
        """NCHW (or N x features) float array -> what the model is fed."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            if self.resize is not None or self.layout != "nchw":
                raise OnnxPruneError(f"resize/layout need image data (N x C x H x W); got shape {list(x.shape)}")
            if self.mean is not None:
                mean, std = (np.asarray(v, dtype=np.float32) for v in (self.mean, self.std))
                if mean.size not in (1, x.shape[-1]) or std.size not in (1, x.shape[-1]):
                    raise OnnxPruneError(f"normalize: {mean.size} mean / {std.size} std values for {x.shape[-1]} features")
                x = (x - mean) / std
            return np.ascontiguousarray(x, dtype=np.float32)
        if self.resize is not None and tuple(x.shape[2:]) != tuple(self.resize):
            x = resize_bilinear(x, self.resize)
        if self.mean is not None:
            c = x.shape[1]
            mean, std = (np.asarray(v, dtype=np.float32) for v in (self.mean, self.std))
            for name, v in (("mean", mean), ("std", std)):
                if v.size not in (1, c):
                    raise OnnxPruneError(f"normalize: {v.size} {name} values for {c} channels")
            x = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        if self.layout == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def sample_shape(self, nchw_sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape after preprocessing, from the per-sample NCHW shape (C, H, W)."""
        s = tuple(nchw_sample_shape)
        if len(s) != 3:
            return s
        c, h, w = s
        if self.resize:
            h, w = self.resize
        return (h, w, c) if self.layout == "nhwc" else (c, h, w)


@dataclass
class ParsedSpec:
    """``KIND[:ARG][?OPTIONS]`` split into its parts (option values are kept as given)."""

    kind: str
    arg: str | None
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    def preprocess(self) -> Preprocess:
        return Preprocess.from_options(self.options)

    def fraction(self, key: str, default: float) -> float:
        v = self.options.get(key)
        if v in (None, ""):
            return default
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise OnnxPruneError(f"data spec {self.text!r}: {key}={v!r} is not a number") from None
        if not 0.0 <= f < 1.0:
            raise OnnxPruneError(f"data spec {self.text!r}: {key}={v!r} must be a fraction in [0, 1)")
        return f


def parse_spec(spec: str | Mapping[str, Any]) -> ParsedSpec:
    """Parse a spec string (or a recipe mapping with a ``spec`` key) into kind, argument and options."""
    if isinstance(spec, Mapping):
        if "spec" not in spec:
            raise OnnxPruneError(f"data mapping needs a 'spec' key (e.g. spec: digits), got keys {sorted(spec)}")
        parsed = parse_spec(str(spec["spec"]))
        extra = {k: v for k, v in spec.items() if k != "spec"}
        if isinstance(extra.get("normalize"), Mapping):
            norm = extra.pop("normalize")
            extra["mean"], extra["std"] = norm.get("mean"), norm.get("std")
            parsed.options.pop("normalize", None)
        parsed.options.update(extra)
        _check_keys(parsed)
        return parsed
    if not isinstance(spec, str) or not spec.strip():
        raise OnnxPruneError("empty data spec: expected e.g. digits, npz:PATH, imagefolder:PATH, images:DIR, cifar10:PATH "
                             "or python:module:function")
    text = spec.strip()
    body, _, query = text.partition("?")
    kind, sep, arg = body.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise OnnxPruneError(f"unknown data spec {text!r}: kind must be one of {', '.join(KINDS)} "
                             "(e.g. digits, npz:PATH, images:DIR, cifar10:PATH)")
    options: dict[str, Any] = {}
    if query:
        for part in query.split("&"):
            if not part:
                continue
            k, eq, v = part.partition("=")
            if not eq or not k:
                raise OnnxPruneError(f"data spec {text!r}: option {part!r} is not KEY=VALUE")
            options[k.strip().lower()] = v.strip()
    parsed = ParsedSpec(kind=kind, arg=arg.strip() if sep else None, options=options, text=text)
    if kind == "digits" and parsed.arg:
        raise OnnxPruneError(f"data spec {text!r}: digits takes no argument (options go after '?', e.g. digits?resize=16x16)")
    if kind != "digits" and not parsed.arg:
        what = "module:function" if kind == "python" else "PATH"
        raise OnnxPruneError(f"data spec {text!r}: {kind} needs an argument, e.g. {kind}:{what}")
    if kind == "python" and parsed.arg.count(":") < 1:
        raise OnnxPruneError(f"data spec {text!r}: expected python:module:function")
    _check_keys(parsed)
    return parsed


def selected_split(spec: Any, default: str) -> tuple[Any, str]:
    """``(spec without its split= option, the split it selects or default)``; strings and recipe
    mappings (other specs, e.g. loaded data, come back unchanged with ``default``)."""
    if isinstance(spec, Mapping):
        rest = {k: v for k, v in spec.items() if k != SELECT_KEY}
        inner, split = selected_split(rest.get("spec", ""), spec.get(SELECT_KEY) or default)
        return ({**rest, "spec": inner} if "spec" in rest else rest), split
    if not isinstance(spec, str) or "?" not in spec:
        return spec, default
    body, _, query = spec.partition("?")
    parts = [p for p in query.split("&") if p]
    picked = [p.partition("=")[2].strip().lower() for p in parts if p.partition("=")[0].strip().lower() == SELECT_KEY]
    rest = [p for p in parts if p.partition("=")[0].strip().lower() != SELECT_KEY]
    split = picked[-1] if picked else default
    if split not in SELECTABLE:
        raise OnnxPruneError(f"data spec {spec!r}: split={split!r} must be one of {', '.join(SELECTABLE)}")
    return body + ("?" + "&".join(rest) if rest else ""), split


def _check_keys(parsed: ParsedSpec) -> None:
    if parsed.kind == "python":  # unknown keys are the function's keyword arguments
        return
    allowed = set(PREPROCESS_KEYS) | set(SPLIT_KEYS) | {SELECT_KEY} | set(KIND_KEYS.get(parsed.kind, ()))
    bad = sorted(set(parsed.options) - allowed)
    if bad:
        raise OnnxPruneError(f"data spec {parsed.text or parsed.kind!r}: unknown option(s) {', '.join(bad)} "
                             f"(allowed: {', '.join(sorted(allowed))})")


def _parse_resize(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        parts = list(v)
    elif isinstance(v, int):
        parts = [v, v]
    else:
        parts = re.split(r"[x,]", str(v).strip().lower())
        if len(parts) == 1:
            parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"bad resize {v!r}: expected HxW such as 32x32") from None
    if h <= 0 or w <= 0:
        raise OnnxPruneError(f"bad resize {v!r}: sizes must be positive")
    return h, w


def _floats(v: Any, what: str) -> tuple[float, ...]:
    if isinstance(v, (int, float)):
        return (float(v),)
    parts = list(v) if isinstance(v, (list, tuple)) else re.split(r"[/:;]", str(v).strip())
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"bad {what} {v!r}: expected a number or numbers separated by '/'") from None
    if not out:
        raise OnnxPruneError(f"bad {what} {v!r}: empty")
    return out


def _parse_normalize(v: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _floats(v[0], "normalize mean"), _floats(v[1], "normalize std")
    parts = str(v).split(",")
    if len(parts) != 2:
        raise OnnxPruneError(f"bad normalize {v!r}: expected MEAN,STD such as 0.5,0.25 or 0.49/0.48/0.45,0.25/0.24/0.26")
    return _floats(parts[0], "normalize mean"), _floats(parts[1], "normalize std")


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an NCHW array (half-pixel centres, no antialiasing: torch's default)."""
    h_out, w_out = size
    rh = _interp_matrix(x.shape[2], h_out)
    rw = _interp_matrix(x.shape[3], w_out)
    return np.einsum("oh,nchw,pw->ncop", rh, x.astype(np.float32), rw, optimize=True).astype(np.float32)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m
