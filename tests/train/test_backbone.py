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
