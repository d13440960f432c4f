"""`python -m sdk classify|info|calibrate`: output, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdk", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_classify_prints_the_path(onnx_artifact_dir, banana_jpg):
    r = run("classify", banana_jpg, "--model", onnx_artifact_dir)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"{banana_jpg}: ")
    assert "›" in line or "uncertain" in line or "unknown item" in line


def test_classify_json_and_progress_for_many_images(onnx_artifact_dir, banana_jpg, tmp_path):
    imgs = []
    for i in range(9):
        f = tmp_path / f"b{i}.jpg"
        shutil.copy(banana_jpg, f)
        imgs.append(f)
    r = run("classify", *imgs, "--model", onnx_artifact_dir, "--json", "--allow", "Fruit")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(f) for f in imgs]
    assert all(row["full_path"][0]["label"] == "Fruit" for row in rows)
    assert "classifying [" in r.stderr and "9/9" in r.stderr


def test_classify_bad_images_one_line_each_and_exit_1(onnx_artifact_dir, banana_jpg, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    r = run("classify", banana_jpg, bad, tmp_path / "missing.jpg", "--model", onnx_artifact_dir)
    assert r.returncode == 1
    assert r.stdout.count("\n") == 1  # the good image is still answered
    errs = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errs) == 2 and "InvalidImageError" in errs[0] and "FileNotFoundError" in errs[1]
    assert "Traceback" not in r.stderr


def test_bad_model_exits_2_without_traceback(tmp_path, banana_jpg):
    r = run("classify", banana_jpg, "--model", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ModelNotFoundError:") and r.stderr.count("\n") == 1
    assert "does not exist" in r.stderr and "demo/model" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("info", tmp_path)
    assert r.returncode == 2 and "manifest not found" in r.stderr and "Traceback" not in r.stderr
    r = run("info", "--model", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: ModelNotFoundError:") and "Traceback" not in r.stderr


def test_info(onnx_artifact_dir):
    r = run("info", onnx_artifact_dir)
    assert r.returncode == 0, r.stderr
    assert "onnx (fp32)" in r.stdout and "category (3) > coarse (43) > fine (81)" in r.stdout
    r = run("info", onnx_artifact_dir / "manifest.json", "--json")
    assert json.loads(r.stdout)["target"] == "onnx"


def test_every_command_takes_model_option(onnx_artifact_dir):
    r = run("info", "--model", onnx_artifact_dir)
    assert r.returncode == 0, r.stderr
    assert "onnx (fp32)" in r.stdout and r.stdout == run("info", onnx_artifact_dir).stdout
    assert json.loads(run("info", "--model", onnx_artifact_dir / "manifest.json", "--json").stdout)["target"] == "onnx"
    r = run("info", onnx_artifact_dir, "--model", onnx_artifact_dir / "other")
    assert r.returncode == 2 and "two models" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [("info",), ("classify", "photo.jpg"), ("calibrate", "--data", "somewhere")])
def test_missing_model_option_is_a_usage_error_that_says_what_to_pass(args):
    r = run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"python -m sdk {args[0]}: error: --model DIR is required" in r.stderr
    assert "manifest.json" in r.stderr and "demo/model" in r.stderr


@pytest.mark.slow
def test_calibrate_needs_no_matplotlib_and_writes_only_the_manifest(model_copy, grocery_root, monkeypatch, capsys):
    from sdk.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["calibrate", "--model", str(model_copy), "--data", str(grocery_root), "--limit", "12",
                 "--ood-per-kind", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "wrote thresholds to" in out
    assert not (model_copy / "calibration").exists()
    assert json.loads((model_copy / "manifest.json").read_text())["decoding"]["thresholds"]


@pytest.mark.slow
def test_calibrate_cli_writes_manifest_and_report(model_copy, grocery_root, banana_jpg, tmp_path):
    listing = tmp_path / "slice.txt"  # like a run's holdout.txt: absolute paths of some train photos
    listing.write_text("\n".join(str(grocery_root / f"train/Fruit/Banana/Banana_{i:03d}.jpg") for i in (1, 2, 3)) + "\n")
    r = run("calibrate", "--model", model_copy, "--data", grocery_root, "--split", "val", "--limit", "40",
            "--ood-per-kind", "2", "--target-precision", "0.98", "--report-json", tmp_path / "rep.json",
            "--eval-split", "train", "--eval-list", listing)
    assert r.returncode == 0, r.stderr
    assert "evaluation on" in r.stdout and "3 images" in r.stdout
    assert json.loads((tmp_path / "rep.json").read_text())["calibration"]["eval"]["train"]["n"] == 3
    dec = json.loads((model_copy / "manifest.json").read_text())["decoding"]
    assert len(dec["thresholds"]) == 3 and dec["calibration"]["target_precision"] == 0.98
    assert dec["unknown_score"] and dec["unknown_threshold"] is not None
    assert "generated" in dec["calibration"]["out_of_catalogue"]
    assert json.loads((tmp_path / "rep.json").read_text())["thresholds"] == dec["thresholds"]
    assert "back-off   category=" in run("info", model_copy).stdout
    assert run("classify", banana_jpg, "--model", model_copy).returncode == 0
    r = run("calibrate", "--model", model_copy, "--data", tmp_path, "--split", "val")
    assert r.returncode == 2 and "Traceback" not in r.stderr
