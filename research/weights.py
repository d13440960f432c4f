"""Layers taking other weights than the trained ones: what the rounding studies swap in."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from quantize.sim import Family


def take_weights(model: nn.Module, weights: dict[str, torch.Tensor], fams: list[Family]) -> None:
    """In place: the layers of the layer families `fams` that have an entry in `weights` take it."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            if any(f.owns(name) for f in fams if f.prefixes):
                mods[name].weight.copy_(w)


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor], fams: list[Family]) -> nn.Module:
    """A copy of `model` whose layers of `fams` take `weights` (the others keep their fp32 weights)."""
    out = copy.deepcopy(model).eval()
    take_weights(out, weights, fams)
    return out
