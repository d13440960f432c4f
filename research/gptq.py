"""Error-compensating int8 weight rounding (GPTQ, Frantar et al., ICLR 2023), measured on real photos.

It lost to round-to-nearest: it cut the KL of int8 weights alone 2.7x, but the artifacts built with it
changed as many `val` answers or more (docs/results.md); `research/int8_float_sets.py --rounding gptq`
measures it in the simulation.

Round-to-nearest treats every weight alone. GPTQ rounds a layer's weights one input column at a time
and moves each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian H = X Xᵀ of the layer's inputs on the calibration photos, so the *output* error ‖(W − Q)X‖ is
what is minimized, not the weight error. The grid is unchanged: int8 symmetric per output channel
with scale max|w| / 127, or eps / fold where the pt2e observers clamp the BatchNorm-folded scale
(`quantize.sim.weight_scale`). The chosen values are written back into a copy of the float model
exactly on that grid, and each channel's largest weight is kept at ±127, so a backend's observer
computes the same scale and its round-to-nearest reproduces the GPTQ choice: no backend code changes,
the graph is unchanged.

Choices, stated:
- Hessians come from the fp32 model's inputs (one pass over the calibration photos), not from the
  already-quantized layers before (sequential GPTQ): the shift of the mean that rounding leaves is then
  removed by `quantize.bias` with Q(W) = the GPTQ weights;
- dampening 1 % of the mean diagonal; columns in their natural order (no act-order: it would not
  change the grid, only the order, and keeps the code short);
- Conv2d with groups == 1 are unfolded into im2col columns (padding as the layer pads, TF "same"
  included); depthwise convs (groups == channels) get one 9×9 (k×k) Hessian per channel; other
  grouped convs fall back to round-to-nearest;
- BatchNorm folding multiplies an output channel by a constant, which keeps a per-channel grid a grid.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize.bias import rounding_error_output
from quantize.sim import OBSERVER_EPS, Family, feed, fold_factors, is_depthwise, weight_scale

from research.weights import with_weights  # noqa: F401  (GPTQ's weights go into a copy of the model)

DAMP = 0.01


def _patches(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col columns of `x` as `mod` sees them: (B, Cin*k*k, L)."""
    from train.backbones import SameConv, _same_pad
    k, s = mod.kernel_size, mod.stride
    if isinstance(mod, SameConv):
        if s[0] == 1:
            return F.unfold(x, k, padding=k[0] // 2, stride=1)
        return F.unfold(_same_pad(x, k[0], s[0]), k, stride=s)
    if isinstance(mod.padding, str):
        raise ValueError(f"string padding {mod.padding!r} is not unfolded here")
    return F.unfold(x, k, dilation=mod.dilation, padding=mod.padding, stride=s)


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "dense"
    if isinstance(mod, nn.Conv2d):
        if mod.groups == 1:
            return "dense"
        if is_depthwise(mod) and mod.out_channels == mod.groups:  # one filter per channel
            return "depthwise"
    return None


def _accumulate(mod: nn.Module, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    kind = _kind(mod)
    if isinstance(mod, nn.Linear):
        cols = x.reshape(-1, x.shape[-1]).double()  # (N, Cin)
        add = cols.T @ cols
    elif kind == "dense":
        p = _patches(mod, x)  # (B, C, L)
        cols = p.transpose(1, 2).reshape(-1, p.shape[1]).double()
        add = cols.T @ cols
    else:  # depthwise: per channel, its own k*k window
        p = _patches(mod, x)
        c, kk = mod.out_channels, mod.kernel_size[0] * mod.kernel_size[1]
        p = p.reshape(p.shape[0], c, kk, -1).double()
        add = torch.einsum("bckl,bcjl->ckj", p, p)
    return add if h is None else h + add


@torch.inference_mode()
def hessians(model: nn.Module, images: np.ndarray, names: list[str], batch: int = 10) -> dict[str, torch.Tensor]:
    """X Xᵀ of each named layer's inputs over `images` (fp32 forward); depthwise convs: (C, k², k²)."""
    mods = dict(model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def hook(mod, inp, out, n=n):
            hs[n] = _accumulate(mod, inp[0], hs.get(n))
        hooks.append(mods[n].register_forward_hook(hook))
    was_training = model.training
    try:
        feed(model, images, hooks, batch)
    finally:
        model.train(was_training)
    return hs


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ after dampening (batched over leading dims); dead inputs get 1 on the diagonal."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    damp = DAMP * diag.mean(-1, keepdim=True)
    diag += damp
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _gptq_rows(w: torch.Tensor, hinv_u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes for rows of `w` (R, C) sharing one Hessian factor (C, C), or (R, C) with (R, C, C)."""
    w = w.clone().double()
    q = torch.zeros_like(w)
    s = scale.double()[:, None]
    shared = hinv_u.dim() == 2
    for i in range(w.shape[1]):
        col = w[:, i:i + 1]
        qi = torch.clamp(torch.round(col / s), -127, 127)
        q[:, i:i + 1] = qi
        d = hinv_u[i, i] if shared else hinv_u[:, i, i][:, None]
        err = (col - qi * s) / d
        if i + 1 < w.shape[1]:
            row = hinv_u[i, i + 1:][None, :] if shared else hinv_u[:, i, i + 1:]
            w[:, i + 1:] -= err * row
    return q


def gptq_layer(mod: nn.Module, h: torch.Tensor, fold: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """The layer's weights re-rounded by GPTQ, on the per-channel int8 grid a backend's observer puts on
    its fp32 weights (`quantize.sim.weight_scale`: max |w| / 127, or eps / fold where the scale is clamped)."""
    w = mod.weight.detach()
    r = w.shape[0]
    flat = w.reshape(r, -1).double()
    scale = weight_scale(w, fold, eps)  # float32, fq_weight's scale bit for bit
    codes = _gptq_rows(flat, _inverse_cholesky(h), scale.double())
    # keep each channel's largest weight at ±127 so an observer on the result finds the same scale
    # (a clamped channel's scale is eps whatever its maximum)
    free = scale == weight_scale(w)
    top = flat.abs().argmax(1)
    idx = torch.arange(r)[free]
    codes[idx, top[free]] = torch.sign(flat[idx, top[free]]) * 127
    return (codes.float() * scale[:, None]).to(w.dtype).reshape(w.shape)


def gptq_weights(model: nn.Module, images: np.ndarray, fams: list[Family],
                 log: Callable[[str], None] = lambda s: None, weight_eps: float = OBSERVER_EPS) -> dict[str, torch.Tensor]:
    """GPTQ-rounded weights (float, exactly on the int8 grid) for every Conv2d / Linear of `fams`
    GPTQ can take; the others are absent (round-to-nearest applies to them as before).
    `weight_eps`: the observers' scale clamp on the BatchNorm-folded weight (`quantize.sim.OBSERVER_EPS`)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and any(f.owns(n) for f in fams) and _kind(m) is not None]
    hs = hessians(model, images, names)
    mods = dict(model.named_modules())
    folds = fold_factors(model)
    out = {}
    with torch.no_grad():
        for n in names:
            if n in hs:
                out[n] = gptq_layer(mods[n], hs[n], folds.get(n), weight_eps)
    log(f"GPTQ: {len(out)} layers re-rounded on {len(images)} photos")
    return out


def output_error(model: nn.Module, weights: dict[str, torch.Tensor], images: np.ndarray,
                 weight_eps: float = OBSERVER_EPS) -> dict[str, tuple[float, float]]:
    """Per layer, ‖(W − Q)X‖² summed over `images` for round-to-nearest Q and for the GPTQ Q (a check)."""
    mods = dict(model.named_modules())
    folds = fold_factors(model)
    acc: dict[str, list[float]] = {n: [0.0, 0.0] for n in weights}
    hooks = []
    for n in weights:
        def hook(mod, inp, out, n=n):
            for j, q in enumerate((None, weights[n])):  # None: round-to-nearest
                y = rounding_error_output(mod, inp[0], q, folds.get(n), weight_eps)
                acc[n][j] += float((y.double() ** 2).sum())
        hooks.append(mods[n].register_forward_hook(hook))
    with torch.inference_mode():
        feed(model, images, hooks)
    return {n: (a[0], a[1]) for n, a in acc.items()}
