"""One post-training int8 run with forced QAT on the tiny real student (`research.qat.quantize_with_qat`),
shared by the QAT tests and the runtime-gap study's test: lowering to ExecuTorch and converting to TFLite
dominate the cost."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

QAT_IMAGES = 40


@pytest.fixture(scope="session")
def qat_run(tiny_student_dir, grocery_root, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """(report, output directory): ExecuTorch (static) and TFLite on 48 calibration / sensitivity / judging
    photos, then one forced QAT epoch on 40 training photos for each."""
    from research.qat import quantize_with_qat

    out = tmp_path_factory.mktemp("qat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = quantize_with_qat(tiny_student_dir, str(grocery_root), ["executorch", "tflite"], out,
                                {"epochs": 1, "images": QAT_IMAGES, "force": True}, n_calibration=48, n_sensitivity=48,
                                eval_limit=48, n_parity=24, log=lambda *_: None)
    return rep, out
