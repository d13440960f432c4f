"""ONNX int8: `quantize_static` QDQ on the fp32 export, int8 weights per channel, calibrated on real photos.

Nodes of the plan's float families are excluded by name (the exporter names nodes after their module path),
and so are the attention matmuls unless the plan quantizes attention. Not `quantize_dynamic`: it turns
convolutions into ConvInteger (10x slower here). U8S8, what ORT's fast kernels take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ._common import QuantContext, QuantizeError, TargetResult, failing_as, finish_int8, fp32_artifact
from .recipes import OnnxRecipe
from .sim import ATTENTION, Family

# Clip (ReLU6) is listed so ORT folds it into the conv's output range instead of quantizing pre-activation.
# Pad (the TF "same" padding of stride-2 convs) and Add (the MBConv skip connections) are quantized in
# the backbone only: there they sit between int8 convs, and in float each costs a DequantizeLinear +
# QuantizeLinear pair (8 % of the int8 run time measured here); in the head the residual adds feed
# LayerNorm, which stays float.
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Clip", "Relu", "Pad", "Add"]
BACKBONE_ONLY_OPS = ("Pad", "Add")
BACKBONE_NODE_PREFIXES = ("/model/_blocks.", "/model/_conv_stem", "/model/_conv_head", "/model/_bn")


class PhotoCalibrationReader:
    """onnxruntime CalibrationDataReader over real uint8 photos (never random tensors)."""

    def __init__(self, input_name: str, batches):
        self._feeds = [{input_name: b} for b in batches]
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def excluded_nodes(proto, float_families: Sequence[Family] = (), quantize_attention: bool = False,
                   ) -> tuple[list[str], list[str]]:
    """(node names kept float, a description of each reason): Pad/Add outside the backbone, nodes of
    the `float_families`, and the attention matmuls (MatMul with no weight initializer) unless
    `quantize_attention`."""
    inits = {i.name for i in proto.graph.initializer}
    consts = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    out, why = [], []
    for n in proto.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        if n.op_type in BACKBONE_ONLY_OPS:
            if not n.name.startswith(BACKBONE_NODE_PREFIXES):
                out.append(n.name)
                why.append(f"{n.op_type} outside the backbone")
                continue
        dotted = n.name.replace("/", ".")  # "/model/head/cross.1.0/attn/v/MatMul": ".model.head.cross.1.0.attn.v..."
        # the backbone runs through `forward_range`, not `__call__`, so its nodes carry no `backbone` scope
        fam = next((f for f in float_families if any(dotted.startswith(f".model.{p}.") or
                                                     dotted.startswith(f".model.{p.removeprefix('backbone.')}.")
                                                     for p in f.prefixes)), None)
        if fam is not None:
            out.append(n.name)
            why.append(fam.name)
        elif n.op_type == "MatMul" and not any(i in inits or i in consts for i in n.input) and not quantize_attention:
            out.append(n.name)
            why.append(ATTENTION)
    return out, why


def quantize_graph(src: str | Path, dst: str | Path, input_name: str, batches: Iterable[np.ndarray],
                   exclude: Sequence[str] = (), ops: Sequence[str] = QUANTIZED_OPS, **options) -> None:
    """`quantize_static`, QDQ, per-channel weights, MinMax-calibrated on `batches` of real uint8 photos, U8S8
    (uint8 activations, int8 weights: what ORT's fast x86/ARM kernels take); `options` override
    `quantize_static`'s arguments (the research studies' other schemes)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), PhotoCalibrationReader(input_name, batches), **{
        "quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8, "op_types_to_quantize": list(ops), "nodes_to_exclude": list(exclude), **options})


def fold_pads(proto) -> int:
    """Fold each constant zero Pad (TF "same" padding of a stride-2 conv, asymmetric) into the Conv it feeds:
    ONNX Conv takes asymmetric `pads`. onnxruntime fuses these only in float graphs; in a QDQ graph each
    Pad would run in float between a DequantizeLinear and a QuantizeLinear. Returns how many were folded."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    folded = []
    for pad in proto.graph.node:
        if pad.op_type != "Pad" or pad.input[1] not in inits or pad.output[0] in outputs:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = numpy_helper.to_array(inits[pad.input[2]]) if len(pad.input) > 2 and pad.input[2] in inits else 0
        users = consumers.get(pad.output[0], [])
        pads = numpy_helper.to_array(inits[pad.input[1]]).tolist()  # [x1_begin, x2_begin, ..., x1_end, ...]
        if (mode != b"constant" or (len(pad.input) > 2 and pad.input[2] and pad.input[2] not in inits)
                or float(value) != 0.0 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0
                or len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]
                or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in users[0].attribute)):
            continue
        conv = users[0]
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [onnx.helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        proto.graph.node.remove(pad)
    used = {x for n in proto.graph.node for x in n.input}
    for name in {x for pad in folded for x in pad.input[1:]} - used:
        if name in inits:
            proto.graph.initializer.remove(inits[name])
    return len(folded)


def quantize(ctx: QuantContext, out_dir: Path, recipe: OnnxRecipe) -> TargetResult:
    """fp32 export (converters.onnx) -> quantize_static QDQ per-channel -> `<out_dir>/onnx` + manifest."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = fp32_artifact(ctx, "onnx", out_dir)
    src = fp32_artifact(ctx, "onnx", out_dir, ctx.int8_model)
    # ORT's recommended pre-pass: shape inference + graph optimizations (constant folding, fusions)
    # on the fp32 graph, so the quantizer sees the graph ORT will run
    pre = out_dir / "fp32" / "onnx-preprocessed.onnx"
    quant_pre_process(str(src.path), str(pre), skip_symbolic_shape=False)
    proto = onnx.load(str(pre))
    if fold_pads(proto):
        onnx.save(proto, str(pre))
    excl, why = excluded_nodes(proto, ctx.float_layer_families, ATTENTION in ctx.plan.quantized)
    path = out_dir / "onnx" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"onnx: quantize_static QDQ per-channel on {len(ctx.calibration)} photos, "
            f"{len(excl)} Conv/MatMul nodes kept float")
    with failing_as("onnxruntime quantize_static"):
        quantize_graph(pre, path, proto.graph.input[0].name, ctx.calibration_batches(), excl)
    q = onnx.load(str(path))
    props = {p.key: "int8" if p.key == "hierfg.precision" else p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(q, props)
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    if n_q == 0:
        raise QuantizeError("quantize_static inserted no QuantizeLinear node: nothing was quantized")
    onnx.save(q, str(path))
    float_layers = [f"{f} ({why.count(f)} nodes)" for f in sorted(set(why))] + \
        ["LayerNorm, softmax, residual adds, log-softmax (ops not quantized)"]
    scheme = "onnxruntime quantize_static, QDQ, U8 activations / S8 weights per channel, MinMax calibration"
    notes = [f"{n_q} QuantizeLinear nodes"]
    # read by the SDK at load time: on x86 without VNNI the fused kernels saturate signed int8 weights,
    # so the SDK runs such a graph unfused there
    types = {"activations": "uint8", "weights": "int8", "reduce_range": False}
    return finish_int8(ctx, "onnx", path, fp32.manifest.size_bytes, ("onnx", "onnxruntime"), scheme,
                       float_layers, notes, extra={"onnx_types": types}, result_extra={"excluded_nodes": excl})
