"""`python -m converters benchmark` on the tiny real student: table, JSON, model cards.

The figures in benchmark.json are recomputed here from the same images with compute_metrics; timings
are only checked to be well-formed numbers (speed belongs to benchmarks, not to tests).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.benchmark import BenchmarkError, parse_entries, wilson

LIMIT = 10


@pytest.fixture(scope="module")
def bench(tmp_path_factory, onnx_artifact_dir, tiny_student_dir, grocery_root):
    import os

    import torch

    from converters.__main__ import main

    before = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))
    root = tmp_path_factory.mktemp("bench")
    arts = root / "artifacts"
    shutil.copytree(onnx_artifact_dir, arts / "onnx")
    # a Core ML row without exporting one: same file, manifest says coreml. Off macOS the backend refuses
    # before parsing, which is exactly the "macOS only" path; the sha256 check still passes.
    shutil.copytree(onnx_artifact_dir, arts / "coreml")
    m = json.loads((arts / "coreml" / "manifest.json").read_text())
    m["target"] = "coreml"
    (arts / "coreml" / "manifest.json").write_text(json.dumps(m))
    out = root / "out"
    rc = main(["benchmark", "--data", str(grocery_root), "--split", "val", "--limit", str(LIMIT),
               "--warmup", "1", "--repeats", "3", "--batch", "4", "--artifacts", f"tiny={arts}",
               "--torch", f"tiny={tiny_student_dir}", "--out", str(out)])
    assert rc == 0
    # the benchmark pins every runtime to --threads 1 while it measures, then gives the caller its own back
    assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == before
    return out, json.loads((out / "benchmark.json").read_text())


def _images_and_labels(grocery_root, taxonomy, size):
    from sdk import prepare
    from train.data import load_dataset

    ds = load_dataset(grocery_root, "val", taxonomy=taxonomy)
    idx = sorted(set(np.linspace(0, len(ds) - 1, num=LIMIT).round().astype(int).tolist()))
    ds = ds.subset(idx)
    return np.stack([prepare(s.source, size) for s in ds.samples]), ds.labels()


def test_table_has_every_row_and_column(bench):
    out, js = bench
    md = (out / "benchmark.md").read_text()
    labels = [r["label"] for r in js["rows"]]
    assert labels == ["tiny/coreml-fp32", "tiny/onnx-fp32", "tiny/pytorch-fp32"]
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    for col in ["MB", "ms p50", "ms p90", "img/s @8", "top1 category", "top1 coarse", "top1 fine", "full path",
                "consist.", "severity", "agree fine", "status"]:
        assert f"| {col} |" in header
    for label in labels:
        assert any(line.startswith(f"| {label} |") for line in md.splitlines())
    assert "machine: " in md and "threads=1" in md and js["machine"]["threads"] == 1
    assert js["machine"]["versions"]["onnxruntime"] != "absent"


def test_metrics_match_compute_metrics_on_the_same_images(bench, grocery_root, onnx_artifact_dir, tiny_student_dir):
    from converters import parity, torch_logprobs
    from sdk import Classifier
    from train.checkpoint import load_model
    from train.metrics import compute_metrics
    from train.models import DeployWrapper

    _, js = bench
    rows = {r["label"]: r for r in js["rows"]}
    clf = Classifier.load(onnx_artifact_dir, num_threads=1)
    images, labels = _images_and_labels(grocery_root, clf.taxonomy, clf.input_size)
    assert rows["tiny/onnx-fp32"]["metrics"]["n"] == len(labels) == LIMIT
    onnx_lp = clf.logprobs(images)
    model, *_ = load_model(tiny_student_dir)
    torch_lp = torch_logprobs(DeployWrapper(model).eval(), images)
    for label, lp in [("tiny/onnx-fp32", onnx_lp), ("tiny/pytorch-fp32", torch_lp)]:
        expect = compute_metrics(clf.taxonomy, lp, labels)
        got = rows[label]["metrics"]
        assert set(got) == set(expect)
        for k, v in expect.items():
            assert got[k] == pytest.approx(v, abs=1e-9, nan_ok=True), (label, k)
    ag = rows["tiny/onnx-fp32"]["agreement"]
    assert ag["reference"] == "tiny/pytorch-fp32"
    assert ag["fine"] == pytest.approx(parity(torch_lp, onnx_lp, clf.taxonomy)["agreement/fine"])
    assert rows["tiny/pytorch-fp32"]["agreement"] is None


def test_rows_carry_size_latency_and_throughput(bench, onnx_artifact_dir):
    _, js = bench
    rows = {r["label"]: r for r in js["rows"]}
    onnx = rows["tiny/onnx-fp32"]
    assert onnx["size_mb"] == pytest.approx((onnx_artifact_dir / "model.onnx").stat().st_size / 1e6)
    for r in (onnx, rows["tiny/pytorch-fp32"]):
        lat = r["latency"]
        assert lat["repeats"] == 3 and 0 < lat["median_ms"] <= lat["p90_ms"] and math.isfinite(lat["p90_ms"])
        assert r["throughput_ips"] > 0 and r["throughput_batch"] == 4


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS: the row is measured there")
def test_coreml_row_is_size_and_spec_only_off_macos(bench):
    out, js = bench
    row = next(r for r in js["rows"] if r["target"] == "coreml")
    assert row["status"] == "macOS only" and "metrics" not in row and "latency" not in row
    assert row["size_mb"] > 0 and row["image_size"] == 128
    assert "macOS only" in (out / row["model_card"]).read_text()


def test_model_cards(bench, tiny_student_dir, onnx_artifact_dir):
    out, js = bench
    assert len(js["model_cards"]) == 2  # one per artifact; PyTorch rows are not shipped
    card = (out / next(r for r in js["rows"] if r["label"] == "tiny/onnx-fp32")["model_card"]).read_text()
    for section in ["## What it is", "## Taxonomy", "## Input", "## Measured in this run", "## Intended use",
                    "## Limitations", "Out-of-catalogue", "## Licenses", "MIT", "Apache-2.0", "## Reproduce"]:
        assert section in card, section
    assert f"python -m converters onnx --checkpoint {tiny_student_dir}" in card
    assert "python -m converters benchmark" in card
    assert json.loads((onnx_artifact_dir / "manifest.json").read_text())["sha256"] in card


def test_bad_entries_are_typed_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        parse_entries([str(tmp_path / "missing")])
    with pytest.raises(BenchmarkError, match="no manifest.json"):
        parse_entries([str(tmp_path)])
    with pytest.raises(BenchmarkError, match="model.safetensors"):
        parse_entries([], [f"x={tmp_path}"])
    with pytest.raises(BenchmarkError, match="nothing to benchmark"):
        parse_entries([], [])


def test_wilson_interval():
    lo, hi = wilson(0.5, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.192, abs=0.01)


def test_goals_judge_the_fastest_int8_student_against_the_fp32_peer():
    from converters.benchmark import Entry, Row, goals
    class _Tax:  # goals() only reads the level names
        level_names = ("coarse", "fine")

    def row(group, target, prec, ms, fine):
        e = Entry(f"{group}/{target}-{prec}", group, "artifact", Path("."), target, prec)
        return Row(e, {"status": "ok", "latency": {"median_ms": ms}, "metrics": {"top1/fine": fine}})

    rows = [row("s", "onnx", "int8", 7.0, 0.80), row("s", "tflite", "int8", 6.0, 0.79), row("s", "onnx", "fp32", 5.0, 0.9),
            row("p", "onnx", "fp32", 9.0, 0.79), row("p", "tflite", "fp32", 10.0, 0.85)]
    g = goals(rows, "s", "p", 8.0, _Tax())
    assert g["student"] == "s/tflite-int8" and g["within_max_ms"] and g["peer"] == "p/onnx-fp32"
    assert g["faster_than_peer"] and g["at_least_as_accurate"]
    assert g["ratio"] == 6.0 / 9.0 and g["ratio"] > g["ratio_bar"]  # the ratio to the peer's fastest fp32 row
    assert g["student_fp32"] == "s/onnx-fp32" and g["fp32_ratio"] == 5.0 / 9.0 and g["fp32_ratio"] <= g["fp32_ratio_bar"]
    from converters.benchmark.report import goal_lines
    text = "\n".join(goal_lines(g))
    assert "0.67×** — MISSES ≤ 0.5×" in text and "0.56×** — meets ≤ 1.15×" in text
    assert not goals(rows, "s", "p", 5.5, _Tax())["within_max_ms"]
    assert "error" in goals(rows, "p", None, 8.0, _Tax())


def test_the_same_artifact_twice_is_measured_once(onnx_artifact_dir, tmp_path):
    shutil.copytree(onnx_artifact_dir, tmp_path / "copy")
    entries = parse_entries([f"a={onnx_artifact_dir}", f"b={tmp_path}"])
    assert [e.label for e in entries] == ["a/onnx-fp32"]
