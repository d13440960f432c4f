"""ONNX: uint8 NHWC image in (dynamic batch), one log-prob tensor per level out; opset 17.

The taxonomy, input spec and output names are also written into the model's `metadata_props`, so
the .onnx file carries its labels even without the manifest beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdk import Taxonomy

from ._common import begin_export, example_images, Artifact, ExportError, ExportSpec, check_parity, output_names, tool_versions, write_manifest
from ._metadata import embedded_metadata

OPTIONS = {"opset": 17, "dynamic_batch": True}


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model (uint8 NHWC in) to `<out_dir>/model.onnx` + manifest."""
    import onnx

    out_dir, opts, taxonomy = begin_export("onnx", model, spec, out_dir, OPTIONS)
    names = output_names(taxonomy)
    path = out_dir / "model.onnx"
    example = example_images(spec, 2)
    try:
        torch.onnx.export(
            model, (example,), str(path), input_names=["image"], output_names=names,
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}} if opts["dynamic_batch"] else None,
            opset_version=opts["opset"], dynamo=False,
        )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {e}") from e
    proto = onnx.load(str(path))
    for k, v in embedded_metadata(taxonomy, spec).items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    manifest = write_manifest("onnx", path, taxonomy, spec, tool_versions("onnx", "onnxruntime"))
    manifest = check_parity("onnx", model, path, manifest, spec)
    return Artifact("onnx", path, manifest, out_dir)
