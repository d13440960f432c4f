"""research.gptq: error-compensating int8 rounding stays on the backends' grid and lowers the output error."""

import numpy as np
import torch
import torch.nn as nn

from quantize.bias import rounding_error_output
from quantize.sim import OBSERVER_EPS, families, fold_factors, fq_weight, weight_scale
from research.gptq import _accumulate, gptq_layer, gptq_weights, output_error, with_weights


def _on_grid(w: torch.Tensor, ref: torch.Tensor, fold=None, eps=0.0) -> None:
    # a backend's per-channel observer on the result finds the fp32 weights' scale and rounds to the same
    # values (equal up to float rounding of the scale, far below half an int8 step)
    torch.testing.assert_close(fq_weight(w, fold, eps), w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weight_scale(w, fold, eps), weight_scale(ref, fold, eps))


def _err(mod, x, w):
    return float((rounding_error_output(mod, x, w).double() ** 2).sum())


def test_linear_with_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(48, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 48, generator=g) * 0.2)
    mix = torch.randn(48, 48, generator=g)
    x = torch.randn(4000, 48, generator=g) @ mix  # strongly correlated inputs: where GPTQ pays
    w = gptq_layer(lin, _accumulate(lin, x, None))
    _on_grid(w, lin.weight)
    assert not torch.equal(w, fq_weight(lin.weight))
    assert _err(lin, x, w) < 0.7 * _err(lin, x, fq_weight(lin.weight))


def test_depthwise_and_same_padded_convs():
    from train.backbones import SameConv
    g = torch.Generator().manual_seed(1)
    for conv in (SameConv(8, 8, 3, stride=2, groups=8, bias=False), SameConv(8, 12, 3, stride=1, bias=False)):
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        x = torch.nn.functional.avg_pool2d(torch.randn(6, 8, 20, 20, generator=g), 3, 1, 1)  # smooth: neighbours correlate
        w = gptq_layer(conv, _accumulate(conv, x, None))
        _on_grid(w, conv.weight)
        assert _err(conv, x, w) < _err(conv, x, fq_weight(conv.weight))


def test_trained_student_on_real_photos(tiny_student_dir, grocery_root):
    from quantize.calibration import calibration_sets
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(tiny_student_dir)
    cal, _ = calibration_sets(str(grocery_root), cfg.image_size, tax, 24, 0)
    fams = [f for f in families(model) if f.prefixes]
    w = gptq_weights(model, cal.images, fams)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and any(f.owns(n) for f in fams)]
    assert set(w) == set(convs)  # Lite0 has dense and depthwise convs only: GPTQ takes every one
    mods = dict(model.named_modules())
    folds = fold_factors(model)
    assert len(folds) == sum(1 for n in w if n.startswith("backbone."))  # every backbone conv has its BatchNorm
    clamped = 0
    for n, t in w.items():
        _on_grid(t, mods[n].weight, folds.get(n), OBSERVER_EPS)
        clamped += int((weight_scale(t, folds.get(n), OBSERVER_EPS) != weight_scale(t)).sum())
    assert clamped > 0  # trained Lite0 has channels whose folded scale the observers clamp at 2^-12
    err = output_error(model, w, cal.images)
    nearest, gptq = sum(e[0] for e in err.values()), sum(e[1] for e in err.values())
    assert gptq < 0.8 * nearest, (gptq, nearest)
    # only the layers of the families asked for take the new weights; the fp32 model is untouched
    backbone = [f for f in fams if f.name.startswith("backbone")]
    m2 = with_weights(model, w, backbone)
    m2mods = dict(m2.named_modules())
    stem, head = "backbone._conv_stem", next(n for n in w if n.startswith("head."))
    assert torch.equal(m2mods[stem].weight, w[stem]) and not torch.equal(mods[stem].weight, w[stem])
    assert torch.equal(m2mods[head].weight, mods[head].weight)
    assert np.isfinite(nearest) and nearest > 0


def test_xnnpack_weight_observer_reproduces_the_gptq_codes_after_batchnorm_folding():
    # the observer pt2e's XNNPACK quantizer puts on weights (per channel, symmetric, [-127, 127], eps 2^-12)
    # sees the BatchNorm-folded weight: a per-channel factor, which keeps the GPTQ grid a grid
    from torchao.quantization.pt2e import PerChannelMinMaxObserver
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 32, generator=g) * 0.3)
    x = torch.randn(2000, 32, generator=g) @ torch.randn(32, 32, generator=g)
    fold = torch.rand(24, generator=g) * 2 + 0.2  # gamma / sqrt(var + eps) of a BatchNorm
    fold[:6] = 0.01  # channels whose folded scale the observer clamps at eps
    w = gptq_layer(lin, _accumulate(lin, x, None), fold, OBSERVER_EPS)
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=-127, quant_max=127, eps=OBSERVER_EPS)
    obs(w * fold[:, None])
    scale, zp = obs.calculate_qparams()
    assert torch.all(scale[:6] == OBSERVER_EPS) and torch.all(scale[6:] > OBSERVER_EPS)
    codes = torch.round(w * fold[:, None] / scale[:, None])
    expect = torch.round(w / weight_scale(lin.weight, fold, OBSERVER_EPS)[:, None])
    assert torch.equal(codes, expect) and int(zp.abs().max()) == 0
    # and the codes are the ones GPTQ wrote: the folded weight sits on the observer's grid
    torch.testing.assert_close(codes * scale[:, None], w * fold[:, None], rtol=1e-5, atol=1e-9)


def test_simulation_carries_the_gptq_weights_only_for_quantized_families(tiny_student_dir, grocery_root):
    from quantize.calibration import calibration_sets
    from quantize.sim import Ranges, simulate
    from train.checkpoint import load_model

    model, cfg, tax, _ = load_model(tiny_student_dir)
    cal, _ = calibration_sets(str(grocery_root), cfg.image_size, tax, 8, 0)
    fams = [f for f in families(model) if f.prefixes]
    w = gptq_weights(model, cal.images, fams)
    first = fams[0]  # the backbone's stem
    # the studies simulate GPTQ as the quantized families of a copy carrying its weights
    sim = dict(simulate(with_weights(model, w, [first]), Ranges(), {first.name}, weights_only=True).named_modules())
    mods = dict(model.named_modules())
    folds = fold_factors(model)
    for n in w:
        if first.owns(n):  # GPTQ's weights, unchanged by the simulation's own rounding (they are on its grid)
            torch.testing.assert_close(sim[n].weight, w[n], rtol=1e-6, atol=1e-9)
        else:  # float families keep their fp32 weights
            assert torch.equal(sim[n].weight, mods[n].weight)
    # without GPTQ weights the simulation rounds to nearest on the observers' grid
    near = dict(simulate(model, Ranges(), {first.name}, weights_only=True).named_modules())
    stem = "backbone._conv_stem"
    assert torch.equal(near[stem].weight, fq_weight(mods[stem].weight, folds[stem], OBSERVER_EPS))
    assert not torch.equal(near[stem].weight, sim[stem].weight)
