"""An int8 ONNX artifact on a CPU whose onnxruntime int8 kernels saturate: the SDK runs it unfused and says so."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

import sdk._backends as backends
from sdk import Classifier, Int8FallbackWarning, Manifest
from sdk._backends import cpu_has_vnni, int8_saturation_risk

U8S8 = {"scheme": "onnxruntime quantize_static, QDQ, U8 activations / S8 weights per channel, MinMax calibration",
        "onnx_types": {"activations": "uint8", "weights": "int8", "reduce_range": False}}


def _manifest(onnx_artifact_dir, precision="int8", quantization=U8S8, target="onnx") -> Manifest:
    m = Manifest.load(onnx_artifact_dir)
    m.precision, m.target = precision, target
    m.metrics = {**m.metrics, "quantization": quantization}
    return m


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_vnni(f) is False
    f.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(f) is True
    f.write_text("Hardware\t: some ARM board\n")
    assert cpu_has_vnni(f) is None
    assert cpu_has_vnni(tmp_path / "missing") is None


def test_risk_only_for_signed_int8_onnx_on_x86_without_vnni(onnx_artifact_dir):
    risky = _manifest(onnx_artifact_dir)
    assert "without VNNI" in int8_saturation_risk(risky, machine="x86_64", vnni=False)
    assert int8_saturation_risk(risky, machine="x86_64", vnni=True) is None
    assert int8_saturation_risk(risky, machine="x86_64", vnni=None) is None  # unknown CPU: no claim
    assert int8_saturation_risk(risky, machine="aarch64", vnni=False) is None
    # 7-bit weights still go through the same kernels (89 % measured): still a risk
    rr = {**U8S8, "onnx_types": {**U8S8["onnx_types"], "reduce_range": True}}
    assert int8_saturation_risk(_manifest(onnx_artifact_dir, quantization=rr), "x86_64", False)
    u8u8 = {"scheme": "…", "onnx_types": {"activations": "uint8", "weights": "uint8", "reduce_range": False}}
    assert int8_saturation_risk(_manifest(onnx_artifact_dir, quantization=u8u8), "x86_64", False) is None
    # manifests written before `onnx_types` existed: the scheme text says it
    old = {"scheme": U8S8["scheme"]}
    assert int8_saturation_risk(_manifest(onnx_artifact_dir, quantization=old), "x86_64", False)
    assert int8_saturation_risk(_manifest(onnx_artifact_dir, precision="fp32"), "x86_64", False) is None
    assert int8_saturation_risk(_manifest(onnx_artifact_dir, target="tflite"), "x86_64", False) is None


def _unfused(clf) -> str | None:
    opts = clf._backend.session.get_session_options()
    try:
        return opts.get_session_config_entry("session.disable_quant_qdq")
    except RuntimeError:  # never set
        return None


def test_classifier_load_runs_unfused_warns_once_and_still_runs(onnx_artifact_dir, tmp_path, monkeypatch, banana_jpg):
    d = tmp_path / "int8"
    shutil.copytree(onnx_artifact_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["precision"] = "int8"
    m.setdefault("metrics", {})["quantization"] = U8S8
    (d / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(backends, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(backends.platform, "machine", lambda: "x86_64")
    with pytest.warns(Int8FallbackWarning, match="int8.*without VNNI") as rec:
        clf = Classifier.load(d)
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the caller's load line
    assert _unfused(clf) == "1"  # quantize/dequantize nodes kept: no saturating fused int8 kernels
    assert clf.classify(banana_jpg).full_path  # a warning, not a refusal
    monkeypatch.setattr(backends, "cpu_has_vnni", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8FallbackWarning)
        assert _unfused(Classifier.load(d)) != "1"  # VNNI: the fast fused kernels
        Classifier.load(onnx_artifact_dir)  # fp32: never
