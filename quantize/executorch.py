"""ExecuTorch int8: pt2e with the XNNPACK quantizer, lowered fully into the XNNPACK delegate.

The quantizer annotates only the Conv2d / Linear layers of the plan's quantized families (a global config
would also quantize residual adds and the read-out, which the sensitivity pass did not measure). Lowering
asserts no quantize/dequantize op outside XNNPACK, so the .pte needs no `executorch.kernels.quantized`. In the
dynamic scheme (`quantize.sim.DynamicScheme`) depthwise convs and the stem stay float and the projection of
the constant level-0 queries stays static: XNNPACK cannot run them dynamically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from converters.executorch import check_delegation, delegate_count, lower_to_xnnpack
from sdk import atomic_write

from ._common import QuantContext, QuantizeError, TargetResult, failing_as, finish_int8, fp32_artifact
from .recipes import ExecuTorchRecipe
from .sim import BN_AFTER, layers_of


def quantized_module_names(ctx: QuantContext) -> list[str]:
    """FQNs (inside DeployWrapper) of the Conv2d/Linear layers the plan quantizes."""
    fams = [f for f in ctx.families if f.prefixes and f.name in ctx.plan.quantized]
    return [f"model.{n}" for n in layers_of(ctx.model, fams)]


def layer_filter(names: list[str]):
    """pt2e node filter: the node's deepest module is one of `names` or the BatchNorm after it."""
    allowed = set(names)
    for n in names:
        head, _, last = n.rpartition(".")
        if last in BN_AFTER:
            allowed.add(f"{head}.{BN_AFTER[last]}")

    def keep(node) -> bool:
        if node.op in ("get_attr", "placeholder"):
            return True  # weights and biases are in the conv/linear partitions and carry no module stack
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return False
        fqn = list(stack.values())[-1][0]
        return fqn.removeprefix("L['self'].") in allowed
    return keep


def drop_unfiltered(model, keep):
    """Remove every annotation the layer filter rejects: the filter, not each annotator, decides.
    XNNPACK's `cat` annotator ignores the filter (executorch 1.5.1) and would quantize the token
    concatenation that feeds a float LayerNorm; what runs int8 must be what the plan and the manifest
    say. Returns `model`."""
    for node in model.graph.nodes:
        if node.op == "call_function" and not keep(node):
            node.meta.pop("quantization_annotation", None)
    return model


_aten = torch.ops.aten
CLAMPS = {_aten.relu6.default, _aten.hardtanh.default, _aten.hardtanh_.default, _aten.relu.default, _aten.relu_.default}


def fuse_clamp_outputs(model):
    """Quantize a conv's output after the ReLU6 that follows it, not before: neither quantizer knows
    `aten.relu6`, so each would observe the pre-clip range, whose negative side the clip discards, and put the
    ReLU6 output on a grid several times too coarse. It halved the ExecuTorch artifact's KL to fp32. Returns `model`."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    key = "quantization_annotation"
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in CLAMPS:
            continue
        prev = node.args[0]
        ann = prev.meta.get(key) if isinstance(prev, torch.fx.Node) else None
        if ann is None or ann.output_qspec is None or len(prev.users) != 1 or key in node.meta:
            continue
        node.meta[key] = QuantizationAnnotation(output_qspec=ann.output_qspec, _annotated=True)
        ann.output_qspec = None
    return model


def xnnpack_quantizer(names: list[str], is_qat: bool = False, dynamic: list[str] | None = None):
    """The XNNPACK quantizer restricted to the layers `names` (static int8: calibrated activation ranges)
    and `dynamic` (int8 weights, input quantized per photo at run time, float output)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)
    filt = layer_filter(names)
    dyn_cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True) if dynamic else None
    dyn_filt = layer_filter(dynamic) if dynamic else None
    every = layer_filter(list(names) + list(dynamic or []))

    class LayerQuantizer(XNNPACKQuantizer):
        def _annotate_for_quantization_config(self, model):
            if dyn_cfg is not None:  # first: the static pass then skips what is annotated
                model = self._annotate_all_patterns(model, dyn_cfg, dyn_filt)
            model = self._annotate_all_patterns(model, cfg, filt)
            return fuse_clamp_outputs(drop_unfiltered(model, every))

    return LayerQuantizer()


def write_pte(converted: torch.nn.Module, example: torch.Tensor, path: Path):
    """Lower a converted pt2e module into XNNPACK (delegation asserted) and write its ExecuTorch program to
    `path`; returns (edge program manager, ops outside the delegate)."""
    try:
        import executorch.kernels.quantized  # noqa: F401  (out variants, so a leak fails our assert, not lowering)
    except ImportError:
        pass
    edge, ops = lower_to_xnnpack(torch.export.export(converted, (example,)))
    leaked = {k: v for k, v in ops.items() if "quantize" in k}
    if leaked:
        raise QuantizeError(f"executorch: quantized ops left outside XNNPACK: {leaked}; the .pte would need "
                            "executorch.kernels.quantized at load time and run them unaccelerated")
    check_delegation(ops)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, edge.to_executorch().buffer)
    return edge, ops


def convert(ctx: QuantContext, quantizer, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """export the uint8-in graph of the int8 model -> prepare_pt2e(quantizer) -> observe the calibration
    photos one at a time -> convert_pt2e. The result runs in PyTorch (quantize/dequantize around float
    ops: the quantizer's arithmetic without a backend's kernels), and it is what the backends lower."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    gm = torch.export.export(ctx.deploy(ctx.int8_model), (ctx.example(),)).module()
    return convert_pt2e(calibrated(gm, quantizer, ctx.calibration.images), fold_quantize=fold_quantize)


def calibrated(gm: torch.fx.GraphModule, quantizer, images) -> torch.fx.GraphModule:
    """prepare_pt2e(gm, quantizer), then observe the calibration photos one at a time (uint8 NHWC)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for img in images:
            prepared(torch.from_numpy(img[None].copy()))
    return prepared


def finish_pte(ctx: QuantContext, path: Path, edge, ops, fp32_size: int | None, scheme: str, notes: list[str],
               float_prefix: list[str] = (), extra: dict | None = None) -> TargetResult:
    """Manifest, SDK parity and export record of a lowered int8 .pte (`write_pte`'s edge program and
    portable ops); `float_prefix`: what stayed float before the plan's families and ops."""
    float_layers = [*float_prefix, *ctx.float_layers("float, XNNPACK fp32 or the allow-listed portable ops: "
                                                     + ", ".join(sorted(ops)))]
    notes = [*notes, f"{delegate_count(edge.exported_program().graph_module)} XNNPACK delegate segments; "
             "no quantize/dequantize op outside the delegate (asserted)"]
    export = {"fixed_batch": 1, "delegate": "XnnpackPartitioner", "portable_ops": dict(sorted(ops.items())),
              "thread_safe": False}
    return finish_int8(ctx, "executorch", path, fp32_size, ("executorch", "torchao"), scheme, float_layers, notes,
                       extra=extra, export=export)


def quantize(ctx: QuantContext, out_dir: Path, recipe: ExecuTorchRecipe) -> TargetResult:
    """fp32 export (converters.executorch) for size, then pt2e int8 -> `<out_dir>/executorch/model.pte`.
    Static or dynamic as `ctx.dynamic` says: the run resolves `recipe.activations` into the context."""
    fp32 = fp32_artifact(ctx, "executorch", out_dir)
    names = quantized_module_names(ctx)
    dyn = ctx.dynamic
    dynamic = [n for n in names if dyn is not None and n.removeprefix("model.") in dyn.dynamic]
    static = [n for n in names if dyn is None or n.removeprefix("model.") in dyn.static]
    ctx.log(f"executorch: pt2e XNNPACK quantizer on {len(names)} Conv/Linear layers"
            + (f" ({len(dynamic)} dynamic, {len(static)} static, {len(dyn.float)} float)" if dyn else "")
            + f", calibrating on {len(ctx.calibration)} photos")
    path = out_dir / "executorch" / "model.pte"
    with failing_as("executorch int8"):
        edge, ops = write_pte(convert(ctx, xnnpack_quantizer(static, dynamic=dynamic)), ctx.example(), path)
    if dyn is None:
        scheme = "pt2e XNNPACKQuantizer: int8 symmetric per-channel weights, int8 per-tensor activations (histogram)"
        return finish_pte(ctx, path, edge, ops, fp32.manifest.size_bytes, scheme,
                          [f"{len(names)} Conv/Linear layers int8"], extra={"activations": "static"})
    prefix = [f"{n} ({dyn.why[n]})" for n in sorted(dyn.float) if "depthwise" not in dyn.why[n]] + \
        [f"{sum('depthwise' in dyn.why[n] for n in dyn.float)} depthwise convs (XNNPACK has no dynamically "
         "quantized depthwise conv)"]
    scheme = ("pt2e XNNPACKQuantizer, dynamic activations: int8 symmetric per-channel weights; each Conv/Linear "
              "input quantized to int8 per photo at run time (XNNPACK qd8), its output float; "
              f"{len(static)} layers static int8 (calibrated, histogram), {len(dyn.float)} layers float (depthwise convs, stem)")
    notes = [f"{len(dynamic)} Conv/Linear layers dynamic int8, {len(static)} static int8: {', '.join(static)}"]
    return finish_pte(ctx, path, edge, ops, fp32.manifest.size_bytes, scheme, notes, prefix,
                      extra={"activations": "dynamic", "dynamic_scheme": dyn.to_dict()})
