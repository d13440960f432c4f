"""TFLite (LiteRT): uint8 NHWC image in, one log-prob tensor per level out, via litert-torch.

The batch size is fixed (option `batch`, default 1; the SDK splits larger batches). The flatbuffer's
`metadata` table gets a `hierfg` JSON entry with the keys ONNX and Core ML carry, so the file keeps its
labels without the manifest beside it (`read_metadata`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdk import atomic_write

from ._common import (Artifact, ExportError, ExportSpec, begin_export, embedded_metadata, embedding_record,
                      example_images, finish_export, tool_versions)

METADATA_NAME = "hierfg"


def _strip_debug_names(model) -> None:
    """Rename every tensor that is not a graph input or output to its index. litert-torch names
    intermediate tensors after their PyTorch module path: debug information the runtime never reads
    (the SDK binds inputs and outputs through the signature, whose keys are kept). On the query
    student that is 0.12 MB, 2 % of the int8 file."""
    for sg in model.subgraphs or []:
        io = {int(i) for i in [*(sg.inputs if sg.inputs is not None else []), *(sg.outputs if sg.outputs is not None else [])]}
        for i, t in enumerate(sg.tensors or []):
            if i not in io:
                t.name = str(i)


def finish_file(path: Path, meta: dict[str, str]) -> None:
    """The one rewrite of a converted .tflite (fp32 or int8): strip the debug tensor names and append
    a `hierfg` JSON entry to the flatbuffer's metadata table."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(path.read_bytes(), 0))
    if any(m.name in (METADATA_NAME, METADATA_NAME.encode()) for m in model.metadata or []):
        raise ExportError(f"tflite: {path} already has a {METADATA_NAME!r} metadata entry")
    _strip_debug_names(model)
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(path.stat().st_size + (1 << 16))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    atomic_write(path, bytes(builder.Output()))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `hierfg` metadata entry of a .tflite file; ExportError when it has none."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode())
    raise ExportError(f"{path}: no {METADATA_NAME!r} metadata entry (exported by something other than hierfg?)")


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model (uint8 NHWC in) to `<out_dir>/model.tflite` + manifest."""
    import litert_torch

    out_dir, opts, taxonomy = begin_export("tflite", model, spec, out_dir)
    path = out_dir / "model.tflite"
    try:
        litert_torch.convert(model, (example_images(spec, opts["batch"]),)).export(str(path))
    except Exception as e:
        raise ExportError(f"litert_torch.convert failed: {type(e).__name__}: {e}") from e
    finish_file(path, embedded_metadata(taxonomy, spec, embedding=embedding_record(model)))
    export = {"fixed_batch": int(opts["batch"]), "runtime": "ai_edge_litert.interpreter.Interpreter",
              "signature": "serving_default", "thread_safe": False}
    versions = tool_versions("litert-torch", "ai-edge-litert")
    return finish_export("tflite", model, path, spec, versions, {"export": export})
