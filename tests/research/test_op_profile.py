"""`research/op_profile.py` on the tiny real student's exports: per-op tables per runtime.

Times are only checked for consistency with each other (positive, summing to a sane share of the run the
profiler timed); speed itself belongs to benchmarks, not tests.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest

from research.op_profile import (CONVERT, FLOAT, INT8, OTHER, UNKNOWN, format_profile, main, onnx_node_samples,
                                 onnx_precision, pattern_image, profile_model, scope_of, xnnpack_precision)

RUNS, WARMUP = 4, 1


@pytest.fixture(scope="module")
def onnx_profile(onnx_artifact_dir, tmp_path_factory):
    return profile_model(onnx_artifact_dir, pattern_image, tmp_path_factory.mktemp("profile"), threads=1,
                         runs=RUNS, warmup=WARMUP, top=5)


def test_onnx_op_times_are_positive_and_add_up_to_the_profiled_run(onnx_profile):
    p = onnx_profile
    assert p.status == "per-op timing" and p.runs == RUNS
    assert p.ops and all(o.ms > 0 and o.count >= 1 and 0 < o.share <= 1 for o in p.ops)
    assert p.run_ms > 0 and p.sdk_ms > 0
    # node kernels are timed inside the run: together they cannot exceed it, and they are most of it
    assert 0.3 * p.run_ms <= p.op_ms <= 1.02 * p.run_ms
    assert sum(p.ms_by_precision().values()) == pytest.approx(p.op_ms)
    assert sum(p.scopes.values()) == pytest.approx(p.op_ms) and "/model/_blocks" in p.scopes
    assert [n.ms for n in p.nodes] == sorted((n.ms for n in p.nodes), reverse=True) and len(p.nodes) == 5
    assert p.nodes[0].ms <= max(o.ms for o in p.ops)


def test_onnx_op_types_and_counts_are_those_of_the_graph_onnxruntime_runs(onnx_profile):
    import onnx

    p = onnx_profile
    counted = Counter()
    for o in p.ops:
        counted[o.op_type] += o.count
    assert dict(counted) == p.graph_ops  # every node of the optimized graph ran once per inference
    exported = Counter(n.op_type for n in onnx.load(str(onnx_artifact_path(p))).graph.node)
    assert dict(exported) == p.exported_ops
    assert "Conv" in exported and not any(t.startswith("QLinear") for t in p.graph_ops)  # an fp32 export
    # an fp32 export computes in float; only the uint8 image is moved (NHWC -> NCHW) before its one cast
    assert {o.op_type for o in p.ops if o.precision == INT8} <= {"Transpose", "Reshape"}
    assert any(o.op_type == "Cast" and o.precision == CONVERT for o in p.ops)


def onnx_artifact_path(p):
    from sdk import Manifest

    return Manifest.load(p.path).artifact_path(p.path)


def test_onnx_profile_drops_warmup_runs_and_averages_the_rest():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts, dur, op="QLinearConv", types=("uint8", "float")):
        return {"cat": "Node", "name": f"n_{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "input_type_shape": [{t: [1]} for t in types],
                         "output_type_shape": [{"uint8": [1]}]}}

    events = [run(0, 100), {**node(10, 90), "name": "conv_kernel_time"},
              run(200, 40), {**node(210, 10), "name": "conv_kernel_time"}, {**node(230, 6), "name": "dq_kernel_time"},
              run(300, 60), {**node(310, 30), "name": "conv_kernel_time"}, {**node(345, 8), "name": "dq_kernel_time"}]
    events[-1]["args"]["op_name"] = events[-4]["args"]["op_name"] = "DequantizeLinear"
    samples, run_ms, n = onnx_node_samples(events, warmup=1)
    assert n == 2 and run_ms == pytest.approx(0.05)
    assert sorted(samples) == [("conv", "QLinearConv", INT8, pytest.approx(0.02)),
                               ("dq", "DequantizeLinear", CONVERT, pytest.approx(0.007))]


@pytest.mark.parametrize("op, ins, outs, want", [
    ("QLinearConv", {"uint8", "int8", "float", "int32"}, {"uint8"}, INT8),
    ("ConvInteger", {"uint8", "int8"}, {"int32"}, INT8),
    ("MatMulIntegerToFloat", {"uint8", "int8", "float"}, {"float"}, INT8),
    ("DequantizeLinear", {"uint8", "float"}, {"float"}, CONVERT),
    ("Cast", {"uint8"}, {"float"}, CONVERT),
    ("Conv", {"float"}, {"float"}, FLOAT),
    ("MaxPool", {"uint8"}, {"uint8"}, INT8),
    ("Shape", {"float"}, {"int64"}, OTHER),
])
def test_onnx_precision_follows_the_op_and_the_dtypes_it_ran_on(op, ins, outs, want):
    assert onnx_precision(op, ins, outs) == want


def test_scope_is_the_model_part_of_an_exported_node_name():
    assert scope_of("/model/_blocks.12/_depthwise_conv/Conv_token_3") == "/model/_blocks"
    assert scope_of("/model/head/cross.2.0/attn/Softmax") == "/model/head"
    assert scope_of("/model/Clip_1_output_0_nchwc") == "/model"
    assert scope_of("ReorderOutput_token_119") == "(added by the runtime)"


@pytest.mark.parametrize("name, want", [
    ("Convolution (NHWC, QC8) IGEMM", INT8), ("Fully Connected (NC, QS8, QC8W) GEMM", INT8),
    ("Fully Connected (NC, QD8, F32, QC8W) GEMM", INT8), ("Transpose (ND, X8)", INT8),
    ("Convolution (NHWC, F32) DWConv", FLOAT), ("Constant Pad (ND, X32)", FLOAT),
    ("Convert (NC)", CONVERT), ("Add (ND)", UNKNOWN),
])
def test_xnnpack_precision_reads_the_datatype_tag(name, want):
    assert xnnpack_precision(name) == want


@pytest.mark.parametrize("target", ["executorch", "tflite", "coreml"])
def test_other_runtimes_give_a_table_or_say_why_not(all_exports, tmp_path, capsys, target):
    out = tmp_path / "profile.json"
    assert main(["--model", str(all_exports / target), "--runs", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    (p,), text = json.loads(out.read_text()), capsys.readouterr().out
    assert p["target"] == target and f"### {all_exports / target}" in text
    if p["status"] == "per-op timing":  # ExecuTorch with an event tracer in its runtime
        assert p["ops"] and all(o["ms"] >= 0 and o["count"] >= 1 for o in p["ops"])
        assert 0 < p["op_ms"] <= 1.02 * p["run_ms"] and "| op type |" in text
    elif p["status"] == "op counts only":  # LiteRT: counts from the interpreter, time from the SDK
        assert p["ops"] and all(o["ms"] is None and o["count"] >= 1 for o in p["ops"]) and p["sdk_ms"] > 0
        assert any("benchmark_model" in n for n in p["notes"]) and "benchmark_model" in text
    else:  # no runtime here (Core ML off macOS) or no event tracer: the reason, never a made-up table
        assert p["status"] in ("unavailable", "whole-model time only") and p["notes"] and not p["ops"]
        assert p["notes"][0] in text
    if target == "coreml" and sys.platform != "darwin":
        assert p["status"] == "unavailable" and "macOS" in p["notes"][0]


def test_cli_profiles_a_real_photo_and_writes_json(onnx_artifact_dir, grocery_root, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["--model", str(onnx_artifact_dir), "--runs", "2", "--warmup", "1", "--top", "3",
                 "--data", str(grocery_root), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "input: photo " in text and "| op type | count | ms / inference | share | precision |" in text
    (p,) = json.loads(out.read_text())
    assert p["status"] == "per-op timing" and len(p["nodes"]) == 3 and p["op_ms"] > 0


def test_cli_exits_2_on_a_missing_or_untrusted_model_dir(onnx_artifact_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(onnx_artifact_dir, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["--model", str(bad)]) == 2
    assert "size" in capsys.readouterr().err


def test_table_lists_each_op_row_and_the_pattern_is_deterministic(onnx_profile):
    text = format_profile(onnx_profile, top=2)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(onnx_profile.ops) + 1 + 2
    a, b = pattern_image(64), pattern_image(64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and np.array_equal(a, b) and a.std() > 20
