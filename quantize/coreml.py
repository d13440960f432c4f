"""Core ML int8: weights linearly quantized (int8, symmetric, per output channel); activations float.

Int8 *activations* calibrate by running predictions, which only macOS does; off macOS the report gives the
PyTorch simulation of these int8 weights instead (and says so), and the package's spec is verified.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from converters.coreml import verify_package

from ._common import QuantContext, QuantizeError, TargetResult, failing_as, finish_int8, fp32_artifact
from .bias import bias_corrected
from .recipes import CoreMLRecipe


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


def quantize(ctx: QuantContext, out_dir: Path, recipe: CoreMLRecipe) -> TargetResult:
    """fp32 package (converters.coreml) -> int8 weights -> `<out_dir>/coreml/model.mlpackage`, spec verified."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    fp32 = fp32_artifact(ctx, "coreml", out_dir)
    # bias correction only where coremltools rounds: it leaves weights of at most `weight_threshold` elements
    # (early depthwise filters, biases) float, and a layer that is not rounded must not be corrected
    sizes = {n: m.weight.numel() for n, m in ctx.model.named_modules() if getattr(m, "weight", None) is not None}
    shifts = {n: e for n, e in (ctx.coreml_shifts or {}).items() if sizes.get(n, 0) > recipe.weight_threshold}
    corrected = bias_corrected(ctx.model, shifts, [f for f in ctx.families if f.prefixes])[0]
    src = fp32_artifact(ctx, "coreml", out_dir, corrected)
    ctx.log("coreml: linear_quantize_weights int8 per-channel symmetric")
    ml = ct.models.MLModel(str(src.path), skip_model_load=True)
    cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=recipe.weight_threshold))
    with failing_as("coreml linear_quantize_weights"):
        q = cto.linear_quantize_weights(ml, config=cfg)
    path = out_dir / "coreml" / "model.mlpackage"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    q.save(str(path))
    checked = verify_package(path, ctx.taxonomy, ctx.image_size, fp32.manifest.metrics.get("export", {}).get("fixed_batch", 1),
                             (fp32.manifest.embedding or {}).get("dim"))
    ops = op_types(path)
    constexpr = {k: v for k, v in ops.items() if k.startswith("constexpr")}
    if not constexpr:
        raise QuantizeError(f"coreml: the quantized package holds no constexpr dequantize op ({dict(ops)})")
    float_layers = ["all activations (int8 activations need macOS to calibrate)",
                    "weights too small for linear_quantize_weights' threshold (biases, norms)"]
    scheme = "coremltools linear_quantize_weights: int8 symmetric per-channel weights (weight-only)"
    notes = [f"constexpr ops: {constexpr}", "spec reloaded and verified on " + sys.platform,
             "activation quantization (linear_quantize_activations) needs macOS: not produced here"]
    export = {**fp32.manifest.metrics.get("export", {}), "spec_check": checked, "op_types": dict(ops)}
    return finish_int8(ctx, "coreml", path, fp32.manifest.size_bytes, ("coremltools",), scheme,
                       float_layers, notes, export=export,
                       no_parity=None if sys.platform == "darwin" else "Core ML prediction needs macOS",
                       result_extra={"constexpr_ops": constexpr})
