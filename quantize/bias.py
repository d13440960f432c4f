"""Bias correction of int8 weight rounding (Nagel et al., ICCV 2019, section 4.2), measured on the calibration photos.

Rounding a layer's weights to int8 shifts the mean of each output channel by E[(W - Q(W)) x], and the shift
compounds through the network (EfficientNet-Lite's nine-weight depthwise filters make it large). The shift is
measured once per channel on the fp32 model and added back, into the running mean of the BatchNorm after a
backbone conv (folded away by every backend) or into a bias, of a *copy*: fp32 stays the reference.
Correcting activation-quantization shifts the same way diverged, and is not done.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .sim import OBSERVER_EPS, Family, bn_after, feed, fold_factors, fq_weight, layers_of


@dataclass
class BiasCorrection:
    """What was corrected, for the report and manifests."""

    layers: int = 0
    n_images: int = 0
    source: str = ""
    max_shift: float = 0.0  # largest |E[(W - Q(W)) x]| over all channels, before correction
    skipped: list[str] = field(default_factory=list)  # quantized layers with no bias / BatchNorm to take it

    def to_dict(self) -> dict[str, Any]:
        return {"method": "empirical weight-rounding bias correction (Nagel et al. 2019), per output channel",
                "layers": self.layers, "n_images": self.n_images, "images": self.source,
                "max_shift": self.max_shift, "skipped": self.skipped}


def rounding_error_output(mod: nn.Module, x: torch.Tensor, q: torch.Tensor | None = None,
                          fold: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """(W - Q(W)) applied to `x` with the layer's own geometry (padding, stride, groups), no bias;
    Q(W) is round-to-nearest (`fq_weight(W, fold, eps)`) unless the rounded weights `q` are given."""
    dw = mod.weight - (fq_weight(mod.weight, fold, eps) if q is None else q)
    if isinstance(mod, nn.Linear):
        return F.linear(x, dw)
    return mod._conv_forward(x, dw, None)  # train.backbones.SameConv keeps its TF "same" padding here


@torch.inference_mode()
def rounding_shifts(model: nn.Module, images: np.ndarray, fams: list[Family], batch: int = 25,
                    targets: dict[str, torch.Tensor] | None = None,
                    weight_eps: float = OBSERVER_EPS) -> dict[str, torch.Tensor]:
    """Per quantized Conv2d / Linear: the mean output shift E[(W - Q(W)) x] per output channel.
    `targets`: per layer, rounded weights to measure against instead of round-to-nearest (research studies);
    `weight_eps`: the observers' scale clamp (0 for Core ML's rounding)."""
    targets = targets or {}
    folds = fold_factors(model)
    layers = layers_of(model, fams)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, layer in layers.items():
        def hook(mod, inp, out, name=name):
            e = rounding_error_output(mod, inp[0], targets.get(name), folds.get(name), weight_eps)
            e = e.movedim(1, -1) if e.dim() == 4 else e  # channels last
            e = e.reshape(-1, e.shape[-1]).double()
            sums[name] = sums.get(name, 0) + e.sum(0)
            counts[name] = counts.get(name, 0) + e.shape[0]
        hooks.append(layer.register_forward_hook(hook))
    feed(model, images, hooks, batch)
    return {n: (sums[n] / counts[n]).float() for n in layers if n in sums}


def apply_shifts(model: nn.Module, shifts: dict[str, torch.Tensor], fams: list[Family]) -> BiasCorrection:
    """Fold the measured shifts of the layers of `fams` into `model` in place (biases / BatchNorm means)."""
    rec = BiasCorrection(max_shift=max((float(s.abs().max()) for s in shifts.values()), default=0.0))
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, e in shifts.items():
            if not any(f.owns(name) for f in fams if f.prefixes):
                continue  # a layer that stays float is not rounded: nothing to correct
            bn = bn_after(mods, name)  # after a backbone conv the shift goes into the BatchNorm's mean
            if bn is not None:
                bn.running_mean -= e.to(bn.running_mean.dtype)
            elif getattr(mods[name], "bias", None) is not None:
                mods[name].bias += e.to(mods[name].bias.dtype)
            else:
                rec.skipped.append(name)
                continue
            rec.layers += 1
    return rec


def bias_corrected(model: nn.Module, shifts: dict[str, torch.Tensor], fams: list[Family], n_images: int = 0,
                   source: str = "") -> tuple[nn.Module, BiasCorrection]:
    """A corrected copy of `model` for int8 with the layers of `fams` quantized; `model` is not modified."""
    out = copy.deepcopy(model).eval()
    rec = apply_shifts(out, shifts, fams)
    rec.n_images, rec.source = n_images, source
    return out, rec
