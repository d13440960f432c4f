"""research/students.py: the distillation / size-ladder table is computed from the runs, not typed in."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_table_reports_each_runs_own_parameters_macs_and_metrics(tiny_student_dir, tmp_path):
    from research.benchmark_figures import count_macs
    from sdk import Taxonomy
    from train.checkpoint import load_model

    out = tmp_path / "students"
    r = subprocess.run([sys.executable, str(ROOT / "research/students.py"), f"tiny={tiny_student_dir}",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "students.json").read_text())["tiny"]
    model, _, _, conf = load_model(tiny_student_dir)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["macs"] == count_macs(conf["model"], Taxonomy.load(tiny_student_dir / "taxonomy.json")) > 0
    assert row["image_size"] == 128 and row["teacher"] is None
    val = conf["metrics"]["val"]
    md = (out / "students.md").read_text()
    assert f"| {val['top1/fine']:.3f} |" in md and f"{row['macs'] / 1e6:.0f}" in md


def test_unfinished_or_foreign_directory_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "research/students.py"), f"x={tmp_path}", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no config.json" in r.stderr
