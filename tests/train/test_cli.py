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


def test_evaluate_on_the_photos_a_list_names(tiny_student_dir, grocery_root, tmp_path):
    """The held-out slice is judged with `--split train --list holdout.txt`."""
    from sdk import load_dataset
    picked = [s.source for s in load_dataset(grocery_root, "train").samples[::500]]
    (tmp_path / "slice.txt").write_text("\n".join(picked) + "\n")
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, "-m", "train", "evaluate", "--model", str(tiny_student_dir), "--data",
                    str(grocery_root), "--split", "train", "--list", str(tmp_path / "slice.txt"), "--json", str(out)],
                   check=True, capture_output=True, text=True)
    import json
    assert json.loads(out.read_text())["n"] == len(picked)
    (tmp_path / "none.txt").write_text("/nowhere/x.jpg\n")
    r = subprocess.run([sys.executable, "-m", "train", "evaluate", "--model", str(tiny_student_dir), "--data",
                        str(grocery_root), "--split", "train", "--list", str(tmp_path / "none.txt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "none of its paths" in r.stderr and "Traceback" not in r.stderr
