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


def test_ensemble_averages_the_teachers_probabilities():
    from train.distill import ensemble
    a = [torch.log_softmax(torch.randn(4, n), -1) for n in (3, 5)]
    b = [torch.log_softmax(torch.randn(4, n), -1) for n in (3, 5)]
    for l, lp in enumerate(ensemble([a, b])):
        torch.testing.assert_close(lp.exp(), (a[l].exp() + b[l].exp()) / 2)
    torch.testing.assert_close(ensemble([a])[1], a[1])


@pytest.mark.slow
def test_live_distillation_runs_the_teachers_on_the_students_view(tmp_path, tiny_student_dir, grocery_root, monkeypatch):
    """Whole network, live augmentation: the teachers see each step's own view at their own size, no cache."""
    import train.distill as td
    monkeypatch.chdir(tmp_path)
    seen = []
    real_call = td.LiveTeachers.__call__

    def spy(self, batch):
        seen.append([tuple(batch.render(size).shape) for _, size in self.models])
        return real_call(self, batch)

    monkeypatch.setattr(td.LiveTeachers, "__call__", spy)
    mc = ModelConfig(image_size=64, d_model=32, heads=2)
    tc = TrainConfig(data=str(grocery_root), epochs=1, limit_per_class=1, limit_val=8, threads=1, cutmix=1.0,
                     holdout_fraction=0.0, losses="ce", loss_weights="kd=1")
    out = tmp_path / "distilled"
    distill([tiny_student_dir, tiny_student_dir], mc, tc, out, log=lambda *a: None)
    assert seen and all(s == [(len_, 3, 128, 128)] * 2 for s in seen for len_ in [s[0][0]])
    info = json.loads((out / "distill.json").read_text())
    assert len(info["teachers"]) == 2 and len(info["teacher_sha256"]) == 2
    assert not (tmp_path / ".cache").exists()


def test_distill_cli_without_a_teacher_exits_2(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "train", "distill", "--data", "synthetic", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "teacher" in r.stderr and "Traceback" not in r.stderr
