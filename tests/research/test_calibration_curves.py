"""research/calibration_curves.py: the coverage/precision curves behind `python -m sdk calibrate`, drawn."""

import sys

import numpy as np
import pytest

from research.calibration_curves import coverage_precision_curves, main
from sdk import _calibrate as C
from sdk.datasets import synthetic_taxonomy


def test_one_curve_per_level_through_the_chosen_threshold():
    tax, rng = synthetic_taxonomy(), np.random.default_rng(1)
    labels = np.asarray([tax.ancestors(2, int(i)) for i in rng.integers(0, 8, 300)])
    # each level's true node ahead of the others by a random margin: some photos clear, some do not
    probs = [0.1 + np.eye(n)[labels[:, lvl]] * rng.uniform(0, 3, (300, 1)) for lvl, n in enumerate(tax.sizes)]
    ds = C.decode_set(tax, [np.log(p / p.sum(1, keepdims=True)) for p in probs], labels)
    th = C.calibrate_thresholds(ds, 0.95)
    curves = coverage_precision_curves(ds, th)
    assert len(curves) == 3 and all(len(c["coverage"]) == len(c["precision"]) for c in curves)
    assert [c["chosen"] for c in curves] == th
    assert curves[0]["coverage"][0] == 1.0  # threshold 0 answers every image at the coarsest level


@pytest.mark.slow
def test_plots_per_level_and_the_unknown_histogram(onnx_artifact_dir, grocery_root, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--model", str(onnx_artifact_dir), "--data", str(grocery_root), "--limit", "30", "--ood-per-kind", "2",
                 "--target-precision", "0.9", "--out", str(tmp_path / "plots")]) == 0
    plots = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in plots] == ["calibration_category.png", "calibration_coarse.png", "calibration_fine.png",
                                       "unknown_score.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    assert "wrote" in capsys.readouterr().out


def test_without_matplotlib_it_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
