"""The ExecuTorch and TFLite quantizers put observers on the same ops (apart from data movement,
which shares its input's scale): ExecuTorch must not quantize what the plan and TFLite keep float."""

import torch

from quantize.executorch import xnnpack_quantizer
from quantize.tflite import litert_quantizer
from train.data import synthetic_taxonomy
from train.models import DeployWrapper, ModelConfig, build_model

SHAPE_OPS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default, torch.ops.aten.flatten.using_ints}


def _observed(quantizer, model, example) -> dict[str, object]:
    """{name: op} of every node whose output gets an observer after prepare_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    return {n.args[0].name: n.args[0].target for n in prepared.graph.nodes
            if n.op == "call_module" and "activation_post_process" in str(n.target) and hasattr(n.args[0], "name")}


def test_executorch_quantizes_no_op_tflite_keeps_float():
    torch.manual_seed(0)
    model = build_model(synthetic_taxonomy(), ModelConfig(image_size=96, d_model=32, heads=2, global_head=True),
                        pretrained=False).eval()
    dep = DeployWrapper(model).eval()
    names = [f"model.{n}" for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    example = torch.zeros(1, 96, 96, 3, dtype=torch.uint8)
    et = _observed(xnnpack_quantizer(names), dep, example)
    tfl = _observed(litert_quantizer(names), dep, example)
    extra = {name: target for name, target in et.items() if name not in tfl}
    assert not {n: t for n, t in extra.items() if t not in SHAPE_OPS}, extra
    # the multi-scale token concatenation (before the LayerNorm) stays float in both
    assert torch.ops.aten.cat.default not in set(et.values()) | set(tfl.values())
    assert len(tfl) > 20  # the convs and linears are quantized at all


def test_conv_relu6_is_quantized_after_the_clip_in_both_quantizers():
    """The backbone's conv(-bn)-ReLU6: one observer, on the ReLU6 output, none between the conv and the
    clip (the stock patterns match ReLU only and would observe the conv's wide pre-clip range)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    torch.manual_seed(0)
    model = build_model(synthetic_taxonomy(), ModelConfig(image_size=96, d_model=32, heads=2),
                        pretrained=False).eval()
    dep = DeployWrapper(model).eval()
    names = [f"model.{n}" for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    example = torch.zeros(1, 96, 96, 3, dtype=torch.uint8)

    def observer(n) -> bool:
        return n.op == "call_module" and "activation_post_process" in str(n.target)

    for quantizer in (xnnpack_quantizer(names), litert_quantizer(names)):
        prepared = prepare_pt2e(torch.export.export(dep, (example,)).module(), quantizer)
        relu6 = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.relu6.default]
        assert len(relu6) > 10  # the Lite backbone's clips
        who = type(quantizer).__mro__[1].__name__
        for n in relu6:
            assert n.args[0].target == torch.ops.aten.conv2d.default, (who, n.name, n.args[0].name)  # no observer between
            assert all(observer(u) for u in n.users) and n.users, (who, n.name, list(n.users))
