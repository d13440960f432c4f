"""research/int8_float_sets.py on the tiny student: the simulation with nothing int8 agrees with fp32."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "research/int8_float_sets.py")


def test_the_thirds_split_the_backbone_each_layer_once():
    import torch

    from research.int8_float_sets import families_in_thirds
    from train.__main__ import SUBCOMMANDS
    from train.data import synthetic_taxonomy
    from train.models import build_model

    model = build_model(synthetic_taxonomy(), SUBCOMMANDS["student"][1], pretrained=False)
    fams = families_in_thirds(model)
    assert sum(f.name.startswith("backbone") for f in fams) == 3
    owners = {n: [f.name for f in fams if f.owns(n)] for n, m in model.named_modules()
              if n.startswith("backbone.") and isinstance(m, torch.nn.Conv2d)}
    assert owners and all(len(o) == 1 for o in owners.values()), owners


def test_float_sets_on_real_photos(tiny_student_dir, grocery_root, tmp_path):
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, "-W", "ignore", SCRIPT, "--checkpoint", str(tiny_student_dir),
                        "--data", str(grocery_root), "--sets", "all,none,backbone,weights-only",
                        "--calibration-images", "16", "--limit", "12", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    # quantize's default: every quantized layer family gets the weight-rounding bias correction
    assert any(f.startswith("backbone") for f in rec["bias_correction"]) and "CAMP block" in rec["bias_correction"]
    assert "16 photos (calibration)" in rec["calibration"]
    sets = rec["sets"]
    assert list(sets) == ["all", "none", "backbone", "weights-only"]
    # nothing quantized: the simulation must reproduce fp32 exactly
    assert sets["all"]["quantized_families"] == []
    for split in ("val", "train20"):
        s = sets["all"]["splits"][split]
        assert s["n"] == 12 and s["fine_agreement"] == 1.0 and s["disagreeing"] == 0 and abs(s["fine_kl"]) < 1e-9
    # every int8 set really quantizes something and perturbs the fine distribution
    assert not any(f.startswith("backbone") for f in sets["backbone"]["quantized_families"])
    assert any(f.startswith("backbone") for f in sets["none"]["quantized_families"])
    assert sets["weights-only"]["weights_only"] is True
    for name in ("none", "backbone", "weights-only"):
        for s in sets[name]["splits"].values():
            assert s["fine_kl"] > 0 and 0.0 <= s["fine_agreement"] <= 1.0
            assert s["disagreeing"] == round((1 - s["fine_agreement"]) * s["n"])
    assert "| float set |" in r.stdout and "| none |" in r.stdout


def test_unknown_float_set_is_a_usage_error(tiny_student_dir, grocery_root):
    r = subprocess.run([sys.executable, SCRIPT, "--checkpoint", str(tiny_student_dir), "--data", str(grocery_root),
                        "--sets", "none,attention"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown float set(s) ['attention']" in r.stderr
