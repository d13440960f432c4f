"""Int8-consistency training: teach the fp32 model to give the answers its int8 export will give.

An int8 export changes the answers the fp32 model gives with a small margin between its two most likely
fine classes: rounding moves every logit a little, and near a tie a little is enough (issue #6: on
`runs/student`, int8 *weights* alone, with every activation float, changed 3 of 296 `val` answers).
Post-training quantization can only shrink the rounding; this makes the model itself insensitive to it.

With `TrainConfig.int8_consistency = w > 0`, every training step runs the batch a second time through
an int8 view of the same parameters and adds

    w * mean over levels of KL(p_fp32 || p_int8)      (p_fp32 detached: the float model is the reference)

to the loss. The int8 view is the scheme every backend here applies to a Conv2d / Linear:

- weights int8 symmetric per output channel (max |w| / 127), rounded with a straight-through gradient,
  so the gradient reaches the float weights the checkpoint keeps;
- each Conv2d / Linear input int8 per tensor, asymmetric, on the batch's min/max (the range always
  containing 0) -- a stand-in for the calibrated static ranges (which are the min/max over the calibration
  photos) and for ExecuTorch's dynamic scheme (each photo's own min/max).

The int8 pass sees the same photo and view (mixup included) and the same dropout masks as the float pass,
so the KL measures rounding only; it leaves the BatchNorm running statistics as the float pass set them.
With cached frozen blocks (`freeze_blocks`, `cache_views`) the int8 pass starts from the frozen prefix run
in int8 (`int8_prefix`), cached once beside the float features: the frozen blocks cannot learn, but
the trainable part learns to read their rounded output as the float one. The frozen prefix is where most
of the int8 error enters (11 of Lite0's 16 blocks and the stem), so a consistency that left it float
would train against the smaller part of the error.
Cost: the int8 cache (one more pass over the photos per view), and about one more forward + backward of
the trainable part per step.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from quantize.sim import fq_act, fq_weight


def _quantized_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to int8 symmetric per output channel (axis 0, [-127, 127]); straight-through gradient.
    The backends' grid as `quantize` simulates it (`quantize.sim.fq_weight`, without the observers' clamp)."""
    return fq_weight(w)


def int8_activation(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to int8 per tensor, asymmetric, on its own min/max (containing 0); straight-through
    (`quantize.sim.fq_act` on the tensor's range)."""
    lo, hi = torch.aminmax(x.detach())
    return fq_act(x, (float(lo), float(hi)))


@contextlib.contextmanager
def int8_inputs(model: nn.Module):
    """While active, every Conv2d / Linear of `model` rounds its input with `int8_activation`."""
    hooks = [m.register_forward_pre_hook(lambda mod, inp: (int8_activation(inp[0]),) + tuple(inp[1:]))
             for _, m in _quantized_layers(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def int8_forward(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """`model(*args, **kwargs)` with int8 weights and int8 Conv2d / Linear inputs (gradients reach the float
    weights straight through the rounding). BatchNorm running statistics are left as they were."""
    weights = {f"{name}.weight": int8_weight(m.weight) for name, m in _quantized_layers(model)}
    # BatchNorms in training mode update their running statistics: the int8 pass updates copies
    stats = {f"{name}.{b}": getattr(m, b).clone() for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
             for b in ("running_mean", "running_var", "num_batches_tracked")}
    with int8_inputs(model):
        return functional_call(model, {**weights, **stats}, args, kwargs or {}, strict=False)


class _Prefix(nn.Module):
    def __init__(self, backbone: nn.Module, n_blocks: int, taps: tuple[int, ...]):
        super().__init__()
        self.backbone, self.n_blocks, self.taps = backbone, n_blocks, taps

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.backbone.prefix(x, self.n_blocks, self.taps)


def int8_prefix(backbone: nn.Module, x: torch.Tensor, n_blocks: int, taps: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
    """`backbone.prefix(x, n_blocks, taps)` (the frozen, cached blocks) with int8 weights and Conv2d inputs:
    the features the trainable part receives from an int8 export, cached beside the float ones."""
    return int8_forward(_Prefix(backbone, n_blocks, taps), (x,))


def level_kl(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of the batch-mean KL(reference || other), both per-level log-probs."""
    kls = [(r.exp() * (r - o)).sum(-1).mean() for r, o in zip(reference, other)]
    return torch.stack(kls).mean()


def rng_snapshot(device: torch.device) -> tuple:
    """The RNG state dropout draws from on `device` (CPU, plus the CUDA generator on a GPU)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def consistency_loss(model: nn.Module, logps_fp32: Sequence[torch.Tensor], args: tuple, kwargs: dict,
                     rng_before: tuple, device: torch.device) -> torch.Tensor:
    """KL(fp32 || int8) of one batch: `args`, `kwargs` are the float pass's, `rng_before` the
    `rng_snapshot` taken just before it (so the int8 pass draws the same dropout masks)."""
    after = rng_snapshot(device)
    _rng_restore(rng_before, device)
    try:
        logps_q = int8_forward(model, args, kwargs)
    finally:
        _rng_restore(after, device)
    return level_kl([lp.detach().float() for lp in logps_fp32], [lp.float() for lp in logps_q])
