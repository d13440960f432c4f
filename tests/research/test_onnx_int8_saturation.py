"""research/onnx_int8_saturation.py: `quantize_graph`'s schemes on one convolution over real photos."""

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "research/onnx_int8_saturation.py")


def test_schemes_write_their_types_and_only_signed_weights_saturate(grocery_root, tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, SCRIPT, "--data", str(grocery_root), "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    s = res["schemes"]
    assert {k: v["zero_point_types"] for k, v in s.items()} == {
        "u8s8": ["int8", "uint8"], "s8s8": ["int8"], "u8s8-rr": ["int8", "uint8"], "u8u8": ["uint8"]}
    for name, v in s.items():  # executed as dequantize -> float conv, every scheme is a good quantization
        assert v["max_error_unoptimized"] < 0.03, (name, v)
    for name in ("u8s8-rr", "u8u8"):  # no int16 overflow possible in any kernel
        assert s[name]["max_error_optimized"] < 0.03, (name, s[name])
    if res["vnni"] is False and platform.machine().lower() in ("x86_64", "amd64"):
        # why the SDK runs such graphs unfused here (Int8FallbackWarning): if onnxruntime stops saturating, retire it
        assert s["u8s8"]["max_error_optimized"] > 0.05 and s["s8s8"]["max_error_optimized"] > 0.05, s


def test_unknown_scheme_is_a_usage_error(grocery_root):
    r = subprocess.run([sys.executable, SCRIPT, "--data", str(grocery_root), "--schemes", "u8u8,int4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown scheme(s) ['int4']" in r.stderr
