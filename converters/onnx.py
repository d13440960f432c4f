"""ONNX: uint8 NHWC image in (dynamic batch), one log-prob tensor per level and the embedding out; opset 17.

The taxonomy, input spec and output names are also written into the model's `metadata_props`, so
the .onnx file carries its labels even without the manifest beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import (Artifact, ExportError, ExportSpec, begin_export, embedded_metadata, embedding_record,
                      example_images, finish_export, graph_output_names, tool_versions)


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model (uint8 NHWC in) to `<out_dir>/model.onnx` + manifest."""
    import onnx

    out_dir, opts, taxonomy = begin_export("onnx", model, spec, out_dir)
    names = graph_output_names(model)  # the levels, then the embedding
    path = out_dir / "model.onnx"
    try:
        torch.onnx.export(
            model, (example_images(spec, 2),), str(path), input_names=["image"], output_names=names,
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}} if opts["dynamic_batch"] else None,
            opset_version=opts["opset"], dynamo=False,
        )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {e}") from e
    proto = onnx.load(str(path))
    for k, v in embedded_metadata(taxonomy, spec, embedding=embedding_record(model)).items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return finish_export("onnx", model, path, spec, tool_versions("onnx", "onnxruntime"))
