import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_evaluate_checkpoint_and_artifact_agree(tmp_path, tiny_student_dir, onnx_artifact_dir, grocery_root):
    res = {}
    for name, model in [("torch", tiny_student_dir), ("onnx", onnx_artifact_dir)]:
        js = tmp_path / f"{name}.json"
        subprocess.run([sys.executable, "-m", "train", "evaluate", "--model", str(model), "--data", str(grocery_root),
                        "--split", "val", "--limit", "40", "--json", str(js)], check=True, capture_output=True)
        res[name] = json.loads(js.read_text())
    for key in ("top1/category", "top1/coarse", "top1/fine", "full_path", "mistake_severity", "hF1"):
        assert key in res["torch"]
    assert abs(res["torch"]["top1/fine"] - res["onnx"]["top1/fine"]) <= 1 / 40


def test_evaluate_missing_split_names_available_ones(tiny_student_dir, grocery_root):
    r = subprocess.run([sys.executable, "-m", "train", "evaluate", "--model", str(tiny_student_dir),
                        "--data", str(grocery_root), "--split", "nosuchsplit"], capture_output=True, text=True)
    assert r.returncode != 0 and "nosuchsplit" in r.stderr and "val" in r.stderr


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.quickstart", "--out", str(tmp_path / "qs"), "--epochs", "2"],
                       capture_output=True, text=True, check=True)
    assert "sample image (truth:" in r.stdout and " -> " in r.stdout
    assert (tmp_path / "qs" / "onnx" / "manifest.json").is_file()
