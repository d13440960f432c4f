"""Live augmentation on photos decoded once into memory (`ImageBank`, through `sdk.prepare`, the device's
decoding). `Augmenter.draw` samples one recipe per photo as numbers (`Views`): random resized crop, flip,
colour jitter, one TrivialAugment op; `render(views, size)` turns them into pixels at any resolution with a
single affine `grid_sample`, so a 260 px teacher and a 224 px student see the same crop. Every draw comes
from a generator seeded by (seed, epoch, step): a resumed run sees the same views.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sdk import prepare

# TrivialAugment-style operations: each photo gets one, with a uniform random strength.
OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",  # geometric
       "brightness", "contrast", "color", "sharpness", "posterize", "solarize", "autocontrast")  # photometric
POLICIES = ("none", "basic", "trivial")


class ImageBank:
    """All photos of a dataset as one (N, S, S, 3) uint8 tensor decoded once (threads) at `size`; a bank
    over `max_mb` is refused with the size it would need, rather than swapping the machine."""

    def __init__(self, samples, size: int, max_mb: int = 6144, threads: int = 0):
        need = len(samples) * size * size * 3 / 2 ** 20
        if need > max_mb:
            raise MemoryError(f"{len(samples)} photos at {size} px need {need:.0f} MB of memory, over the "
                              f"{max_mb} MB bound (--memory-mb); lower --decode-scale or raise the bound")
        self.size = size
        self.images = torch.empty((len(samples), size, size, 3), dtype=torch.uint8)
        with ThreadPoolExecutor(max(threads or torch.get_num_threads(), 1)) as pool:
            for i, img in enumerate(pool.map(lambda s: prepare(s.source, size), samples)):
                self.images[i].numpy()[:] = img

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC photos -> float 0..255 NCHW."""
        return self.images[idx].permute(0, 3, 1, 2).float()


@dataclass
class Views:
    """One augmentation recipe per photo of a batch (all tensors have the batch as first dim)."""

    theta: torch.Tensor  # (B, 2, 3) affine map from output to input coordinates (grid_sample convention)
    jitter: torch.Tensor  # (B, 3) brightness, contrast, saturation factors
    op: torch.Tensor  # (B,) index into OPS (photometric ones applied in `render`)
    strength: torch.Tensor  # (B,) in [0, 1]


@dataclass(frozen=True)
class Augmenter:
    policy: str = "basic"  # none: the device's exact input; basic: crop + flip + jitter; trivial: + one op
    crop_scale: float = 0.35  # smallest crop area (fraction of the photo) of the random resized crop
    jitter: float = 0.3  # brightness / contrast / saturation factors drawn from [1 - j, 1 + j]

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"augmentation policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")

    def draw(self, n: int, g: torch.Generator) -> Views:
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        if self.policy == "none":
            return Views(torch.eye(2, 3).expand(n, 2, 3).clone(), torch.ones(n, 3), torch.zeros(n, dtype=torch.long),
                         torch.zeros(n))
        # random resized crop: area in [crop_scale, 1], aspect ratio in [3/4, 4/3] (log-uniform)
        area = self.crop_scale + (1 - self.crop_scale) * u(n)
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(n))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * u(n) - 1)  # centre in [-1, 1] coordinates, crop inside the photo
        cy = (1 - h) * (2 * u(n) - 1)
        flip = torch.where(u(n) < 0.5, -1.0, 1.0)
        a = torch.zeros(n, 2, 2)
        a[:, 0, 0], a[:, 1, 1] = w * flip, h
        jitter = 1 + self.jitter * (2 * u(n, 3) - 1)
        op = torch.zeros(n, dtype=torch.long)
        strength = u(n)
        if self.policy == "trivial":
            op = torch.randint(0, len(OPS), (n,), generator=g)
            sign = torch.where(u(n) < 0.5, -1.0, 1.0)
            geo = torch.eye(2).expand(n, 2, 2).clone()
            shift = torch.zeros(n, 2)
            ang = sign * strength * math.radians(30)
            rot = op == OPS.index("rotate")
            geo[rot] = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1),
                                    torch.stack([ang.sin(), ang.cos()], -1)], -2)[rot]
            mag = sign * strength * 0.3  # shear and translation
            for name, (i, j) in {"shear_x": (0, 1), "shear_y": (1, 0)}.items():
                geo[op == OPS.index(name), i, j] = mag[op == OPS.index(name)]
            for name, i in {"translate_x": 0, "translate_y": 1}.items():
                shift[op == OPS.index(name), i] = mag[op == OPS.index(name)]
            a = a @ geo
            cx, cy = cx + shift[:, 0], cy + shift[:, 1]
        theta = torch.cat([a, torch.stack([cx, cy], -1)[:, :, None]], -1)
        return Views(theta, jitter, op, strength)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    m = _gray(x).mean((2, 3), keepdim=True)
    return (x - m) * f + m


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    g = _gray(x)
    return g + (x - g) * f


def _sharpness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    blur = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]).expand(3, 1, 3, 3) / 13
    return torch.lerp(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur, groups=3), x, f)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - lo) * 255 / (hi - lo).clamp_min(1)


def render(images: torch.Tensor, views: Views, size: int) -> torch.Tensor:
    """float 0..255 NCHW photos + recipes -> augmented float 0..255 NCHW at `size` x `size`."""
    n = images.shape[0]
    grid = F.affine_grid(views.theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    b, c, s = (views.jitter[:, i].view(n, 1, 1, 1) for i in range(3))
    x = _saturation(_contrast(x * b, c), s).clamp(0, 255)
    k = views.strength.view(n, 1, 1, 1)
    # strength in [0, 1] -> factor in [0.1, 1.9] (PIL ImageEnhance convention: 1 = unchanged)
    factor = 0.1 + 1.8 * k
    step = 2 ** (8 - (8 - (k * 4).floor()).clamp(4, 8))  # posterize: 4..8 bits kept
    ops = {"brightness": lambda v, r: v * factor[r], "contrast": lambda v, r: _contrast(v, factor[r]),
           "color": lambda v, r: _saturation(v, factor[r]), "sharpness": lambda v, r: _sharpness(v, factor[r]),
           "posterize": lambda v, r: torch.floor(v / step[r]) * step[r],
           "solarize": lambda v, r: torch.where(v >= 255 * (1 - k[r]), 255 - v, v),
           "autocontrast": lambda v, r: _autocontrast(v)}
    for name, fn in ops.items():
        rows = views.op == OPS.index(name)
        if bool(rows.any()):
            x[rows] = fn(x[rows], rows)
    return x.clamp(0, 255)


@dataclass(frozen=True)
class Mix:
    """A batch's mixing: partner permutation, weight of the photo itself, CutMix box (fractions) or None."""

    pair: torch.Tensor
    lam: float
    box: tuple[float, float, float, float] | None = None


def draw_mix(n: int, mixup: float, cutmix: float, g: torch.Generator) -> Mix | None:
    """Mixup (Beta(a, a) blend) or CutMix (a box of the partner pasted); with both on, one at random."""
    kinds = [k for k, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    if not kinds:
        return None
    kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=g))]
    alpha = mixup if kind == "mixup" else cutmix
    # numpy draws the Beta weight, seeded from the step generator (torch.distributions takes no generator)
    lam = float(np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=g))).beta(alpha, alpha))
    pair = torch.randperm(n, generator=g)
    if kind == "mixup":
        return Mix(pair, lam)
    side = math.sqrt(1 - lam)
    cx, cy = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g))
    box = (max(cx - side / 2, 0.0), max(cy - side / 2, 0.0), min(cx + side / 2, 1.0), min(cy + side / 2, 1.0))
    area = (box[2] - box[0]) * (box[3] - box[1])
    return Mix(pair, 1.0 - area, box)  # the weight follows the box actually pasted (clipped at the border)


def mix(x: torch.Tensor, m: Mix | None) -> torch.Tensor:
    """Apply a batch's mixing to images of any resolution (NCHW)."""
    if m is None:
        return x
    if m.box is None:
        return m.lam * x + (1 - m.lam) * x[m.pair]
    h, w = x.shape[-2:]
    l, t, r, b = round(m.box[0] * w), round(m.box[1] * h), round(m.box[2] * w), round(m.box[3] * h)
    out = x.clone()
    out[..., t:b, l:r] = x[m.pair][..., t:b, l:r]
    return out


@dataclass
class Batch:
    """One training step's photos, as the losses and a teacher need them."""

    idx: torch.Tensor  # rows of the training set
    mix: Mix | None  # mixup / CutMix of the inputs (losses are mixed the same way)
    views: torch.Tensor | None = None  # cached path: the cached view of each photo
    render: Callable[[int], torch.Tensor] | None = None  # live path: the (mixed) normalized input at a size


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A step's draws depend only on (seed, epoch, step): a resumed run sees the same views and mixes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step)
