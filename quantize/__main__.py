"""`python -m quantize --checkpoint DIR --data ROOT --targets onnx,executorch,tflite,coreml --out DIR`."""

from __future__ import annotations

import argparse
import sys
import warnings

from .run import TARGETS, quantize_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize",
                                description="int8 post-training quantization (QAT fallback) with an accuracy report.")
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--data", required=True, help="dataset root (real training photos calibrate; val judges)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--out", required=True, help="output directory: <out>/<target>/ int8, <out>/fp32/<target>/, report.{md,json}")
    p.add_argument("--calibration-images", type=int, default=300, help="real training photos for calibration (>= 300 recommended)")
    p.add_argument("--sensitivity-images", type=int, default=200, help="other training photos for the sensitivity pass")
    p.add_argument("--qat-epochs", type=int, default=0, help="pt2e QAT epochs when post-training int8 misses the bar (0: off)")
    p.add_argument("--eval-limit", type=int, default=0, help="cap the evaluation sets (0: all of val and the 20 %% train slice)")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    warnings.simplefilter("default")
    rep = quantize_checkpoint(a.checkpoint, a.data, targets, a.out, n_calibration=a.calibration_images,
                              n_sensitivity=a.sensitivity_images, qat_epochs=a.qat_epochs, eval_limit=a.eval_limit)
    print(f"report: {a.out}/report.md")
    return 0 if all(r.get("meets_bar") for t, r in rep["targets"].items() if t in ("onnx", "executorch", "tflite")) else 1


if __name__ == "__main__":
    sys.exit(main())
