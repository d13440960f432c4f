"""ExecuTorch int8: pt2e with the XNNPACK quantizer, lowered fully into the XNNPACK delegate.

torch.export -> XNNPACKQuantizer (int8 symmetric per-channel weights, int8 activations) annotating
only the Conv2d / Linear layers of the plan's quantized families (a node filter on the deepest module
of its `nn_module_stack`: the layer or its BatchNorm, which the conv+bn pattern needs; `set_module_name`
per layer leaves every conv+bn unannotated, and a global config would also quantize the residual adds,
the read-out multiply and the attention bias add, which the sensitivity pass did not measure; a
conv's output observer moves after the ReLU6 that follows it, `fuse_clamp_outputs`) -> prepare_pt2e -> calibration on the real photos
-> convert_pt2e -> the same SDPA decomposition and XNNPACK lowering as `converters.executorch` ->
assert that nothing but the converter's allow-listed float ops (LayerNorm, the read-out tail, data
movement) runs outside XNNPACK — in particular no quantize/dequantize op, so the `.pte` needs no
`executorch.kernels.quantized` at load time.

`--executorch-activations dynamic` (`ctx.dynamic`, `quantize.sim.DynamicScheme`): the same quantizer with
its dynamic config on the plan's Conv2d / Linear layers -- int8 per-channel weights, each input quantized
to int8 per photo at run time (XNNPACK's qd8 kernels), float outputs -- except where XNNPACK cannot run
it: depthwise convs (no dynamic kernel) and the stem (its dynamic conv fails at run time on the
3-channel image) stay float, and the projection of the constant level-0 queries stays static.
"""

from __future__ import annotations

from pathlib import Path

import torch

from converters._common import tool_versions

from ._common import QuantContext, QuantizeError, TargetResult, finish_int8, fp32_artifact
from .sim import BN_AFTER


def quantized_module_names(ctx: QuantContext) -> list[str]:
    """FQNs (inside DeployWrapper) of the Conv2d/Linear layers the plan quantizes."""
    fams = [f for f in ctx.families if f.prefixes and f.name in ctx.plan.quantized]
    return [f"model.{n}" for n, m in ctx.model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and any(f.owns(n) for f in fams)]


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

    Not every XNNPACK annotator honours the filter: its `cat` annotator ignores it (executorch 1.5.1)
    and quantizes every concatenation with one scale shared by all inputs. In the student that is the
    token concatenation of the two feature scales, which feeds the LayerNorm the sensitivity pass
    keeps in float, so the .pte quantized an op the plan (and litert's quantizer, for TFLite) leaves
    float. On the session-11 student removing it changed nothing measurable (fine KL to fp32 on `val`
    5.07e-3 before and after), but what runs int8 must be what the plan and the manifest say.
    Returns `model`.
    """
    for node in model.graph.nodes:
        if node.op == "call_function" and not keep(node):
            node.meta.pop("quantization_annotation", None)
    return model


_aten = torch.ops.aten
CLAMPS = {_aten.relu6.default, _aten.hardtanh.default, _aten.hardtanh_.default, _aten.relu.default, _aten.relu_.default}


def fuse_clamp_outputs(model):
    """Quantize a conv's output after the ReLU6 (or ReLU / hardtanh) that follows it, not before.

    Neither the XNNPACK quantizer nor litert's knows `aten.relu6` (their conv+activation patterns
    match `relu` only, and relu6 is not among the ops that share their input's observer), so they
    put the output observer of every conv-bn-ReLU6 of the backbone (33 in the student) on the conv,
    whose range spans the negative side the clip discards: the ReLU6 output then lives on a grid
    several times coarser than [0, 6] needs, and the next conv's input observer cannot recover it.
    Here the conv's (or its BatchNorm's, in QAT) output spec moves to the clip when the clip is its
    only user, which is the pattern both lowerings fuse (XNNPACK: conv with output min/max; TFLite:
    CONV_2D with a fused RELU6) and the scheme `quantize.sim` measures. On the session-12 student it
    cut the ExecuTorch artifact's fine KL to fp32 on `val` from 5.07e-3 to 2.28e-3 and the PyTorch
    pt2e module's from 0.138 to 2.43e-3 (`benchmarks/int8_runtime_gap.py`). Returns `model`.
    """
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


def lower(converted: torch.nn.Module, example: torch.Tensor):
    """converted pt2e module -> (edge program manager, ops outside the delegate); asserts delegation."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import default_decompositions

    from converters.executorch import _sdpa_plain, check_delegation, outside_delegate

    try:
        import executorch.kernels.quantized  # noqa: F401  (out variants, so a leak fails our assert, not lowering)
    except ImportError:
        pass
    ep = torch.export.export(converted, (example,))
    table = default_decompositions()
    table[torch.ops.aten.scaled_dot_product_attention.default] = _sdpa_plain
    ep = ep.run_decompositions(table)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    ops = outside_delegate(edge.exported_program().graph_module)
    leaked = {k: v for k, v in ops.items() if "quantize" in k}
    if leaked:
        raise QuantizeError(f"executorch: quantized ops left outside XNNPACK: {leaked}; the .pte would need "
                            "executorch.kernels.quantized at load time and run them unaccelerated")
    check_delegation(ops)
    return edge, ops


def write_pte(converted: torch.nn.Module, example: torch.Tensor, path: Path):
    """Lower a converted pt2e module (`lower`) and write its ExecuTorch program to `path`;
    returns (edge program manager, ops outside the delegate)."""
    edge, ops = lower(converted, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(edge.to_executorch().buffer)
    return edge, ops


def convert(ctx: QuantContext, quantizer, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """export the uint8-in graph of the int8 model -> prepare_pt2e(quantizer) -> observe the calibration
    photos one at a time -> convert_pt2e. The result runs in PyTorch (quantize/dequantize around float
    ops: the quantizer's arithmetic without a backend's kernels), and it is what the backends lower."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    example = torch.zeros(1, ctx.image_size, ctx.image_size, 3, dtype=torch.uint8)
    gm = torch.export.export(ctx.deploy(int8=True), (example,)).module()
    return convert_pt2e(calibrated(gm, quantizer, ctx.calibration.images), fold_quantize=fold_quantize)


def calibrated(gm: torch.fx.GraphModule, quantizer, images) -> torch.fx.GraphModule:
    """prepare_pt2e(gm, quantizer), then observe the calibration photos one at a time (uint8 NHWC)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for img in images:
            prepared(torch.from_numpy(img[None].copy()))
    return prepared


def quantize(ctx: QuantContext, out_dir: Path) -> TargetResult:
    """fp32 export (converters.executorch) for size, then pt2e int8 -> `<out_dir>/executorch/model.pte`."""
    from converters.executorch import delegate_count

    fp32 = fp32_artifact(ctx, "executorch", out_dir / "fp32" / "executorch")
    example = torch.zeros(1, ctx.image_size, ctx.image_size, 3, dtype=torch.uint8)
    names = quantized_module_names(ctx)
    dyn = ctx.dynamic
    dynamic = [n for n in names if dyn is not None and n.removeprefix("model.") in dyn.dynamic]
    static = [n for n in names if dyn is None or n.removeprefix("model.") in dyn.static]
    ctx.log(f"executorch: pt2e XNNPACK quantizer on {len(names)} Conv/Linear layers"
            + (f" ({len(dynamic)} dynamic, {len(static)} static, {len(dyn.float)} float)" if dyn else "")
            + f", calibrating on {len(ctx.calibration)} photos")
    int8_dir = out_dir / "executorch"
    path = int8_dir / "model.pte"
    try:
        edge, ops = write_pte(convert(ctx, xnnpack_quantizer(static, dynamic=dynamic)), example, path)
    except QuantizeError:
        raise
    except Exception as e:
        raise QuantizeError(f"executorch int8 failed: {type(e).__name__}: {e}") from e
    float_layers = ctx.float_layers("float, XNNPACK fp32 or the allow-listed portable ops: " + ", ".join(sorted(ops)))
    scheme = "pt2e XNNPACKQuantizer: int8 symmetric per-channel weights, int8 per-tensor activations (histogram)"
    notes = [f"{len(names)} Conv/Linear layers int8", f"{delegate_count(edge.exported_program().graph_module)} "
             "XNNPACK delegate segments; no quantize/dequantize op outside the delegate (asserted)"]
    extra = {"activations": "static"}
    if dyn is not None:
        float_layers = [f"{n} ({dyn.why[n]})" for n in sorted(dyn.float) if "depthwise" not in dyn.why[n]] + \
            [f"{sum('depthwise' in dyn.why[n] for n in dyn.float)} depthwise convs (XNNPACK has no dynamically "
             "quantized depthwise conv)"] + float_layers
        scheme = ("pt2e XNNPACKQuantizer, dynamic activations: int8 symmetric per-channel weights; each Conv/Linear "
                  "input quantized to int8 per photo at run time (XNNPACK qd8), its output float; "
                  f"{len(static)} layers static int8 (calibrated, histogram), {len(dyn.float)} layers float (depthwise convs, stem)")
        notes[0] = f"{len(dynamic)} Conv/Linear layers dynamic int8, {len(static)} static int8: {', '.join(static)}"
        extra = {"activations": "dynamic", "dynamic_scheme": dyn.to_dict()}
    if ctx.activations_choice is not None:
        extra["activations_choice"] = ctx.activations_choice
    m = finish_int8(ctx, "executorch", path, tool_versions("executorch", "torchao"), scheme, float_layers, notes,
                    extra=extra)
    m.metrics["export"] = {"fixed_batch": 1, "delegate": "XnnpackPartitioner", "portable_ops": dict(sorted(ops.items())),
                           "thread_safe": False}
    m.save(int8_dir)
    return TargetResult("executorch", int8_dir, fp32.manifest.size_bytes, m.size_bytes, float_layers, scheme, notes=notes)
