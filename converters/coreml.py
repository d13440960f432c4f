"""Core ML (.mlpackage, ML program, fp32) via coremltools from `torch.export`.

Core ML I/O has no uint8 type, so the package takes float32 NHWC pixel values 0..255 named `image`; the
normalization stays inside the graph. Prediction needs macOS: elsewhere export reloads the saved package and
checks its spec and metadata instead, and the manifest records `parity.measured = false` with the reason.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdk import InputSpec, Taxonomy

from ._common import (EMBEDDING_OUTPUT, Artifact, ExportError, ExportSpec, begin_export, embedded_metadata,
                      embedding_record, example_images, finish_export, graph_output_names, output_names, tool_versions)

PREDICTION_PLATFORM = "darwin"


def verify_package(path: str | Path, taxonomy: Taxonomy, image_size: int, batch: int,
                   embedding_dim: int | None = None) -> dict[str, Any]:
    """Reload a saved .mlpackage without compiling it (works on Linux) and check I/O spec and metadata;
    `embedding_dim`: the package also has the embedding output, this wide.

    Returns a record of what was checked; raises ExportError on the first mismatch.
    """
    import coremltools as ct
    from coremltools.proto import FeatureTypes_pb2 as ft

    try:
        ml = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:
        raise ExportError(f"coreml: saved package {path} does not reload ({type(e).__name__}: {e})") from e
    spec = ml.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"coreml: {path} is a {spec.WhichOneof('Type')}, expected an mlProgram")
    fp32 = ft.ArrayFeatureType.FLOAT32
    ins = list(spec.description.input)
    want_in = [batch, image_size, image_size, 3]
    if len(ins) != 1 or ins[0].name != "image" or list(ins[0].type.multiArrayType.shape) != want_in \
            or ins[0].type.multiArrayType.dataType != fp32:
        got = [(i.name, list(i.type.multiArrayType.shape), i.type.multiArrayType.dataType) for i in ins]
        raise ExportError(f"coreml: inputs {got}, expected [('image', {want_in}, FLOAT32)]")
    names = output_names(taxonomy)
    outs = [(o.name, list(o.type.multiArrayType.shape), o.type.multiArrayType.dataType) for o in spec.description.output]
    want_out = [(n, [batch, k], fp32) for n, k in zip(names, taxonomy.sizes)]
    if embedding_dim:
        want_out.append((EMBEDDING_OUTPUT, [batch, int(embedding_dim)], fp32))
    if outs != want_out:
        raise ExportError(f"coreml: outputs {outs}, expected {want_out}")
    meta = dict(spec.description.metadata.userDefined)
    tax_json = meta.get("hierfg.taxonomy")
    if tax_json is None or Taxonomy.from_dict(json.loads(tax_json)).hash != taxonomy.hash:
        raise ExportError("coreml: user_defined_metadata lacks the taxonomy, or it differs from the model's")
    pre = json.loads(meta.get("hierfg.preprocessing", "{}"))
    if pre.get("dtype") != "float32" or pre.get("size") != image_size or pre.get("layout") != "NHWC":
        raise ExportError(f"coreml: user_defined_metadata preprocessing is {pre}, expected float32 NHWC {image_size}")
    return {"reloaded": True, "type": "mlProgram", "input": ["image", want_in, "float32"],
            "outputs": [[n, s] for n, s, _ in outs], "metadata_keys": sorted(k for k in meta if k.startswith("hierfg."))}


def export(model: torch.nn.Module, spec: ExportSpec, out_dir: str | Path) -> Artifact:
    """Export a DeployWrapper-wrapped model to `<out_dir>/model.mlpackage` + manifest (parity on macOS only)."""
    import coremltools as ct

    out_dir, opts, taxonomy = begin_export("coreml", model, spec, out_dir)
    batch = int(opts["batch"])
    try:
        target = getattr(ct.target, opts["minimum_deployment_target"])
    except AttributeError:
        raise ExportError(f"coreml: unknown minimum_deployment_target {opts['minimum_deployment_target']!r}; "
                          "use e.g. iOS16, iOS17, macOS13") from None
    if spec.precision != "fp32":
        raise ExportError(f"coreml: only fp32 export is implemented here, got precision {spec.precision!r}")
    path = out_dir / "model.mlpackage"
    example = example_images(spec, batch, torch.float32)
    try:
        ep = torch.export.export(model, (example,)).run_decompositions({})
        ml = ct.convert(ep, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                        inputs=[ct.TensorType(name="image", shape=tuple(example.shape), dtype=np.float32)],
                        outputs=[ct.TensorType(name=n) for n in graph_output_names(model)],
                        minimum_deployment_target=target)
    except Exception as e:
        raise ExportError(f"coremltools conversion failed: {type(e).__name__}: {e}") from e
    emb = embedding_record(model)
    for k, v in embedded_metadata(taxonomy, spec, InputSpec(size=spec.image_size, dtype="float32"), emb).items():
        ml.user_defined_metadata[k] = v
    ml.short_description = f"hierfg {'/'.join(taxonomy.level_names)} classifier; float32 NHWC 0..255 RGB in, per-level log-probs out"
    if path.exists():
        shutil.rmtree(path)  # ct's save merges into an existing package directory; start clean so the hash is ours
    ml.save(str(path))
    export = {"fixed_batch": batch, "package_input": {"name": "image", "dtype": "float32", "range": "0..255",
                                                      "layout": "NHWC"},
              "minimum_deployment_target": opts["minimum_deployment_target"],
              "spec_check": verify_package(path, taxonomy, spec.image_size, batch, emb and emb["dim"]),
              "thread_safe": False}
    no_parity = None if sys.platform == PREDICTION_PLATFORM else (
        f"Core ML prediction needs macOS; exported on {sys.platform}, so only the reloaded package's spec and "
        "metadata were checked")
    return finish_export("coreml", model, path, spec, tool_versions("coremltools"), {"export": export}, no_parity)
