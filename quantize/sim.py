"""A PyTorch simulation of the int8 scheme the backends apply, family by family.

A quantized Conv2d / Linear: weights int8 per output channel, symmetric; its input *and output* activation
int8 per tensor, asymmetric, ranges calibrated on real photos. The output is quantized after the BatchNorm,
or, where ReLU6 follows, as the next layer's input: simulating input quantization alone missed a third of
ONNX Runtime's disagreements. Families group the quantizable parts (module-name prefixes every backend maps
to its own graph, plus three op families) so each can be quantized alone and the sensitive ones kept float.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

# families that are ops rather than layers
ATTENTION = "attention matmul+softmax"
LAYERNORM = "layernorm inputs"
LOGSOFTMAX = "log-softmax input"
OP_FAMILIES = (ATTENTION, LAYERNORM, LOGSOFTMAX)
# op families no backend configuration here quantizes; they are measured, and they stay float
ALWAYS_FLOAT = (LAYERNORM, LOGSOFTMAX)


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: tuple[str, ...] = ()  # module-name prefixes (layer families); empty for op families

    def owns(self, module_name: str) -> bool:
        return any(module_name == p or module_name.startswith(p + ".") for p in self.prefixes)


def layers_of(model: nn.Module, fams: list[Family]) -> dict[str, nn.Module]:
    """The Conv2d / Linear layers of `model` the families `fams` own, by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and any(f.owns(n) for f in fams)}


def backbone_families(backbone: nn.Module) -> list[Family]:
    """The backbone's families, in graph order (module prefixes under `backbone.`): the stem, each
    EfficientNet stage (the blocks between two changes of output width) and the head conv on their own,
    so a float plan can keep a small early stage float without its larger neighbours."""
    specs = backbone.specs
    starts = [i for i, s in enumerate(specs) if i == 0 or s.cout != specs[i - 1].cout] + [backbone.num_blocks]
    fams = [Family("backbone stem", ("backbone._conv_stem",))]
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        span = f"block {a}" if b == a + 1 else f"blocks {a}-{b - 1}"
        fams.append(Family(f"backbone stage {k} ({span})", tuple(f"backbone._blocks.{i}" for i in range(a, b))))
    return fams + [Family("backbone head conv", ("backbone._conv_head",))]


def families(model: nn.Module) -> list[Family]:
    """The block families of a model, in graph order: a HierarchicalQueryModel's backbone, tokens and query
    head; a pooled-feature peer's (flat, HRN) backbone and, as one family, the layers that read its pooled
    features out."""
    fams = backbone_families(model.backbone)
    head = getattr(model, "head", None)
    if head is None:
        readout = tuple(n for n, m in model.named_children() if n != "backbone"
                        and any(isinstance(x, (nn.Linear, nn.Conv2d)) for x in m.modules()))
        return fams + [Family("read-out", readout)] * bool(readout) + [Family(n) for n in ALWAYS_FLOAT]
    fams.append(Family("token projections", ("tokens.proj",)))
    blocks = [f"head.cross.{lvl}.{b}" for lvl, level in enumerate(head.cross) for b in range(len(level))]
    fams.append(Family("query cross-attention projections", tuple(f"{b}.attn" for b in blocks)))
    fams.append(Family("query FFNs", tuple(f"{b}.ffn" for b in blocks)))
    if getattr(head, "camp", None) is not None:
        fams.append(Family("CAMP block", ("head.camp",)))
    if getattr(model.tokens, "fusion", None) is not None and len(model.tokens.fusion):
        fams.append(Family("token fusion blocks", ("tokens.fusion",)))
    if getattr(model, "global_head", None) is not None:  # linear read-out of the pooled head conv, per level
        fams.append(Family("global read-out", ("global_head",)))
    fams += [Family(n) for n in OP_FAMILIES]
    return fams


@dataclass
class Ranges:
    """Calibrated activation ranges: per module name, (min, max) of its input and of its output."""

    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)


@torch.inference_mode()
def calibrate(model: nn.Module, images: np.ndarray, batch: int = 25) -> Ranges:
    """Record min/max of every Conv2d/Linear/LayerNorm/BatchNorm/read-out input and output on real uint8 photos."""
    from train.models import GroupReadout
    r = Ranges()

    def record(name: str, inp, out) -> None:
        for d, t in ((r.inputs, inp[0]), (r.outputs, out)):
            lo, hi = float(t.min()), float(t.max())
            d[name] = (min(lo, d[name][0]), max(hi, d[name][1])) if name in d else (lo, hi)
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: record(name, inp, out))
             for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d, GroupReadout))]
    feed(model, images, hooks, batch)
    return r


def feed(model: nn.Module, images: np.ndarray, hooks: list, batch: int = 25) -> None:
    """Run uint8 NHWC photos through `model` in eval mode for the forward `hooks` it carries, then remove them
    and restore the model's mode."""
    from train.backbones import normalize_uint8
    was_training = model.training
    try:
        model.eval()
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch]))
            model(normalize_uint8(x.permute(0, 3, 1, 2)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def fq_act(x: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    """int8 asymmetric per tensor on the range `rng` widened to contain 0."""
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = max(-128, min(127, int(round(-128 - lo / scale))))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)


# The weight observers of pt2e's XNNPACKQuantizer and of litert-torch's PT2EQuantizer clamp a channel's
# scale at eps = 2^-12, and they see the BatchNorm-folded weight: a channel whose folded max |w| is below
# 127 * 2^-12 = 0.031 gets the coarser step 2^-12 (2.5 % of the reference student's channels, most in
# the late expand convs). ONNX Runtime and coremltools do not clamp.
OBSERVER_EPS = 2 ** -12

# EfficientNet-Lite block convs and the BatchNorm that follows each (train.backbones)
BN_AFTER = {"_expand_conv": "_bn0", "_depthwise_conv": "_bn1", "_project_conv": "_bn2",
            "_conv_stem": "_bn0", "_conv_head": "_bn1"}


def bn_after(mods: dict[str, nn.Module], name: str) -> nn.BatchNorm2d | None:
    """The BatchNorm that follows backbone conv `name` (`mods`: the model's named modules), if any."""
    parent, _, last = name.rpartition(".")
    bn = mods.get((parent + "." if parent else "") + BN_AFTER[last]) if last in BN_AFTER else None
    return bn if isinstance(bn, nn.BatchNorm2d) else None


def fold_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per conv followed by a BatchNorm: |gamma| / sqrt(var + eps) per output channel, the factor BatchNorm
    folding multiplies its weights by (bias correction moves the mean only, so corrected copies share it)."""
    mods = dict(model.named_modules())
    bns = {name: bn_after(mods, name) for name, m in mods.items() if isinstance(m, nn.Conv2d)}
    return {name: (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).float()
            for name, bn in bns.items() if bn is not None}


def weight_scale(w: torch.Tensor, fold: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """Per output channel int8 scale of `w`: max |w| / 127, or, where the observer's `eps` clamps the scale
    of the folded weight (w * fold), eps / fold."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12)
    scale = (amax / 127.0).float()
    if eps > 0:
        f = torch.ones_like(scale) if fold is None else fold.float()
        scale = torch.where(amax * f / 127.0 < eps, eps / f, scale)
    return scale


def fq_weight(w: torch.Tensor, fold: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """int8 symmetric per output channel (axis 0), quant range [-127, 127]; `fold`, `eps`: `weight_scale`."""
    scale = weight_scale(w, fold, eps)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


@dataclass(frozen=True)
class DynamicScheme:
    """ExecuTorch's dynamic int8: how each Conv2d / Linear of the plan's quantized families runs in XNNPACK.

    `dynamic`: int8 weights, input quantized per image at run time (qd8), float output; `static`: the calibrated
    scheme, where the dynamic kernels cannot run; `float`: depthwise convs and the stem. `why`: layer -> why it
    is not dynamic."""

    dynamic: frozenset[str]
    static: frozenset[str]
    float: frozenset[str]
    why: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return {"dynamic_layers": len(self.dynamic), "static_layers": sorted(self.static),
                "float_layers": sorted(self.float), "why": dict(sorted(self.why.items()))}


@torch.inference_mode()
def image_independent_layers(model: nn.Module, images: np.ndarray) -> set[str]:
    """Conv2d / Linear layers whose input is the same for two different photos (e.g. the projection of
    the learned level-0 queries): a constant, which XNNPACK's partitioner will not quantize dynamically."""
    if len(images) < 2 or np.array_equal(images[0], images[1]):
        raise ValueError("image_independent_layers needs two different photos")
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].clone()))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    feed(model, np.ascontiguousarray(images[:2]), hooks, batch=1)
    return {n for n, (a, b) in seen.items() if torch.equal(a, b)}


STEM = "backbone._conv_stem"


def dynamic_scheme(model: nn.Module, quantized: set[str], images: np.ndarray) -> DynamicScheme:
    """Which layers of the families `quantized` run dynamic, static or float (`DynamicScheme`)."""
    fams = [f for f in families(model) if f.prefixes and f.name in quantized]
    const = image_independent_layers(model, images)
    dyn, static, flt, why = set(), set(), set(), {}
    for name, m in layers_of(model, fams).items():
        if is_depthwise(m):
            flt.add(name)
            why[name] = "depthwise: XNNPACK has no dynamically quantized depthwise conv"
        elif name == STEM:
            flt.add(name)
            why[name] = ("the stem (864 weights): XNNPACK's dynamic conv fails at run time on the 3-channel image "
                         "input (xnn_status_invalid_parameter, executorch 1.5.1), and static int8 there doubled the "
                         "simulated val fine KL to fp32 of the scheme (1.66e-3 vs 9.6e-4 float)")
        elif name in const:
            static.add(name)
            why[name] = ("its input does not depend on the photo (learned queries): XNNPACK's partitioner leaves "
                         "a dynamic quantization of a constant outside the delegate")
        else:
            dyn.add(name)
    return DynamicScheme(frozenset(dyn), frozenset(static), frozenset(flt), why)


def _fq_per_image(x: torch.Tensor) -> torch.Tensor:
    # each image's own min/max (asymmetric int8, the range always containing 0), as qd8 chooses it at run time
    return torch.stack([fq_act(x[i], (float(x[i].min()), float(x[i].max()))) for i in range(x.shape[0])])


def _attention_forward(self, xq, xkv, bias=None):
    # the explicit attention path with its matmul inputs and probabilities fake-quantized
    q, k, v = self._split(self.q(xq)), self._split(self.k(xkv)), self._split(self.v(xkv))
    q, k, v = fq_act(q, self._r["q"]), fq_act(k, self._r["k"]), fq_act(v, self._r["v"])
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    attn = fq_act(logits.softmax(-1), (0.0, 1.0))
    y = attn @ v
    return self.o(y.transpose(1, 2).flatten(2))


def _output_point(name: str) -> str | None:
    """Where a quantized layer's output is quantized: after its BatchNorm for a linear bottleneck
    (`_project_conv` -> `_bn2`), none when ReLU6 follows (the next layer's input quantization stands
    for it), the layer itself otherwise (Linear, the token projection convs)."""
    if name.endswith("._project_conv"):
        return name[: -len("_project_conv")] + "_bn2"
    if name.startswith("backbone."):
        return None  # stem, expand, depthwise and head convs: BN + ReLU6 follow
    return name


def _static_hooks(mods: dict[str, nn.Module], name: str, ranges: Ranges, clip_output: bool) -> None:
    """The calibrated scheme's input and output quantization of layer `name`; `clip_output`: a conv that
    hands over to float (ExecuTorch's dynamic scheme) gets its output quantized after BN + ReLU6, on [0, 6]."""
    rng = ranges.inputs[name]
    mods[name].register_forward_pre_hook(lambda mod, inp, rng=rng: (fq_act(inp[0], rng),) + tuple(inp[1:]))
    out_at = _output_point(name)
    if out_at is not None:
        orng = ranges.outputs[out_at]
    elif clip_output:
        bn = bn_after(mods, name)
        out_at = next(n for n, mod in mods.items() if mod is bn)
        orng = (max(ranges.outputs[out_at][0], 0.0), min(ranges.outputs[out_at][1], 6.0))
    else:
        return
    mods[out_at].register_forward_hook(lambda mod, inp, out, rng=orng: fq_act(out, rng))


def simulate(model: nn.Module, ranges: Ranges, quantized: set[str], weights_only: bool = False,
             shifts: dict[str, torch.Tensor] | None = None, weight_eps: float = OBSERVER_EPS,
             dynamic: DynamicScheme | None = None, fams: list[Family] | None = None) -> nn.Module:
    """A copy of `model` with the named families fake-quantized (everything else float).

    `weights_only`: Core ML's weight-only scheme. `shifts`: the bias correction the int8 artifacts get
    (`quantize.bias.rounding_shifts`). `weight_eps`: the observers' scale clamp (`OBSERVER_EPS`; 0 for Core ML and
    ONNX Runtime). `dynamic`: ExecuTorch's dynamic scheme, where the op families stay float. `fams`: the
    families `quantized` names (default `families(model)`).
    """
    from train.models import Attention, GroupReadout
    sim = copy.deepcopy(model).eval()
    by_name = {f.name: f for f in fams or families(model)}
    unknown = sorted(set(quantized) - set(by_name))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {list(by_name)}")
    layer_fams = [by_name[n] for n in quantized if by_name[n].prefixes]
    unrounded = dynamic.float if dynamic is not None else frozenset()
    shifts = {k: v for k, v in (shifts or {}).items() if k not in unrounded}  # a float layer has nothing to correct
    if shifts:
        from .bias import apply_shifts
        apply_shifts(sim, shifts, layer_fams)
    folds = fold_factors(sim)
    mods = dict(sim.named_modules())
    rounded = set(layers_of(sim, layer_fams)) - unrounded
    for name, m in mods.items():
        if name in rounded:
            with torch.no_grad():
                m.weight.copy_(fq_weight(m.weight, folds.get(name), weight_eps))
            if dynamic is not None and name in dynamic.dynamic:
                m.register_forward_pre_hook(lambda mod, inp: (_fq_per_image(inp[0]),) + tuple(inp[1:]))
            elif not weights_only:
                _static_hooks(mods, name, ranges, clip_output=dynamic is not None)
        if weights_only or dynamic is not None:
            continue
        if ATTENTION in quantized and isinstance(m, Attention):
            m._r = {p: ranges.outputs[f"{name}.{p}"] for p in ("q", "k", "v")}
            m.forward = types.MethodType(_attention_forward, m)
        if LAYERNORM in quantized and isinstance(m, nn.LayerNorm):
            rng = ranges.inputs[name]
            m.register_forward_pre_hook(lambda mod, inp, rng=rng: (fq_act(inp[0], rng),))
        if LOGSOFTMAX in quantized and isinstance(m, GroupReadout):
            rng = ranges.outputs[name]
            m.register_forward_hook(lambda mod, inp, out, rng=rng: fq_act(out, rng))
    return sim


def model_logprobs(model: nn.Module, images: np.ndarray, batch: int = 25) -> list[np.ndarray]:
    """Per-level log-probs (float64) of a (float or simulated) HierarchicalQueryModel on uint8 NHWC photos."""
    from converters import torch_logprobs
    from train.models import DeployWrapper
    return torch_logprobs(DeployWrapper(model, embedding=False), images, batch)
