"""research/int8_disagreements.py on a real export: an fp32 ONNX artifact changes no answer of its checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fp32_export_changes_no_answer(tiny_student_dir, onnx_artifact_dir, grocery_root, tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(ROOT / "research/int8_disagreements.py"), str(onnx_artifact_dir),
                        "--checkpoint", str(tiny_student_dir), "--data", str(grocery_root), "--limit", "16",
                        "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())[str(onnx_artifact_dir)]
    assert set(rec) == {"val", "train20"}
    for d in rec.values():
        assert d["n"] == 16 and d["disagreeing"] == 0 and d["fp32_gap_of_disagreeing"] == []
        assert d["sure_images"] == 0 or d["agreement_when_fp32_sure"] == 1.0
        assert abs(d["fine_kl"]) < 1e-6  # an fp32 export reproduces the distribution, not only the answers


def test_missing_artifact_is_a_usage_error(tiny_student_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "research/int8_disagreements.py"), str(tmp_path / "nope"),
                        "--checkpoint", str(tiny_student_dir), "--data", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "nope: not a directory" in r.stderr
