"""research/benchmark_figures.py on the tiny real student: the roofline, the plots, and the statistics behind
them. Timings are only checked to be consistent with the MACs (speed belongs to benchmarks, not to tests)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from research.benchmark_figures import coverage_curves, main, pareto, peak_macs, reliability


@pytest.fixture(scope="module")
def figures(tmp_path_factory, onnx_artifact_dir, tiny_student_dir, grocery_root):
    root = tmp_path_factory.mktemp("figures")
    shutil.copytree(onnx_artifact_dir, root / "artifacts" / "onnx")
    out = root / "out"
    assert main(["--data", str(grocery_root), "--limit", "10", "--warmup", "1", "--repeats", "3", "--batch", "4",
                 "--artifacts", f"tiny={root / 'artifacts'}", "--torch", f"tiny={tiny_student_dir}",
                 "--out", str(out)]) == 0
    return out, json.loads((out / "benchmark_figures.json").read_text())


def test_rows_carry_the_roofline(figures):
    _, js = figures
    for r in js["rows"]:
        roof = js["roofline"]["rows"][r["label"]]
        assert roof["peak_kind"] == "fp32" and roof["ratio_of_peak"] > 0
        assert roof["achieved_gmacs_per_s"] == pytest.approx(r["macs"] / (r["latency"]["median_ms"] / 1e3) / 1e9)
    # MACs: Lite0 at 128 px alone is ~120 M; the query head adds to it
    assert 100e6 < js["roofline"]["models"]["tiny"]["macs"] < 1e9


def test_plots_are_nonempty_pngs(figures):
    out, js = figures
    names = set(js["plots"])
    assert {"accuracy_vs_latency.png", "coverage_precision.png"} <= names
    assert any(n.startswith("confusion_") for n in names) and any(n.startswith("reliability_") for n in names)
    for n in names:
        data = (out / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, n


def test_pareto_reliability_coverage():
    # (latency, accuracy): b is dominated by a (slower and less accurate)
    assert pareto([(5, 0.8), (6, 0.7), (9, 0.9), (3, 0.5)]) == [3, 0, 2]
    probs = np.array([0.95, 0.95, 0.55, 0.55])
    rel = reliability(probs, np.array([True, True, True, False]))
    assert rel["count"][9] == 2 and rel["accuracy"][9] == 1.0 and rel["accuracy"][5] == 0.5
    assert rel["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    p = np.array([[0.9, 0.8], [0.9, 0.4], [0.6, 0.3]])
    c = np.array([[True, True], [True, False], [False, False]])
    cov = coverage_curves(p, c, n_thresholds=11)
    assert cov["fine"]["coverage"][0] == 1.0 and cov["fine"]["precision"][0] == pytest.approx(1 / 3)
    t5 = cov["threshold"].index(0.5)  # fine: only row 0 answers; back-off: rows 0 (2 levels), 1 (1), 2 (1)
    assert cov["fine"]["coverage"][t5] == pytest.approx(1 / 3) and cov["fine"]["precision"][t5] == 1.0
    assert cov["backoff"]["coverage"][t5] == pytest.approx(4 / 6) and cov["backoff"]["precision"][t5] == pytest.approx(3 / 4)


def test_peak_is_derived_from_the_flags():
    base = {"model": "x", "vendor": "GenuineIntel", "cores": 2, "mhz": 2000.0}
    avx2 = peak_macs({**base, "flags": ["avx2", "fma"]})
    assert avx2["fp32_macs_per_cycle"] == 16 and not avx2["vnni"]
    assert avx2["per_core_macs_per_s"]["fp32"] == pytest.approx(2.0e9 * 16)
    assert avx2["per_core_macs_per_s"]["int8"] == pytest.approx(2.0e9 * 16 * 4 / 3)
    vnni = peak_macs({**base, "vendor": "AuthenticAMD", "flags": ["avx2", "fma", "avx512f", "avx512_vnni"]})
    assert vnni["vector_bits"] == 256 and vnni["int8_macs_per_cycle"] == 64  # Zen 4 double-pumps AVX-512
    assert peak_macs({**base, "flags": ["avx2", "fma", "avx512f"]})["vector_bits"] == 512
