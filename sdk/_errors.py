"""Typed errors of the SDK. Each message says what was wrong and what to do."""


class HierfgError(Exception):
    """Base class of every error the SDK raises on purpose."""


class TaxonomyError(HierfgError, ValueError):
    """The label tree is malformed (cycle, orphan, duplicate name, leaf above the deepest level)."""


class InvalidImageError(HierfgError, ValueError):
    """The input could not be decoded as an image, or is not a usable image."""


class UnsupportedFormatError(InvalidImageError):
    """The image decodes, but its format is outside the allowlist (decided by content)."""


class ModelIntegrityError(HierfgError):
    """A model artifact or its manifest failed a check (missing file, hash, format, shapes, taxonomy)."""


class ModelNotFoundError(HierfgError, FileNotFoundError):
    """The model path does not exist (as opposed to a model that is there but fails a check)."""


class ModelOutputError(HierfgError):
    """The model produced outputs that cannot be turned into a label (NaN, Inf, wrong shape)."""


class Int8FallbackWarning(RuntimeWarning):
    """An int8 artifact runs through a slower path here: this CPU's fast int8 kernels would change its answers."""


class EmbeddingUnavailableError(HierfgError):
    """The model has no embedding output (exported before enrollment existed): it classifies, but cannot enroll."""


class EnrollmentError(HierfgError, ValueError):
    """An enrollment request cannot be honoured (unknown parent, label taken, no usable photo)."""


class EnrollmentFileError(ModelIntegrityError):
    """The enrollment file beside a model is refused: corrupt, tampered with, or made for another model."""
