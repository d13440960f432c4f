"""hierfg SDK: classify images on device into a label-tree-consistent path.

Imports numpy and Pillow only; the runtime an artifact needs (onnxruntime, ai-edge-litert,
executorch, coremltools) is imported when a model of that kind is loaded. Never torch.
"""

from . import datasets
from ._backends import (VNNI_FLAGS, BackendUnavailableError, Registry, available_backends, concat_levels,
                        register_backend)
from ._calibrate import answered_depth, batch_logprobs, decode_set, lca_height
from ._classifier import Classifier, HierarchicalPrediction, ItemError, LevelPrediction
from ._decode import TreeDecoder
from ._enroll import ENROLLMENT_NAME, EnrolledClass
from ._errors import (
    EmbeddingUnavailableError,
    EnrollmentError,
    EnrollmentFileError,
    HierfgError,
    Int8FallbackWarning,
    InvalidImageError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelOutputError,
    TaxonomyError,
    UnsupportedFormatError,
)
from ._files import atomic_write, sha256_file, size_bytes
from ._image import load_image, prepare
from ._manifest import FORMAT_VERSION, InputSpec, Manifest
from ._taxonomy import IMAGE_SUFFIXES, Node, Taxonomy
from .datasets import HierDataset, Sample, load_dataset, stratified_holdout

__version__ = "0.1.0"

__all__ = [
    "Classifier", "HierarchicalPrediction", "ItemError", "LevelPrediction", "TreeDecoder",
    "HierfgError", "Int8FallbackWarning", "InvalidImageError", "ModelIntegrityError", "ModelNotFoundError",
    "ModelOutputError", "TaxonomyError", "UnsupportedFormatError", "load_image", "prepare", "InputSpec", "Manifest",
    "sha256_file", "Node", "Taxonomy", "available_backends", "register_backend", "__version__",
    "datasets", "HierDataset", "Sample", "load_dataset", "stratified_holdout",
    # helpers the other stages share (public so no package reaches into sdk's private modules)
    "atomic_write", "size_bytes", "FORMAT_VERSION", "IMAGE_SUFFIXES", "Registry", "BackendUnavailableError",
    "VNNI_FLAGS", "answered_depth", "decode_set", "lca_height", "batch_logprobs", "concat_levels",
    "EnrolledClass", "ENROLLMENT_NAME", "EmbeddingUnavailableError", "EnrollmentError", "EnrollmentFileError",
]
