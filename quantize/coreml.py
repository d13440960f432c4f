"""Core ML int8: weights linearly quantized (int8, symmetric, per output channel); activations float.

`ct.optimize.coreml.linear_quantize_weights` on the fp32 package from `converters.coreml`: every
weight becomes a `constexpr_affine_dequantize` (iOS16+) / `constexpr_blockwise_shift_scale` (iOS18+)
op holding int8 data. Int8 *activations* (`linear_quantize_activations`) calibrate by running
predictions, which Core ML only does on macOS: on Linux they are not produced, and neither is any
accuracy figure from the package itself. The report gives the PyTorch simulation of these int8
weights instead and says so. On Linux the package is reloaded and its spec, metadata and constexpr
ops are verified.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from converters._common import tool_versions

from ._common import QuantContext, QuantizeError, TargetResult, finish_int8, fp32_artifact, int8_source_artifact


def op_types(path: Path) -> Counter:
    """Counts of MIL op types in an mlProgram package (reloaded without compiling: works on Linux)."""
    import coremltools as ct
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ops: Counter = Counter()

    def walk(block):
        for op in block.operations:
            ops[op.type] += 1
            for b in op.blocks:
                walk(b)
    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            walk(blk)
    return ops


WEIGHT_THRESHOLD = 2048  # coremltools quantizes a weight of more elements than this (its default)


def corrected_for_coreml(ctx: QuantContext):
    """Bias correction only where coremltools rounds: it leaves weights of at most WEIGHT_THRESHOLD
    elements (early depthwise filters, biases) in float, and a layer that is not rounded must not be
    corrected."""
    if not ctx.bias_corrected:
        return None
    from .bias import bias_corrected
    sizes = {n: m.weight.numel() for n, m in ctx.model.named_modules() if hasattr(m, "weight") and m.weight is not None}
    # no shifts (bias correction off): the plain fp32 model, without GPTQ weights, which Core ML does not take
    shifts = {n: e for n, e in (ctx.coreml_shifts or {}).items() if sizes.get(n, 0) > WEIGHT_THRESHOLD}
    return bias_corrected(ctx.model, shifts, [f for f in ctx.families if f.prefixes])[0]


def quantize(ctx: QuantContext, out_dir: Path) -> TargetResult:
    """fp32 package (converters.coreml) -> int8 weights -> `<out_dir>/coreml/model.mlpackage`, spec verified."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from converters.coreml import verify_package

    fp32 = fp32_artifact(ctx, "coreml", out_dir / "fp32" / "coreml")
    src = int8_source_artifact(ctx, "coreml", out_dir / "fp32" / "coreml", fp32, corrected_for_coreml(ctx))
    ctx.log("coreml: linear_quantize_weights int8 per-channel symmetric")
    ml = ct.models.MLModel(str(src.path), skip_model_load=True)
    cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD))
    try:
        q = cto.linear_quantize_weights(ml, config=cfg)
    except Exception as e:
        raise QuantizeError(f"coreml linear_quantize_weights failed: {type(e).__name__}: {e}") from e
    int8_dir = out_dir / "coreml"
    int8_dir.mkdir(parents=True, exist_ok=True)
    path = int8_dir / "model.mlpackage"
    if path.exists():
        shutil.rmtree(path)
    q.save(str(path))
    checked = verify_package(path, ctx.taxonomy, ctx.image_size, fp32.manifest.metrics.get("export", {}).get("fixed_batch", 1))
    ops = op_types(path)
    constexpr = {k: v for k, v in ops.items() if k.startswith("constexpr")}
    if not constexpr:
        raise QuantizeError(f"coreml: the quantized package holds no constexpr dequantize op ({dict(ops)})")
    float_layers = ["all activations (int8 activations need macOS to calibrate)",
                    "weights too small for linear_quantize_weights' default threshold (biases, norms)"]
    scheme = "coremltools linear_quantize_weights: int8 symmetric per-channel weights (weight-only)"
    notes = [f"constexpr ops: {constexpr}", "spec reloaded and verified on " + sys.platform,
             "activation quantization (linear_quantize_activations) needs macOS: not produced here"]
    m = finish_int8(ctx, "coreml", path, tool_versions("coremltools"), scheme, float_layers, notes,
                    check=sys.platform == "darwin")
    m.metrics["export"] = {**fp32.manifest.metrics.get("export", {}), "spec_check": checked, "op_types": dict(ops)}
    if sys.platform != "darwin":
        m.metrics["parity"] = {"measured": False, "reason": "Core ML prediction needs macOS"}
    m.save(int8_dir)
    return TargetResult("coreml", int8_dir, fp32.manifest.size_bytes, m.size_bytes, float_layers, scheme,
                        runnable_here=sys.platform == "darwin", notes=notes, extra={"constexpr_ops": constexpr})
