"""TFLite int8: litert-torch's PT2E quantizer, int8 weights per channel and int8 activations.

The same export, layer filter and calibration as ExecuTorch (`quantize.executorch.convert`); the .tflite
input tensor stays uint8 with no scale or zero point, so the SDK feeds it unchanged (asserted).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from converters import embedded_metadata, embedding_record
from converters.tflite import finish_file

from ._common import QuantContext, QuantizeError, TargetResult, failing_as, finish_int8, fp32_artifact
from .executorch import convert, fuse_clamp_outputs, layer_filter, quantized_module_names
from .recipes import TFLiteRecipe


def litert_quantizer(names: list[str], is_qat: bool = False):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)
    filt = layer_filter(names)

    class LayerQuantizer(PT2EQuantizer):
        def _annotate_for_static_quantization_config(self, model):
            return fuse_clamp_outputs(self._annotate_all_static_patterns(model, cfg, filt))

    # litert's converter reads the global config (static vs dynamic); annotation ignores it (overridden above)
    return LayerQuantizer().set_global(cfg)


def write_tflite(converted: torch.nn.Module, quantizer, example: torch.Tensor, path: Path) -> None:
    """Convert a converted pt2e module with litert-torch (reading `quantizer`'s static/dynamic config)
    and write the .tflite to `path`."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    litert_torch.convert(converted, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))


def finish_tflite(ctx: QuantContext, path: Path, fp32_size: int | None, scheme: str, notes: list[str],
                  versions=("litert-torch", "ai-edge-litert")) -> TargetResult:
    """Metadata, the uint8-input and int8-tensor checks, manifest and SDK parity of a converted int8
    .tflite (`write_tflite`)."""
    from ai_edge_litert.interpreter import Interpreter

    finish_file(path, embedded_metadata(ctx.taxonomy, ctx.spec("int8"), embedding=embedding_record(ctx.deploy())))
    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    if np.dtype(inp["dtype"]) != np.uint8 or any(inp["quantization"]) and inp["quantization"] != (0.0, 0):
        raise QuantizeError(f"tflite int8: input tensor is {np.dtype(inp['dtype']).name} with quantization "
                            f"{inp['quantization']}; the SDK feeds the raw uint8 image")
    types = dict(Counter(np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()))
    if not types.get("int8"):
        raise QuantizeError(f"tflite int8: no int8 tensor in the converted model ({types})")
    notes = [*notes[:1], f"tensor dtypes: {types}", "input tensor: uint8 image, not quantized (the graph casts and "
             "normalizes it)", *notes[1:]]
    export = {"fixed_batch": 1, "runtime": "ai_edge_litert.interpreter.Interpreter", "signature": "serving_default",
              "thread_safe": False}
    return finish_int8(ctx, "tflite", path, fp32_size, versions, scheme, ctx.float_layers("float ops"),
                       notes, export=export)


def quantize(ctx: QuantContext, out_dir: Path, recipe: TFLiteRecipe) -> TargetResult:
    """fp32 export (converters.tflite) for size, then PT2E int8 -> `<out_dir>/tflite/model.tflite`."""
    fp32 = fp32_artifact(ctx, "tflite", out_dir)
    names = quantized_module_names(ctx)
    ctx.log(f"tflite: litert PT2E quantizer on {len(names)} Conv/Linear layers, calibrating on "
            f"{len(ctx.calibration)} photos")
    path = out_dir / "tflite" / "model.tflite"
    path.parent.mkdir(parents=True, exist_ok=True)
    quantizer = litert_quantizer(names)
    with failing_as("tflite int8"):
        write_tflite(convert(ctx, quantizer, fold_quantize=False), quantizer, ctx.example(), path)
    scheme = "litert-torch PT2EQuantizer: int8 symmetric per-channel weights, int8 per-tensor activations (histogram)"
    return finish_tflite(ctx, path, fp32.manifest.size_bytes, scheme, [f"{len(names)} Conv/Linear layers int8"])
