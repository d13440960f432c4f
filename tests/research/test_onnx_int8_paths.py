"""research/onnx_int8_paths.py: the shipped int8 ONNX model run fused, unfused and exact."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_three_paths_are_timed_and_judged_against_the_exact_one(grocery_root, tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(ROOT / "research/onnx_int8_paths.py"), "--model", str(ROOT / "demo/model"),
                        "--data", str(grocery_root), "--limit", "6", "--rounds", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["photos"] == 6 and set(res["paths"]) == {"fused", "unfused", "exact"}
    assert res["paths"]["exact"]["agreement_with_exact"] == 1.0
    for v in res["paths"].values():
        assert 0 <= v["fine_top1"] <= 1 and v["median_ms"] > 0
    assert "unfused" in r.stdout and "VNNI" in r.stdout
