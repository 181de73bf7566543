"""Batch augmentation for function matching (Beyer et al. 2022, "a good teacher is patient and consistent").

When distilling without labels, teacher and student see the *same* augmented batch and the teacher
labels whatever the student sees: every step shows new inputs, so a few hundred samples can feed
thousands of steps without the student memorising them, and the target is right by construction
(even for orientation-sensitive tasks, as long as flips are not asked for). Torch ops on the batch,
no torchvision; the randomness comes from one seeded generator.

Ops (``--augment LIST``, comma-separated) and the inputs they touch:

* ``crop``: random resized crop (area 35-100 %, aspect 3/4-4/3), resampled to the input size
  (4-D float inputs, N x C x H x W);
* ``hflip`` / ``vflip``: random horizontal / vertical flips (4-D float inputs; never in ``auto``);
* ``jitter``: per-sample brightness and contrast (and saturation with 3 channels), scaled to the
  batch's own spread so it fits any input normalisation (4-D float inputs);
* ``mixup``: each sample blended with another of the batch (weight of the own sample in [0.5, 1]),
  the same pairs and weights for every input (float inputs only);
* ``noise``: gaussian noise at 10 % of the input's spread (float inputs).

``auto``: ``crop,jitter,mixup`` when every input is a 4-D float (images), ``mixup,noise`` for other
float inputs, none when any input is an integer (token ids cannot be blended).
"""
from __future__ import annotations

import math
from typing import Sequence

from ..core.errors import OnnxPruneError
import numpy as np

OPS = ("crop", "hflip", "vflip", "jitter", "mixup", "noise")
_IMAGE_OPS = {"crop", "hflip", "vflip", "jitter"}


def resolve_augment(spec: str, inputs: Sequence[tuple[bool, int]]) -> tuple[str, ...]:
    """The ops ``spec`` (``auto``, ``none`` or a LIST) means for inputs given as ``(is_float, ndim)``;
    one clear error for an op that cannot apply."""
    spec = (spec or "auto").strip().lower()
    if spec == "none":
        return ()
    all_float = all(f for f, _ in inputs)
    if spec == "auto":
        if not inputs or not all_float:
            return ()
        return ("crop", "jitter", "mixup") if all(nd == 4 for _, nd in inputs) else ("mixup", "noise")
    ops = tuple(dict.fromkeys(o.strip() for o in spec.split(",") if o.strip()))
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise OnnxPruneError(f"--augment {spec!r}: unknown op(s) {', '.join(bad) or '(none given)'}; expected auto, "
                             f"none or a comma-separated list of {', '.join(OPS)}")
    if any(o in _IMAGE_OPS for o in ops) and not any(f and nd == 4 for f, nd in inputs):
        raise OnnxPruneError(f"--augment {spec}: {', '.join(o for o in ops if o in _IMAGE_OPS)} need a 4-D float "
                             "image input (N x C x H x W); this model has none")
    if "mixup" in ops and not all_float:
        raise OnnxPruneError(f"--augment {spec}: mixup blends samples and this model has integer inputs "
                             "(e.g. token ids); leave mixup out")
    if "noise" in ops and not any(f for f, _ in inputs):
        raise OnnxPruneError(f"--augment {spec}: noise needs a float input")
    return ops


class BatchAugment:
    """``aug(xs)`` -> the augmented list of input tensors (same shapes and dtypes), from ``seed``."""

    def __init__(self, ops: Sequence[str], seed: int = 0, *, min_area: float = 0.6) -> None:
        import torch  # lazy: torch ([train] extra)

        self.ops = tuple(ops)
        self.min_area = float(min_area)
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def _u(self, n: int, lo: float, hi: float):
        import torch  # lazy: torch ([train] extra)

        return lo + (hi - lo) * torch.rand(n, generator=self.gen)

    def __call__(self, xs: list) -> list:
        if not self.ops:
            return xs
        xs = list(xs)
        n = int(xs[0].shape[0])
        image = [i for i, x in enumerate(xs) if x.is_floating_point() and x.dim() == 4]
        floats = [i for i, x in enumerate(xs) if x.is_floating_point()]
        geo = {o for o in ("crop", "hflip", "vflip") if o in self.ops}
        if geo and image:
            theta = self._geometry(n, geo)
            for i in image:
                xs[i] = _warp(xs[i], theta)
        if "jitter" in self.ops:
            for i in image:
                xs[i] = self._jitter(xs[i])
        if "mixup" in self.ops and n > 1:
            import torch  # lazy: torch ([train] extra)

            perm = torch.randperm(n, generator=self.gen)
            lam = 0.5 + 0.5 * torch.rand(n, generator=self.gen)
            for i in floats:
                w = lam.to(xs[i].device, xs[i].dtype).reshape(-1, *([1] * (xs[i].dim() - 1)))
                xs[i] = w * xs[i] + (1 - w) * xs[i][perm.to(xs[i].device)]
        if "noise" in self.ops:
            import torch  # lazy: torch ([train] extra)

            for i in floats:
                spread = xs[i].detach().float().std() if xs[i].numel() > 1 else xs[i].new_tensor(1.0)
                noise = torch.randn(tuple(xs[i].shape), generator=self.gen).to(xs[i].device, xs[i].dtype)
                xs[i] = xs[i] + 0.1 * spread.to(xs[i].dtype) * noise
        return xs

    def _geometry(self, n: int, ops: set):
        """Per-sample affine maps (N x 2 x 3, normalised coordinates) for crop and flips."""
        import torch  # lazy: torch ([train] extra)

        sx, sy = torch.ones(n), torch.ones(n)
        tx, ty = torch.zeros(n), torch.zeros(n)
        if "crop" in ops:
            area = self._u(n, self.min_area, 1.0)
            log_r = self._u(n, math.log(3 / 4), math.log(4 / 3))
            ratio = torch.exp(log_r)
            sx = torch.sqrt(area * ratio).clamp(max=1.0)
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (self._u(n, -1.0, 1.0)) * (1 - sx)
            ty = (self._u(n, -1.0, 1.0)) * (1 - sy)
        fx = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if "hflip" in ops else torch.ones(n)
        fy = torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0) if "vflip" in ops else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx * fx, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy * fy, ty
        return theta

    def _jitter(self, x):
        """Contrast about each sample's mean, brightness in units of the batch's spread, saturation."""
        c = x.shape[1]
        n = x.shape[0]
        shape = (n, 1, 1, 1)
        spread = x.detach().float().std().to(x.dtype) if x.numel() > 1 else x.new_tensor(1.0)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = self._u(n, 0.6, 1.4).to(x.device, x.dtype).reshape(shape)
        bright = self._u(n, -0.2, 0.2).to(x.device, x.dtype).reshape(shape)
        x = (x - mean) * contrast + mean + bright * spread
        if c == 3:
            gray = x.mean(dim=1, keepdim=True)
            sat = self._u(n, 0.6, 1.4).to(x.device, x.dtype).reshape(shape)
            x = gray + (x - gray) * sat
        return x


def _warp(x, theta):
    """Resample ``x`` (N x C x H x W) through the affine maps ``theta`` (bilinear, edges reflected)."""
    import torch  # lazy: torch ([train] extra)
    import torch.nn.functional as F  # lazy: torch ([train] extra)

    theta = theta.to(x.device, x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.to(grid.dtype), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(x.dtype)


def input_signature(xs: Sequence) -> list[tuple[bool, int]]:
    """``(is_float, ndim)`` per input tensor or array, as :func:`resolve_augment` takes them."""

    out = []
    for x in xs:
        if hasattr(x, "is_floating_point"):
            out.append((bool(x.is_floating_point()), int(x.dim())))
        else:
            a = np.asarray(x)
            out.append((bool(np.issubdtype(a.dtype, np.floating)), int(a.ndim)))
    return out
