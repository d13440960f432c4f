"""`Classifier`: load a verified artifact, classify images into a tree-consistent path."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._backends import Backend, LockedBackend, create_backend
from ._decode import TreeDecoder
from ._errors import HierfgError, ModelIntegrityError, ModelOutputError
from ._image import ImageSource, prepare
from ._manifest import Manifest
from ._taxonomy import Taxonomy


@dataclass(frozen=True)
class LevelPrediction:
    level: str
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class HierarchicalPrediction:
    """One image's answer.

    `path` is the answer: root-to-node, stopping at the deepest level whose marginal clears its
    threshold (it may be shorter than the tree is deep; empty when even the root level is unsure).
    `full_path` is the same walk without back-off. `top_k[level]` lists (label, marginal) pairs.
    """

    path: tuple[LevelPrediction, ...]
    full_path: tuple[LevelPrediction, ...]
    top_k: dict[str, tuple[tuple[str, float], ...]]
    is_unknown: bool = False
    unknown_score: float = 0.0

    @property
    def deepest_confident(self) -> LevelPrediction | None:
        return self.path[-1] if self.path else None

    @property
    def label(self) -> str | None:
        return self.path[-1].label if self.path else None

    @property
    def is_complete(self) -> bool:
        return len(self.path) == len(self.full_path)

    def breadcrumb(self, sep: str = " › ") -> str:
        if self.is_unknown:
            return "unknown item"
        return sep.join(p.label for p in self.path) if self.path else "uncertain"

    def to_dict(self) -> dict[str, Any]:
        def lv(p: LevelPrediction) -> dict[str, Any]:
            return {"level": p.level, "index": p.index, "label": p.label, "probability": p.probability}
        return {
            "path": [lv(p) for p in self.path],
            "full_path": [lv(p) for p in self.full_path],
            "top_k": {k: [{"label": l, "probability": s} for l, s in v] for k, v in self.top_k.items()},
            "deepest_confident": lv(self.path[-1]) if self.path else None,
            "is_unknown": self.is_unknown,
            "unknown_score": self.unknown_score,
            "breadcrumb": self.breadcrumb(),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kw)


@dataclass(frozen=True)
class ItemError:
    """Stands in a batch result where one item failed; the others are still answered."""

    index: int
    error: HierfgError | ValueError | OSError

    def __str__(self) -> str:
        return f"item {self.index}: {type(self.error).__name__}: {self.error}"


class Classifier:
    """Classify images with an exported hierfg model.

    >>> clf = Classifier.load("out/onnx")                                     # doctest: +SKIP
    >>> clf.classify("apple.jpg").breadcrumb()                               # doctest: +SKIP
    'Fruit › Apple › Granny-Smith'
    """

    def __init__(self, backend: Backend, manifest: Manifest, directory: Path):
        self.manifest = manifest
        self.directory = directory
        self.taxonomy: Taxonomy = manifest.taxonomy
        self.input_size = int(manifest.input.size)
        self._backend = backend if backend.thread_safe else LockedBackend(backend)
        self._decoder = TreeDecoder(self.taxonomy)
        dec = manifest.decoding or {}
        self.thresholds = self._check_thresholds(dec.get("thresholds"))
        self.unknown_threshold = dec.get("unknown_threshold")

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None, num_threads: int | None = None) -> "Classifier":
        """Load a model directory (artifact + manifest.json), or the manifest file itself.

        The artifact's size and sha256 are checked against the manifest before any runtime parses it;
        then the runtime's output shapes are checked against the taxonomy.
        """
        path = Path(path)
        if not path.exists():
            raise ModelIntegrityError(f"{path}: model path does not exist")
        directory = path if path.is_dir() else path.parent
        manifest = Manifest.load(path)
        artifact = manifest.verify(directory)
        be = create_backend(backend or manifest.target, artifact, manifest, num_threads)
        clf = cls(be, manifest, directory)
        clf._check_outputs()
        return clf

    def _check_thresholds(self, thresholds: Sequence[float] | None) -> tuple[float, ...]:
        if thresholds is None:
            return (0.0,) * self.taxonomy.depth
        t = tuple(float(x) for x in thresholds)
        if len(t) != self.taxonomy.depth or not all(0.0 <= x <= 1.0 for x in t):
            raise ValueError(f"thresholds must be {self.taxonomy.depth} numbers in [0, 1]; got {thresholds}")
        return t

    def _check_outputs(self) -> None:
        probe = np.zeros((1, self.input_size, self.input_size, 3), np.uint8)
        try:
            outs = self._backend.run(probe)
        except Exception as e:
            raise ModelIntegrityError(f"{self.directory}: the model failed on a probe input ({e})") from None
        sizes = [np.asarray(o).shape[-1] for o in outs]
        if len(outs) != self.taxonomy.depth or sizes != list(self.taxonomy.sizes):
            raise ModelIntegrityError(
                f"{self.directory}: model outputs have sizes {sizes}, the taxonomy's levels have "
                f"{list(self.taxonomy.sizes)} labels")

    # ---- inference ------------------------------------------------------------------------------
    def preprocess(self, image: ImageSource) -> np.ndarray:
        return prepare(image, self.input_size)

    def logprobs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Raw per-level log-probabilities for a uint8 (N, S, S, 3) batch."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        fixed = self._backend.fixed_batch
        if fixed and batch.shape[0] != fixed:
            parts = [self._backend.run(batch[i:i + fixed]) for i in range(0, batch.shape[0], fixed)]
            return [np.concatenate([p[l] for p in parts]) for l in range(len(parts[0]))]
        return [np.asarray(o, dtype=np.float64) for o in self._backend.run(batch)]

    def _predict(self, marg: list[np.ndarray], row: int, top_k: int, thresholds: tuple[float, ...]) -> HierarchicalPrediction:
        tax = self.taxonomy
        idx = self._decoder.greedy_path(marg, row)
        full = tuple(
            LevelPrediction(tax.level_names[l], i, tax.node(l, i).name, float(marg[l][row, i]))
            for l, i in enumerate(idx)
        )
        path = []
        for p, t in zip(full, thresholds):
            if p.probability < t:
                break
            path.append(p)
        topk = {}
        for l, name in enumerate(tax.level_names):
            order = np.argsort(-marg[l][row], kind="stable")[:top_k]
            topk[name] = tuple((tax.node(l, int(i)).name, float(marg[l][row, i])) for i in order)
        unknown_score = 1.0 - float(marg[0][row].max())
        is_unknown = self.unknown_threshold is not None and unknown_score > float(self.unknown_threshold)
        return HierarchicalPrediction(tuple(path) if not is_unknown else (), full, topk, is_unknown, unknown_score)

    def classify(self, image: ImageSource, top_k: int = 5,
                 thresholds: Sequence[float] | None = None) -> HierarchicalPrediction:
        """Classify one image (path, bytes, PIL image, or uint8 HxWx3 RGB array)."""
        return self.classify_batch([image], top_k=top_k, thresholds=thresholds, raise_errors=True)[0]

    def classify_batch(self, images: Sequence[ImageSource], top_k: int = 5,
                       thresholds: Sequence[float] | None = None,
                       raise_errors: bool = False) -> list[HierarchicalPrediction | ItemError]:
        """Classify many images; a bad item yields an `ItemError` naming its index, the rest are answered."""
        th = self._check_thresholds(thresholds) if thresholds is not None else self.thresholds
        arrays: list[np.ndarray] = []
        where: list[int] = []
        results: list[HierarchicalPrediction | ItemError | None] = [None] * len(images)
        for i, img in enumerate(images):
            try:
                arrays.append(self.preprocess(img))
                where.append(i)
            except (HierfgError, ValueError, OSError, TypeError) as e:
                if raise_errors:
                    raise
                results[i] = ItemError(i, e)
        if arrays:
            marg = self._decoder.marginals(self.logprobs(np.stack(arrays)))
            for row, i in enumerate(where):
                results[i] = self._predict(marg, row, top_k, th)
        return results  # type: ignore[return-value]
