"""Distillation on real photos: teacher targets cached once, KL + labels, student written as safetensors."""

import json

import pytest
import torch

from train.distill import distill, kd_loss, teacher_targets
from train.losses import LossContext
from train.loop import TrainConfig, prepare_data
from train.models import ModelConfig


def test_kd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise():
    lp = [torch.log_softmax(torch.randn(4, n), -1) for n in (3, 5)]
    ctx = LossContext(None, lp, torch.zeros(4, 2, dtype=torch.long), {"teacher": {"logps": lp, "temperature": 4.0}}, None)
    assert float(kd_loss(ctx)) == pytest.approx(0.0, abs=1e-6)
    other = [torch.log_softmax(torch.randn(4, n), -1) for n in (3, 5)]
    ctx.aux["teacher"]["logps"] = other
    assert float(kd_loss(ctx)) > 0


@pytest.mark.slow
def test_distill_tiny_student_from_tiny_teacher(tmp_path, tiny_student_dir, grocery_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fresh feature/teacher cache folder
    mc = ModelConfig(image_size=96, d_model=32, heads=2)
    tc = TrainConfig(data=str(grocery_root), epochs=1, batch_size=32, limit_per_class=1, limit_val=16,
                     cache_views=2, freeze_blocks=11, holdout_fraction=0.0, losses="ce", loss_weights="kd=1")
    out = tmp_path / "distilled"
    distill(tiny_student_dir, mc, tc, out, temperature=4.0, log=lambda *a: None)
    conf = json.loads((out / "config.json").read_text())
    assert "kd" in conf["train"]["losses"] and conf["history"][0]["loss"] > 0
    assert (out / "model.safetensors").is_file() and (out / "taxonomy.json").is_file()
    # the teacher's targets were cached: a second call reads them back, identical
    _, train, _ = prepare_data(tc, None)
    again = teacher_targets(tiny_student_dir, train, 2, tc.seed, log=lambda *a: None)
    assert again[-1].shape == (2, len(train), 81)
    assert any((tmp_path / ".cache" / "teacher").iterdir())
