"""SDK test helpers: a copy of the ONNX artifact to tamper with, and a fake backend that emits NaN/Inf.

The fake backend exists because no real export produces NaN on purpose; it lets RELIABILITY.md rows
14 and 17 be tested through the real `Classifier` (load, verification, decoding) end to end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sdk import available_backends, register_backend
from sdk._backends import Backend

FAKE = "test-fake-nan"


if FAKE not in available_backends():
    @register_backend(FAKE)
    class NanBackend(Backend):
        """Deterministic log-probs from the image mean; an all-black image gives NaN at the finest level
        and an all-white image +Inf at the coarsest one."""

        def run(self, batch: np.ndarray) -> list[np.ndarray]:
            sizes = self.manifest.taxonomy.sizes
            mean = batch.reshape(batch.shape[0], -1).mean(axis=1)
            outs = []
            for lvl, n in enumerate(sizes):
                logits = np.cos(np.arange(n)[None, :] * (1 + mean[:, None] / 50.0) + lvl)
                lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
                outs.append(lp.astype(np.float32))
            outs[-1][mean == 0] = np.nan
            outs[0][mean == 255] = np.inf
            if self.manifest.embedding:  # the artifact declares an embedding output after the levels
                emb = np.cos(np.arange(self.manifest.embedding["dim"])[None, :] * (1 + mean[:, None] / 50.0))
                outs.append((emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32))
            return outs


@pytest.fixture
def model_copy(onnx_artifact_dir, tmp_path) -> Path:
    """A private copy of the ONNX artifact directory that a test may corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(onnx_artifact_dir, dst)
    return dst


@pytest.fixture(scope="session")
def classifier(onnx_artifact_dir):
    from sdk import Classifier
    return Classifier.load(onnx_artifact_dir)


@pytest.fixture(scope="session")
def fake_backend() -> str:
    """Name of the registered NaN/Inf-emitting backend."""
    return FAKE
