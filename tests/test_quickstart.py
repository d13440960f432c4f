"""The README's first command, end to end: train on the embedded synthetic data, export, classify."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_says_what_to_do_next(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--out", str(tmp_path / "qs"),
                        "--epochs", "2"], capture_output=True, text=True, check=True)
    assert "sample image (truth:" in r.stdout and " -> " in r.stdout
    assert (tmp_path / "qs" / "onnx" / "manifest.json").is_file()
    last = r.stdout.strip().splitlines()[-4:]
    assert last[0] == "Next:" and any("--model demo/model" in l for l in last)
