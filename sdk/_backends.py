"""Runtime backends. Each imports its runtime lazily, so the SDK needs only the one the artifact uses.

A backend takes a uint8 NHWC batch and returns one (batch, n_level) float array per level.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ._errors import ModelIntegrityError
from ._manifest import Manifest

_REGISTRY: dict[str, Callable[..., "Backend"]] = {}


def register_backend(target: str):
    def deco(cls):
        if target in _REGISTRY:
            raise ValueError(f"backend for target {target!r} is already registered")
        _REGISTRY[target] = cls
        return cls
    return deco


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, path: Path, manifest: Manifest, num_threads: int | None) -> "Backend":
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ModelIntegrityError(
            f"no backend {name!r}; available: {', '.join(available_backends())}") from None
    return cls(path, manifest, num_threads)


class Backend:
    """Base class. `thread_safe` False means the Classifier serializes calls with a lock."""

    thread_safe = True
    fixed_batch: int | None = None  # set when the artifact only accepts one batch size

    def __init__(self, path: Path, manifest: Manifest, num_threads: int | None):
        self.path = path
        self.manifest = manifest
        self.num_threads = num_threads

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


@register_backend("onnx")
class OnnxRuntimeBackend(Backend):
    thread_safe = True  # InferenceSession.run is documented as thread-safe

    def __init__(self, path: Path, manifest: Manifest, num_threads: int | None):
        super().__init__(path, manifest, num_threads)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModelIntegrityError("the ONNX backend needs onnxruntime: pip install onnxruntime") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads or 1)
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelIntegrityError(f"{path}: onnxruntime could not load the model ({e})") from None
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if names != list(manifest.outputs):
            raise ModelIntegrityError(f"{path}: graph outputs {names} differ from the manifest's {manifest.outputs}")
        self.output_names = names

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})


class LockedBackend(Backend):
    """Wraps a backend whose runtime object must not be used from two threads at once."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.manifest = inner.manifest
        self.fixed_batch = inner.fixed_batch
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self.inner.run(batch)
