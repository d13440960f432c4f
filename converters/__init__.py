"""Export hierfg models to device formats, each artifact with a manifest and a parity record.

One module per target, one signature: `export(model, spec, out_dir) -> Artifact`, where `model` is a
`train.models.DeployWrapper` (uint8 NHWC image in, per-level log-probs out).
"""

from ._common import Artifact, ExportError, ExportSpec, ParityError
from ._registry import TARGETS, export_all, export_checkpoint, parity_images

__all__ = ["Artifact", "ExportError", "ExportSpec", "ParityError", "TARGETS", "export_all", "export_checkpoint", "parity_images"]
