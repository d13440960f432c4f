import numpy as np
import torch

from sdk import prepare
from train.backbones import create_backbone, list_backbones, normalize_uint8


def test_pretrained_lite0_sees_a_banana(banana_jpg):
    model = create_backbone("efficientnet_lite0").eval()
    x = normalize_uint8(torch.from_numpy(prepare(banana_jpg, 224).copy()).permute(2, 0, 1)[None])
    with torch.no_grad():
        p = model.imagenet_logits(x).softmax(-1)[0]
    assert int(p.argmax()) == 954  # ImageNet "banana"
    assert float(p[954]) > 0.5


def test_both_backbones_registered_and_strict_load():
    assert {"efficientnet_lite0", "efficientnet_lite2"} <= set(list_backbones())
    m = create_backbone("efficientnet_lite2")
    assert m.num_blocks == 21 and m.head_channels == 1280


def test_depthwise_convs_stay_fp32_under_cpu_bf16_autocast():
    from train.backbones import SameConv

    torch.manual_seed(0)
    dw = SameConv(8, 8, 3, 2, groups=8, bias=False)
    pw = SameConv(8, 8, 1, bias=False)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_dw, y_pw = dw(x.bfloat16()), pw(x)
    assert y_dw.dtype == torch.float32 and y_pw.dtype == torch.bfloat16
    # same result as the plain fp32 conv on the bf16-rounded input, gradients reach the weight
    torch.testing.assert_close(y_dw, dw(x.bfloat16().float()))
    y_dw.sum().backward()
    assert dw.weight.grad is not None and x.grad is not None
    # outside autocast (training in fp32, exporting) nothing changes
    assert dw(x).dtype == torch.float32
