"""research/int8_noise_floor.py on the tiny student: the perturbations are what they say, and they scale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "research/int8_noise_floor.py")
import research.int8_noise_floor as nf  # noqa: E402


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    from train.checkpoint import load_model
    model, cfg, tax, _ = load_model(str(tiny_student_dir))
    return model.eval(), cfg, tax


def _layers(model):
    from quantize.sim import families
    fams = [f for f in families(model) if f.prefixes]
    return fams, [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and any(f.owns(n) for f in fams)]


def test_the_perturbations_have_the_size_they_claim(student):
    from quantize.sim import fold_factors, fq_weight, weight_scale
    model, _, _ = student
    _, layers = _layers(model)
    mods = dict(model.named_modules())
    before = {n: mods[n].weight.detach().clone() for n in layers}
    folds = fold_factors(model)
    g = torch.Generator().manual_seed(0)
    quarter = nf.perturbed_weights(model, layers, "noise", 0.25, g)
    again = nf.perturbed_weights(model, layers, "noise", 0.25, torch.Generator().manual_seed(0))
    other = nf.perturbed_weights(model, layers, "noise", 0.25, torch.Generator().manual_seed(1))
    rtn = nf.perturbed_weights(model, layers, "int8-nearest")
    half = nf.perturbed_weights(model, layers, "fp16")
    assert set(quarter) == set(layers) and len(layers) > 20
    for n in layers:
        w = before[n]
        assert torch.equal(mods[n].weight, w)  # the model itself is not touched
        step = weight_scale(w, folds.get(n)).reshape(-1, *([1] * (w.dim() - 1)))
        err = (quarter[n] - w).abs()
        assert (err <= 0.125 * step + 1e-7).all() and err.max() > 0.05 * step.max()
        assert torch.equal(quarter[n], again[n])  # the draw follows the seed
        assert torch.equal(rtn[n], fq_weight(w, folds.get(n)))
        assert torch.equal(half[n], w.half().float())
    assert any(not torch.equal(quarter[n], other[n]) for n in layers)


def test_bias_correction_moves_the_means_and_the_copy_carries_the_weights(student, grocery_root):
    from quantize.calibration import calibration_sets
    model, cfg, tax = student
    fams, layers = _layers(model)
    cal, _ = calibration_sets(str(grocery_root), cfg.image_size, tax, 8, 0)
    w = nf.perturbed_weights(model, layers, "noise", 1.0, torch.Generator().manual_seed(0))
    plain = nf.perturbed(model, w, fams)
    corrected = nf.perturbed(model, w, fams, cal.images)
    pm, cm, om = dict(plain.named_modules()), dict(corrected.named_modules()), dict(model.named_modules())
    for n in layers:
        assert torch.equal(pm[n].weight, w[n]) and torch.equal(cm[n].weight, w[n])
    bns = [n for n, m in om.items() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(pm[n].running_mean, om[n].running_mean) for n in bns)
    assert any(not torch.equal(cm[n].running_mean, om[n].running_mean) for n in bns)


def test_noise_floor_on_real_photos(tiny_student_dir, grocery_root, tmp_path):
    out = tmp_path / "n.json"
    r = subprocess.run([sys.executable, "-W", "ignore", SCRIPT, "--checkpoint", str(tiny_student_dir),
                        "--data", str(grocery_root), "--alphas", "4,0.0625", "--draws", "2",
                        "--calibration-images", "8", "--limit", "12", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["allowed_changes"] == {"val": 0, "train20": 0}  # 1 % of 12 photos
    assert "8 photos (calibration)" in rec["bias_correction"]
    assert set(rec["fixed"]) == {"fp16", "int8-nearest"} and set(rec["noise"]) == {"4", "0.0625"}
    for split in ("val", "train20"):
        assert rec["fixed"]["fp16"][split]["n"] == 12
        # float16 weights are a far smaller perturbation than int8 rounding
        assert rec["fixed"]["fp16"][split]["fine_kl"] < rec["fixed"]["int8-nearest"][split]["fine_kl"] / 10
        big, small = rec["noise"]["4"]["summary"][split], rec["noise"]["0.0625"]["summary"][split]
        # 64x the noise: far more than 64x the KL (the KL grows about with its square)
        assert big["mean_fine_kl"] > 64 * small["mean_fine_kl"] > 0
        assert len(rec["noise"]["4"]["draws"]) == 2
        c = [d[split]["changed"] for d in rec["noise"]["4"]["draws"]]
        assert big["min_changed"] == min(c) and big["max_changed"] == max(c) and big["mean_changed"] == sum(c) / 2
        assert big["share_within_bar"] == sum(x <= 0 for x in c) / 2
        for d in rec["noise"]["4"]["draws"]:  # on 12 photos the bar allows no change and no loss
            assert d[split]["meets_bar"] == (d[split]["changed"] == 0 and d[split]["fine_top1_drop"] <= 0)
        assert big["share_meeting_bar"] <= big["share_within_bar"]
    assert "| noise × 4 int8 step (2 draws) |" in r.stdout


@pytest.mark.parametrize("alphas", ["0", "-1", "nan", "x", ","])
def test_bad_noise_levels_are_usage_errors(tiny_student_dir, grocery_root, alphas):
    r = subprocess.run([sys.executable, SCRIPT, "--checkpoint", str(tiny_student_dir), "--data", str(grocery_root),
                        "--alphas", alphas], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr


def test_families_limits_the_perturbation_and_unknown_names_are_usage_errors(tiny_student_dir, grocery_root, tmp_path):
    out = tmp_path / "n.json"
    r = subprocess.run([sys.executable, "-W", "ignore", SCRIPT, "--checkpoint", str(tiny_student_dir),
                        "--data", str(grocery_root), "--alphas", "1", "--draws", "1", "--calibration-images", "8",
                        "--limit", "6", "--families", "CAMP block; query FFNs", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert set(rec["families"]) == {"query FFNs", "CAMP block"}
    from train.checkpoint import load_model
    model = load_model(str(tiny_student_dir))[0]
    fams, layers = _layers(model)
    mine = [n for n in layers if any(f.owns(n) for f in fams if f.name in ("CAMP block", "query FFNs"))]
    assert 0 < rec["layers"] == len(mine) < len(layers)
    r = subprocess.run([sys.executable, SCRIPT, "--checkpoint", str(tiny_student_dir), "--data", str(grocery_root),
                        "--families", "CAMP block;no such family"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown layer families ['no such family']" in r.stderr
