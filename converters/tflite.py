"""TFLite (LiteRT): uint8 NHWC image in, one log-prob tensor per level out, via litert-torch.

The DeployWrapper already takes NHWC uint8 and normalizes inside the graph, so the .tflite input is
exactly what a phone camera pipeline hands over. The batch size is fixed (option `batch`, default 1);
the SDK splits larger batches. Runs with ai-edge-litert's Interpreter (no TensorFlow needed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdk import Taxonomy

from ._common import Artifact, ExportError, ExportSpec, check_parity, tool_versions, write_manifest

OPTIONS = {"batch": 1}


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model (uint8 NHWC in) to `<out_dir>/model.tflite` + manifest."""
    import litert_torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = {**OPTIONS, **spec.options}
    if int(opts["batch"]) < 1:
        raise ExportError(f"tflite: option batch must be >= 1, got {opts['batch']!r}")
    taxonomy: Taxonomy = model.model.taxonomy
    path = out_dir / "model.tflite"
    example = torch.zeros(int(opts["batch"]), spec.image_size, spec.image_size, 3, dtype=torch.uint8)
    model.eval()
    try:
        litert_torch.convert(model, (example,)).export(str(path))
    except Exception as e:
        raise ExportError(f"litert_torch.convert failed: {type(e).__name__}: {e}") from e
    manifest = write_manifest("tflite", path, taxonomy, spec, tool_versions("litert-torch", "ai-edge-litert"))
    manifest.metrics["export"] = {"fixed_batch": int(opts["batch"]), "runtime": "ai_edge_litert.interpreter.Interpreter",
                                  "signature": "serving_default", "thread_safe": False}
    manifest = check_parity("tflite", model, path, manifest, spec)
    return Artifact("tflite", path, manifest, out_dir)
