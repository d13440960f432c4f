"""`python -m quantize --checkpoint DIR --data ROOT --targets onnx,executorch,tflite,coreml --out DIR`."""

from __future__ import annotations

import argparse
import sys
import warnings

from ._common import QuantizeError
from .recipes import ACTIVATIONS, TARGETS, ExecuTorchRecipe
from .run import SPEED_TIE, quantize_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize",
                                description="int8 post-training quantization with an accuracy report.")
    p.add_argument("--checkpoint", required=True, help="model directory written by `python -m train`")
    p.add_argument("--data", required=True, help="dataset root (real training photos calibrate; val judges)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--out", required=True, help="output directory: <out>/<target>/ int8, <out>/fp32/<target>/, report.{md,json}")
    p.add_argument("--calibration-images", type=int, default=300, help="real training photos for calibration (>= 300 recommended)")
    p.add_argument("--sensitivity-images", type=int, default=200, help="other training photos for the sensitivity pass")
    p.add_argument("--eval-limit", type=int, default=0, help="cap the evaluation sets (0: all of val and the 20 %% train slice)")
    p.add_argument("--executorch-activations", choices=ACTIVATIONS, default="auto",
                   help="ExecuTorch activations: calibrated int8 (static), quantized per photo at run time (dynamic; "
                        "depthwise convs and the stem stay float), or auto (default): both built, judged and timed (batch 1, "
                        "one thread), the fastest that meets the int8 bar kept (within "
                        f"{SPEED_TIE * 100:.0f} %% of it: the one agreeing more with fp32)")
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    warnings.simplefilter("default")
    recipes = {"executorch": ExecuTorchRecipe(a.executorch_activations)} if "executorch" in targets else None
    try:
        rep = quantize_checkpoint(a.checkpoint, a.data, targets, a.out, n_calibration=a.calibration_images,
                                  n_sensitivity=a.sensitivity_images, eval_limit=a.eval_limit, recipes=recipes)
    except QuantizeError as e:  # a bad argument argparse cannot see (an unknown target), as a usage error
        print(f"python -m quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {a.out}/report.md")
    res = rep["targets"]
    return 0 if all(res[t].get("meets_bar") for t in ("onnx", "executorch", "tflite") if t in res) else 1


if __name__ == "__main__":
    sys.exit(main())
