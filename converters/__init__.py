"""Export hierfg models to device formats, each artifact with a manifest and a parity record.

One module per target, one signature: `export(model, spec, out_dir) -> Artifact`, where `model` is a
`train.models.DeployWrapper` (uint8 NHWC image in; per-level log-probs, then an L2-normalized embedding
out). The other names are what the int8 stage builds on: the manifest, the embedded metadata, parity,
and running a model in batches.
"""

from ._common import (EMBEDDING_OUTPUT, Artifact, ExportError, ExportSpec, ParityError, check_parity, embedded_metadata,
                      embedding_parity, embedding_record, graph_output_names, output_names, parity, run_batched,
                      tool_versions, torch_logprobs, torch_outputs, write_manifest)
from ._registry import TARGETS, export_all, export_checkpoint, export_model, parity_images

__all__ = ["Artifact", "ExportError", "ExportSpec", "ParityError", "TARGETS", "export_all", "export_checkpoint",
           "export_model", "parity_images", "check_parity", "embedded_metadata", "output_names", "parity",
           "run_batched", "tool_versions", "torch_logprobs", "write_manifest", "EMBEDDING_OUTPUT", "embedding_parity",
           "embedding_record", "graph_output_names", "torch_outputs"]
