"""Export hierfg models to device formats, each artifact with a manifest and a parity record.

One module per target, one signature: `export(model, spec, out_dir) -> Artifact`, `model` a
`train.models.DeployWrapper`. The other names are what the int8 stage builds on.
"""

from ._common import (Artifact, ExportError, ExportSpec, ParityError, embedded_metadata, embedding_record,
                      finish_export, parity, run_batched, tool_versions, torch_logprobs, torch_outputs)
from ._registry import TARGETS, export_all, export_checkpoint, export_model, parity_images

__all__ = ["Artifact", "ExportError", "ExportSpec", "ParityError", "TARGETS", "export_all", "export_checkpoint",
           "export_model", "parity_images", "embedded_metadata", "embedding_record", "finish_export", "parity",
           "run_batched", "tool_versions", "torch_logprobs", "torch_outputs"]
