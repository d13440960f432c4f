"""research/onnx_int8_schemes.py on a real fp32 ONNX export of the tiny student."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "research/onnx_int8_schemes.py")


def test_schemes_are_judged_against_the_fp32_graph(onnx_artifact_dir, tiny_student_dir, grocery_root):
    r = subprocess.run([sys.executable, SCRIPT, "--onnx", str(onnx_artifact_dir / "model.onnx"),
                        "--reference", str(onnx_artifact_dir / "model.onnx"),
                        "--taxonomy", str(tiny_student_dir / "taxonomy.json"), "--data", str(grocery_root),
                        "--schemes", "u8u8,s8s8", "--calibration-images", "24", "--limit", "24",
                        "--calibrate-methods", "MinMax,Percentile"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(24 photos)" in r.stdout  # the size came from the graph (128 px) and the limit was applied
    assert re.search(r"before int8: fine agreement with the reference 100\.0 %", r.stdout)  # same graph
    rows = re.findall(r"^(\S+)\s+(\S+)\s+fine agreement with fp32\s+([\d.]+) % \((\d+) changed\), KL ([\d.e+-]+)",
                      r.stdout, re.M)
    agr = {(m[0], m[1]): float(m[2]) for m in rows}
    assert set(agr) == {(s, m) for s in ("u8u8", "s8s8") for m in ("MinMax", "Percentile")}, r.stdout
    for scheme, method, a, changed, kl in rows:  # the changed count and the KL describe the same answers
        assert round((1 - int(changed) / 24) * 100, 2) == float(a) and float(kl) >= 0.0
    # U8U8 cannot saturate on any CPU; the barely trained tiny student flips a few near-ties at most
    assert agr["u8u8", "MinMax"] >= 75.0 and agr["u8u8", "Percentile"] >= 75.0, r.stdout


def test_unknown_scheme_and_missing_graph_are_usage_errors(onnx_artifact_dir, tiny_student_dir, tmp_path):
    base = ["--taxonomy", str(tiny_student_dir / "taxonomy.json"), "--data", str(tmp_path)]
    r = subprocess.run([sys.executable, SCRIPT, "--onnx", str(tmp_path / "nope.onnx"), *base],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "nope.onnx: no such file" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "--onnx", str(onnx_artifact_dir / "model.onnx"), "--schemes",
                        "u8u8,int4", *base], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown scheme(s) ['int4']" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "--onnx", str(onnx_artifact_dir / "model.onnx"), "--calibrate-methods",
                        "MinMax,Median", *base], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--calibrate-methods: choose from" in r.stderr
