"""hierfg SDK: classify images on device into a label-tree-consistent path.

Imports numpy and Pillow only; the runtime an artifact needs (onnxruntime, ai-edge-litert,
executorch, coremltools) is imported when a model of that kind is loaded. Never torch.
"""

from ._backends import available_backends, register_backend
from ._classifier import Classifier, HierarchicalPrediction, ItemError, LevelPrediction
from ._decode import TreeDecoder
from ._errors import (
    HierfgError,
    Int8AccuracyWarning,
    InvalidImageError,
    ModelIntegrityError,
    ModelOutputError,
    TaxonomyError,
    UnsupportedFormatError,
)
from ._image import load_image, prepare
from ._manifest import InputSpec, Manifest, sha256_file
from ._taxonomy import Node, Taxonomy

__version__ = "0.1.0"

__all__ = [
    "Classifier", "HierarchicalPrediction", "ItemError", "LevelPrediction", "TreeDecoder",
    "HierfgError", "Int8AccuracyWarning", "InvalidImageError", "ModelIntegrityError", "ModelOutputError", "TaxonomyError",
    "UnsupportedFormatError", "load_image", "prepare", "InputSpec", "Manifest", "sha256_file",
    "Node", "Taxonomy", "available_backends", "register_backend", "__version__",
]
