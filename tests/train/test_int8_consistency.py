"""--int8-consistency: the int8 view rounds like the backends, reaches the float weights, measures rounding
only (same dropout masks, BatchNorm statistics untouched), the frozen prefix is cached in int8, and
training with the term lowers the KL it trains against."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train.int8_consistency as ic
import train.loop as loop
from train.backbones import normalize_uint8
from train.checkpoint import load_model
from train.data import load_dataset, load_view
from train.models import ModelConfig, build_model


def test_int8_weights_sit_on_a_per_channel_grid_with_a_straight_through_gradient():
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3) * torch.logspace(-3, 1, 6).reshape(6, 1, 1, 1)).requires_grad_()
    q = ic.int8_weight(w)
    scale = w.detach().abs().reshape(6, -1).amax(1) / 127
    steps = q.detach() / scale.reshape(6, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127 + 1e-3
    assert torch.allclose(q.detach().abs().reshape(6, -1).amax(1), scale * 127)  # each channel's max kept
    assert ((q.detach() - w.detach()).abs() <= scale.reshape(6, 1, 1, 1) / 2 + 1e-7).all()
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))

    x = torch.tensor([[-1.0, 0.2, 3.0]]).requires_grad_()
    xq = ic.int8_activation(x)
    k = xq.detach() / (4.0 / 255)  # the range [-1, 3] in 255 steps, on a grid that holds 0 exactly
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert torch.allclose(xq.detach(), x.detach(), atol=4.0 / 255 / 2 + 1e-6)
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.fixture
def small_model(grocery_root):
    ds = load_dataset(str(grocery_root), "val")
    model = build_model(ds.taxonomy, ModelConfig(image_size=96, d_model=32, heads=2, global_head=True,
                                                 dropout=0.3), pretrained=True)
    loop.freeze_prefix(model, 11)
    loop.set_train_mode(model, 11)  # dropout on, the trainable blocks' BatchNorms on batch statistics
    imgs = np.stack([load_view(s, 96, 0, 0) for s in ds.samples[:8]])
    return model, normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2))


def test_the_int8_pass_differs_from_the_float_pass_by_rounding_only(small_model, monkeypatch):
    model, x = small_model
    bn = model.backbone._blocks[12]._bn1
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    device = torch.device("cpu")

    rng = ic.rng_snapshot(device)
    fp = model(x)
    after_fp = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    assert not torch.equal(after_fp[0], before[0])  # the float pass did update them (train mode)
    kl = ic.consistency_loss(model, fp, (x,), {}, rng, device)
    assert kl.item() > 1e-5
    # the int8 pass left the running statistics as the float pass set them
    assert torch.equal(bn.running_mean, after_fp[0]) and torch.equal(bn.running_var, after_fp[1])
    assert int(bn.num_batches_tracked) == after_fp[2]
    kl.backward()  # straight through the rounding to the float weights of the trainable part
    assert model.backbone._blocks[12]._project_conv.weight.grad.abs().sum() > 0
    assert model.backbone._blocks[0]._project_conv.weight.grad is None  # frozen

    # with rounding switched off the int8 pass is the float pass: same dropout masks, same statistics
    monkeypatch.setattr(ic, "int8_weight", lambda w: w)
    monkeypatch.setattr(ic, "int8_activation", lambda t: t)
    rng = ic.rng_snapshot(device)
    fp = model(x)
    assert ic.consistency_loss(model, fp, (x,), {}, rng, device).abs().item() < 1e-6
    # ... and a different draw of dropout masks would not be (the snapshot is what makes it 0)
    assert ic.consistency_loss(model, fp, (x,), {}, ic.rng_snapshot(device), device).item() > 1e-4


def test_the_frozen_prefix_is_cached_in_int8_beside_the_float_features(tmp_path, grocery_root, monkeypatch):
    monkeypatch.setattr(loop, "CACHE_ROOT", tmp_path / "cache")
    ds = load_dataset(str(grocery_root), "val")
    ds = ds.subset(range(0, 40, 5))
    model = build_model(ds.taxonomy, ModelConfig(image_size=96, d_model=32, heads=2), pretrained=True)
    fp = loop.FeatureCache(model, ds, 96, 11, 1, 0)
    q = loop.FeatureCache(model, ds, 96, 11, 1, 0, int8=True)
    assert fp.key != q.key
    a, b = fp.view(0)["x"].float(), q.view(0)["x"].float()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [f"{fp.key}-view0.safetensors", f"{q.key}-view0.safetensors"])
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 0.3, rel  # rounded, not another function
    imgs = np.stack([load_view(s, 96, 0, 0) for s in ds.samples])
    with torch.no_grad():
        direct = ic.int8_prefix(model.backbone.eval(), normalize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2)), 11)
    assert torch.allclose(b, direct[10].half().float())


@pytest.mark.slow
def test_a_run_with_the_term_trains_its_int8_pass_on_the_int8_prefix_cache(tmp_path, grocery_root, monkeypatch):
    """End to end through `train_model`: the second run builds the int8 prefix cache next to the shared
    float one and pays the term in its loss. Whether the term buys int8 agreement is a measurement, not
    a test (README, session 21: on `runs/student` it did not)."""
    monkeypatch.setattr(loop, "CACHE_ROOT", tmp_path / "cache")
    calls = []
    real = ic.consistency_loss
    monkeypatch.setattr(loop, "consistency_loss", lambda model, logps, args, *a: calls.append(args[0]) or real(
        model, logps, args, *a))
    mc = ModelConfig(image_size=96, d_model=32, heads=2, global_head=True)
    losses, files = {}, {}
    for w in (0.0, 100.0):
        tc = loop.TrainConfig(data=str(grocery_root), epochs=1, limit_per_class=2, limit_val=8, cache_views=1,
                              threads=2, lr=3e-3, int8_consistency=w)
        before = set((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else set()
        loop.train_model(mc, tc, tmp_path / f"w{w:g}", log=lambda *a: None)
        files[w] = set((tmp_path / "cache").glob("*")) - before
        losses[w] = load_model(tmp_path / f"w{w:g}")[3]["history"][0]["loss"]
    # the first run caches the float train and val features; the second adds only the int8 train features
    assert len(files[0.0]) == 2 and len(files[100.0]) == 1
    int8_x = load_file(str(files[100.0].pop()))["x"].float()
    float_x = max((load_file(str(f))["x"].float() for f in files[0.0]), key=len)
    # once per step, only in the run with the term, and fed the int8 features: one epoch sees every photo once
    fed = torch.cat(calls).float()
    assert len(calls) == -(-len(int8_x) // 32) and fed.shape == int8_x.shape
    order = lambda t: t[t.flatten(1).sum(1).argsort()]  # noqa: E731
    assert torch.equal(order(fed), order(int8_x))
    assert not torch.allclose(order(fed), order(float_x), atol=1e-2)
    assert losses[100.0] > losses[0.0] + 0.1, losses
