"""research/int8_runtime_gap.py rebuilds exactly the graph `python -m quantize` ships.

The study splits an int8 target's loss into its quantized graph and its runtime, which only means
something if its runtime leg is the artifact the target wrote. Run with the settings of the shared
int8 run (tests/research/conftest.py), its runtime answers must be that run's artifacts' answers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from sdk import Taxonomy

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_leg_reproduces_the_shipped_artifacts(qat_run, tiny_student_dir, grocery_root, tmp_path):
    import torch

    rep, _ = qat_run  # calibration 48, sensitivity 48, judged on 48 photos per split
    out = tmp_path / "gap.json"
    # the same thread count as the in-process int8 run: fp32 reductions (calibration, the sensitivity ranking,
    # the fp32 reference) depend on it, and a near-random tiny model has near-ties that such a change flips
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, str(ROOT / "research/int8_runtime_gap.py"), "--checkpoint",
                        str(tiny_student_dir), "--data", str(grocery_root), "--calibration-images", "48",
                        "--sensitivity-images", "48", "--limit", "48", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    gap = json.loads(out.read_text())
    fine = Taxonomy.load(tiny_student_dir / "taxonomy.json").level_names[-1]
    for target in ("executorch", "tflite"):
        for split in ("val", "train20"):
            shipped = rep["targets"][target]["splits"][split]
            mine = gap["targets"][target][split]
            assert mine["runtime_vs_fp32"]["n"] == 48
            assert mine["runtime_vs_fp32"]["agreement"] == shipped["agreement_with_fp32"][f"agreement/{fine}"]
            assert abs(mine["runtime_vs_fp32"]["fine_kl"] - shipped["fine_kl_to_fp32"]) <= 1e-3 * shipped["fine_kl_to_fp32"]
            assert mine["runtime_top1"] == shipped["int8"][f"top1/{fine}"]
            assert mine["fp32_top1"] == shipped["fp32"][f"top1/{fine}"]
            # the same photos named as changed, with the same answers, as in the int8 report
            assert mine["runtime_vs_fp32"]["changed_photos"] == shipped["disagreements"]["changed"]
            # the graph leg is int8 arithmetic too: not fp32, and not bit-identical to the runtime
            assert mine["graph_vs_fp32"]["fine_kl"] > 0 and mine["runtime_vs_graph"]["fine_kl"] > 0
    assert set(gap["graph_vs_graph"]) == {"val", "train20"}


def test_unknown_target_is_a_usage_error(tiny_student_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "research/int8_runtime_gap.py"), "--checkpoint",
                        str(tiny_student_dir), "--data", str(tmp_path), "--targets", "onnx"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown target(s) ['onnx']" in r.stderr
