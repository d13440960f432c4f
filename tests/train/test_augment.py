"""Live augmentation (train.augment) and the fast-training switches (precision, channels_last)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train.loop as loop
from sdk import prepare
from train.augment import OPS, Augmenter, ImageBank, Views, draw_mix, mix, render
from train.data import load_dataset
from train.models import ModelConfig


@pytest.fixture(scope="module")
def photos(grocery_root):
    return load_dataset(grocery_root, "val").samples[:8]


def test_bank_holds_the_devices_exact_input(photos):
    bank = ImageBank(photos, 96, threads=1)
    for i in (0, 5):
        assert np.array_equal(bank.images[i].numpy(), prepare(photos[i].source, 96))


def test_bank_refuses_to_exceed_its_memory_bound(photos):
    with pytest.raises(MemoryError, match="--memory-mb"):
        ImageBank(photos, 2048, max_mb=10)


def test_identity_recipe_renders_the_photo_unchanged(photos):
    bank = ImageBank(photos[:4], 64, threads=1)
    views = Augmenter("none").draw(4, torch.Generator().manual_seed(0))
    out = render(bank.batch(torch.arange(4)), views, 64)
    assert (out - bank.batch(torch.arange(4))).abs().max() < 1e-3


def test_draws_follow_the_seed_and_crops_stay_inside_the_photo():
    aug = Augmenter("basic", crop_scale=0.25)
    a = aug.draw(64, torch.Generator().manual_seed(3))
    b = aug.draw(64, torch.Generator().manual_seed(3))
    c = aug.draw(64, torch.Generator().manual_seed(4))
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    half_w, half_h = a.theta[:, 0, 0].abs(), a.theta[:, 1, 1].abs()
    assert ((a.theta[:, 0, 2].abs() + half_w) <= 1 + 1e-6).all() and ((a.theta[:, 1, 2].abs() + half_h) <= 1 + 1e-6).all()
    area = half_w * half_h
    assert area.min() >= 0.25 - 1e-6 and area.max() <= 1 + 1e-6
    assert (a.theta[:, 0, 0] < 0).any() and (a.theta[:, 0, 0] > 0).any()  # some flipped, some not
    assert ((a.jitter >= 0.7 - 1e-6) & (a.jitter <= 1.3 + 1e-6)).all()
    assert torch.equal(a.op, torch.zeros(64, dtype=torch.long))  # basic: no TrivialAugment op


def test_trivial_policy_uses_every_operation_and_keeps_pixels_in_range(photos):
    views = Augmenter("trivial").draw(512, torch.Generator().manual_seed(0))
    assert set(views.op.tolist()) == set(range(len(OPS)))
    bank = ImageBank(photos, 48, threads=1)
    idx = torch.arange(len(photos)).repeat(64)
    out = render(bank.batch(idx), views, 40)
    assert out.shape == (512, 3, 40, 40) and out.min() >= 0 and out.max() <= 255
    with pytest.raises(ValueError, match="policy"):
        Augmenter("randaugment")


def test_one_recipe_gives_the_same_view_at_a_teachers_and_a_students_resolution(photos):
    """The teacher at 2x the student's size sees the same crop: downsampled, it is the student's view."""
    bank = ImageBank(photos, 256, threads=1)
    views = Augmenter("basic").draw(len(photos), torch.Generator().manual_seed(1))
    views = Views(views.theta, torch.ones_like(views.jitter), views.op, views.strength)
    small = render(bank.batch(torch.arange(len(photos))), views, 64)
    large = F.avg_pool2d(render(bank.batch(torch.arange(len(photos))), views, 128), 2)
    other = render(bank.batch(torch.arange(len(photos)).roll(1)), views, 64)
    err = (small - large).abs().mean()
    assert err < 6 and err < 0.4 * (small - other).abs().mean()


def test_cutmix_weight_is_the_area_kept_and_mixing_is_resolution_free():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = draw_mix(4, 0.0, 1.0, g)
        x = torch.zeros(4, 3, 50, 50)
        x[m.pair.argsort()] = 0  # noqa: the partner rows are zeros, the photos themselves ones below
        x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 100, 100).clone()
        out = mix(x, m)
        own = (out == x).float().mean((1, 2, 3))
        moved = m.pair != torch.arange(4)
        if moved.any():
            assert own[moved].mean().item() == pytest.approx(m.lam, abs=0.03)
    m = draw_mix(8, 0.4, 0.0, torch.Generator().manual_seed(1))
    assert m.box is None and 0 <= m.lam <= 1
    x = torch.rand(8, 3, 4, 4)
    assert torch.allclose(mix(x, m), m.lam * x + (1 - m.lam) * x[m.pair])
    assert draw_mix(8, 0.0, 0.0, g) is None and mix(x, None) is x


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    assert loop.resolve_precision("fp32", cpu) == "fp32" and loop.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert loop.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert loop.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"amx_bf16"})
    assert loop.resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        loop.resolve_precision("fp8", cpu)


@pytest.mark.slow
def test_live_whole_network_run_records_precision_speed_and_trains_every_block(tmp_path, grocery_root):
    mc = ModelConfig(image_size=64, d_model=32, heads=2, global_head=True)
    tc = loop.TrainConfig(data=str(grocery_root), epochs=1, limit_per_class=1, limit_val=16, threads=1,
                          precision="bf16", augment="trivial", cutmix=1.0, losses="ce,global_ce")
    before = {k: v.clone() for k, v in loop.build_model(load_dataset(grocery_root, "train").taxonomy, mc).state_dict().items()}
    lines = []
    loop.train_model(mc, tc, tmp_path / "m", log=lines.append)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["precision"] == "bf16" and conf["train"]["channels_last"] is True
    assert conf["history"][0]["images_per_second"] > 0
    assert any("img/s" in l for l in lines) and any(l.startswith("precision bf16") for l in lines)
    from safetensors.torch import load_file
    after = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not torch.equal(after["backbone._conv_stem.weight"], before["backbone._conv_stem.weight"]), \
        "the stem did not train: the whole network must be trained on the live path"
    assert not (tmp_path / ".cache").exists()
