"""One `quantize_checkpoint` run on the tiny real student, shared by the int8 tests.

Every target in a single run: lowering to ExecuTorch and converting to TFLite dominate the cost, and a
second run would redo the fp32 exports, the artifacts, calibration and the sensitivity pass.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

TARGETS = ["onnx", "executorch", "tflite", "coreml"]


@pytest.fixture(scope="session")
def int8_run(tiny_student_dir, grocery_root, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """(report, output directory) of `quantize_checkpoint` on 48 calibration / sensitivity / judging photos."""
    from quantize import ExecuTorchRecipe, quantize_checkpoint

    out = tmp_path_factory.mktemp("int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # static ExecuTorch: the default `auto` and `dynamic` have their own tests
        rep = quantize_checkpoint(tiny_student_dir, str(grocery_root), TARGETS, out, n_calibration=48,
                                  n_sensitivity=48, eval_limit=48, n_parity=24, log=lambda *_: None,
                                  recipes={"executorch": ExecuTorchRecipe("static")})
    return rep, out
