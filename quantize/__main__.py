"""`python -m quantize --checkpoint DIR --data ROOT --targets onnx,executorch,tflite,coreml --out DIR`."""

from __future__ import annotations

import argparse
import sys
import warnings

from ._common import QuantizeError
from .run import DYNAMIC_KL_GAIN, TARGETS, quantize_checkpoint


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
    p.add_argument("--force-qat", action="store_true",
                   help="with --qat-epochs: QAT ExecuTorch and TFLite even when their post-training int8 meets the bar")
    p.add_argument("--qat-images", type=int, default=0,
                   help="training photos for QAT (0: all outside the 20 %% judging slice)")
    p.add_argument("--qat-lr", type=float, default=1e-6, help="QAT learning rate (AdamW)")
    p.add_argument("--qat-ce-weight", type=float, default=0.0,
                   help="weight of the label loss (ce) next to the KL to fp32 in QAT (0: distillation only)")
    p.add_argument("--qat-batch-size", type=int, default=8, help="QAT batch size")
    p.add_argument("--qat-ranges", choices=("ptq", "minmax"), default="ptq",
                   help="QAT activation ranges: the post-training histogram ranges, frozen (default: QAT starts from "
                        "the PTQ artifact's arithmetic), or min/max over the calibration photos, then moving averages")
    p.add_argument("--qat-freeze-blocks", type=int, default=None,
                   help="QAT leaves the stem and backbone blocks [0, N) untrained (default: the blocks the checkpoint "
                        "was trained with frozen; 0 trains every block, so the int8 early layers can adapt too)")
    p.add_argument("--qat-no-augment", action="store_true",
                   help="QAT on the decoded photos as they are (default: a fresh random crop + flip every epoch)")
    p.add_argument("--eval-limit", type=int, default=0, help="cap the evaluation sets (0: all of val and the 20 %% train slice)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="quantize the model as trained (default: fold the measured mean shift of int8 weight rounding "
                        "into biases first; quantize/bias.py)")
    p.add_argument("--rounding", choices=("nearest", "gptq"), default="nearest",
                   help="int8 weight rounding for ONNX, ExecuTorch and TFLite: round-to-nearest, or GPTQ's "
                        "error-compensating rounding on the calibration photos (quantize/gptq.py; same grid, same graph)")
    p.add_argument("--plan-kl", type=float, default=None,
                   help="the float plan must also bring the simulated mean fine KL to fp32 on the sensitivity photos "
                        "to this value or below, floating the most sensitive families first (off by default: "
                        "agreement and top-1 drop only). The KL sees the noise that flips near-ties, which agreement "
                        "on a few hundred confident photos misses. A target whose file these extra floats push over the "
                        "30 %% size bar is rebuilt from the greedy's earlier plan that fits (the report says so)")
    p.add_argument("--float-families", default="",
                   help="`;`-separated families (names as the report's sensitivity table prints them) kept float from "
                        "the start, e.g. the ones `benchmarks/int8_noise_floor.py --families` shows carry the changed "
                        "answers; the measured greedy adds to them, the report and manifest list them")
    p.add_argument("--executorch-activations", choices=("auto", "static", "dynamic"), default="auto",
                   help="ExecuTorch activations: calibrated int8 (static), or quantized per photo at run time "
                        "(dynamic: XNNPACK's qd8 kernels, int8 weights, float outputs; depthwise convs and the stem stay float "
                        "because XNNPACK cannot run them dynamic), or auto (default): dynamic when its simulated fine KL "
                        f"to fp32 on the sensitivity photos is at most {DYNAMIC_KL_GAIN:g} x the static one's (report and manifest say "
                        "both). TFLite and ONNX stay static (full-integer)")
    a = p.parse_args(argv)
    if a.plan_kl is not None and not a.plan_kl > 0:
        p.error(f"--plan-kl must be > 0 (got {a.plan_kl})")
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    warnings.simplefilter("default")
    try:
        rep = quantize_checkpoint(a.checkpoint, a.data, targets, a.out, n_calibration=a.calibration_images,
                                  n_sensitivity=a.sensitivity_images, qat_epochs=a.qat_epochs, eval_limit=a.eval_limit,
                                  qat={"images": a.qat_images, "lr": a.qat_lr, "batch_size": a.qat_batch_size, "ce_weight": a.qat_ce_weight,
                                       "augment": not a.qat_no_augment, "force": a.force_qat,
                                       "ranges": a.qat_ranges,
                                       **({} if a.qat_freeze_blocks is None else {"freeze_blocks": a.qat_freeze_blocks})},
                                  bias_correction=not a.no_bias_correction, rounding=a.rounding,
                                  plan_kl=a.plan_kl, executorch_activations=a.executorch_activations,
                                  float_families=[f.strip() for f in a.float_families.split(";") if f.strip()])
    except QuantizeError as e:  # a bad argument found once the checkpoint is loaded (target, family name, ...)
        print(f"python -m quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {a.out}/report.md")
    res = rep["targets"]
    # a target passes when its post-training int8 or its QAT artifact meets the bar
    ok = all(res[t].get("meets_bar") or res.get(f"{t}_qat", {}).get("meets_bar")
             for t in ("onnx", "executorch", "tflite") if t in res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
