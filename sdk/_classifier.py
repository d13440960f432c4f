"""`Classifier`: load a verified artifact, classify images into a tree-consistent path."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from ._backends import _BACKENDS, Backend, LockedBackend
from ._decode import DEFAULT_UNKNOWN_SCORE, UNKNOWN_SCORES, TreeDecoder, unknown_scores
from ._enroll import (ENROLLMENT_NAME, MIN_PHOTOS, STATS_NAME, EmbeddingStats, Enrollment, EnrolledClass, fit_class,
                      load_enrollment, mirror_views, normalize, save_enrollment, validate_request)
from ._errors import EmbeddingUnavailableError, EnrollmentError, HierfgError, ModelIntegrityError, ModelOutputError
from ._files import atomic_write
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
    """One image's answer (fields: docs/sdk.md, "HierarchicalPrediction fields"). `taxonomy` travels with
    it because another thread may enroll or forget a product while it is read."""

    path: tuple[LevelPrediction, ...]
    full_path: tuple[LevelPrediction, ...]
    top_k: dict[str, tuple[tuple[str, float], ...]]
    is_unknown: bool = False
    unknown_score: float = 0.0
    allowed_mass: float = 1.0
    taxonomy: Taxonomy | None = field(default=None, repr=False, compare=False)

    @property
    def deepest_confident(self) -> LevelPrediction | None:
        """The node the answer stops at (None when nothing cleared its threshold, or unknown)."""
        return self.path[-1] if self.path else None

    @property
    def is_complete(self) -> bool:
        """True when the answer reaches the finest level."""
        return len(self.path) == len(self.full_path)

    def breadcrumb(self, sep: str = " › ") -> str:
        return "unknown item" if self.is_unknown else sep.join(p.label for p in self.path) or "uncertain"

    def to_dict(self) -> dict[str, Any]:
        return {"path": [asdict(p) for p in self.path], "full_path": [asdict(p) for p in self.full_path],
                "top_k": {k: [{"label": l, "probability": s} for l, s in v] for k, v in self.top_k.items()},
                "deepest_confident": asdict(self.path[-1]) if self.path else None, "is_unknown": self.is_unknown,
                "unknown_score": self.unknown_score, "allowed_mass": self.allowed_mass,
                "breadcrumb": self.breadcrumb()}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kw)


@dataclass(frozen=True)
class ItemError:
    """Stands in a batch result where one item failed; the others are still answered."""

    index: int
    error: Exception

    def __str__(self) -> str:
        return f"item {self.index}: {type(self.error).__name__}: {self.error}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "error": type(self.error).__name__, "message": str(self.error)}


class _View(NamedTuple):
    """What enroll / forget replace in one assignment, so a call sees all of one state or all of the next."""

    enrollment: Enrollment
    taxonomy: Taxonomy
    decoder: TreeDecoder
    stats: EmbeddingStats | None  # where the trained classes sit in the embedding (None: cannot enroll)


_MANIFEST = object()  # sentinel: "use the manifest's value"


def _image_list(images: Sequence[ImageSource]) -> list[ImageSource]:
    if isinstance(images, (str, bytes, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        raise TypeError("expected a sequence of images (a list of paths, bytes, PIL images or arrays); "
                        "classify() takes one image")
    return list(images)
# What a bad *input* may raise; anything else is a bug and propagates.
_ITEM_ERRORS = (HierfgError, ValueError, OSError, TypeError)


class Classifier:
    """Classify images with an exported hierfg model: `Classifier.load("out/onnx").classify("apple.jpg")`.

    No per-call state: one instance may be used from many threads (a runtime that is not thread-safe is
    behind a lock). `enroll` / `forget` swap in a new immutable `_View`; a call in flight keeps its own.
    """

    def __init__(self, backend: Backend, manifest: Manifest, directory: Path):
        self.manifest = manifest
        self.directory = directory
        self.base_taxonomy: Taxonomy = manifest.taxonomy  # the trained classes: what the model's outputs index
        self.input_size = int(manifest.input.size)
        self._backend = backend if backend.thread_safe else LockedBackend(backend)
        self._enroll_lock = threading.Lock()
        self._stats: EmbeddingStats | None = None
        self._set_enrollment(Enrollment())
        dec = manifest.decoding or {}
        try:
            self.thresholds = self._check_thresholds(dec.get("thresholds"))
            self.unknown_threshold = self._check_unknown(dec.get("unknown_threshold"))
            self.unknown_score_kind = str(dec.get("unknown_score", DEFAULT_UNKNOWN_SCORE))
            if self.unknown_score_kind not in UNKNOWN_SCORES:
                raise ValueError(f"unknown_score {self.unknown_score_kind!r} is not one of {sorted(UNKNOWN_SCORES)}")
        except ValueError as e:
            raise ModelIntegrityError(f"{directory}: manifest 'decoding' section is invalid: {e}; "
                                      "re-run `python -m sdk calibrate`") from None

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None, num_threads: int | None = None,
             enrollment: bool = True) -> "Classifier":
        """Load a model directory (artifact + manifest.json), or the manifest file itself.

        The artifact's size and sha256 are checked before any runtime parses it, then the runtime's output
        sizes against the taxonomy: `ModelNotFoundError` for a missing path, `ModelIntegrityError` for a
        failed check. Products enrolled beside the model (`enrolled.json`) are picked up unless
        `enrollment=False`; a corrupt or foreign file raises `EnrollmentFileError`.
        """
        path = Path(path)
        manifest = Manifest.load(path)
        directory = path if path.is_dir() else path.parent
        artifact = manifest.verify(directory)
        be = _BACKENDS.get(backend or manifest.target)(artifact, manifest, num_threads)
        clf = cls(be, manifest, directory)
        clf._check_outputs()
        clf._stats = EmbeddingStats.load(directory, manifest)
        clf._set_enrollment(load_enrollment(directory, manifest) if enrollment else Enrollment())
        return clf

    def _set_enrollment(self, enrollment: Enrollment) -> None:
        tax = enrollment.taxonomy(self.base_taxonomy)
        self._view = _View(enrollment, tax, TreeDecoder(tax), self._stats)

    @property
    def taxonomy(self) -> Taxonomy:
        """The label tree answers come from: the trained one plus the enrolled classes."""
        return self._view.taxonomy

    @property
    def enrolled(self) -> tuple[EnrolledClass, ...]:
        return self._view.enrollment.classes

    def _check_thresholds(self, thresholds: Sequence[float] | Mapping[str, float] | None) -> tuple[float, ...]:
        """Per-level thresholds as a sequence (coarsest first) or a {level name: threshold} mapping."""
        names = self.base_taxonomy.level_names
        if thresholds is None:
            return (0.0,) * len(names)
        if isinstance(thresholds, Mapping):
            extra = set(thresholds) - set(names)
            if extra:
                raise ValueError(f"thresholds name unknown levels {sorted(extra)}; levels are {names}")
            thresholds = [thresholds.get(n, 0.0) for n in names]
        try:
            t = tuple(float(x) for x in thresholds)
            ok = len(t) == len(names) and all(0.0 <= x <= 1.0 for x in t)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"thresholds must be {len(names)} numbers in [0, 1] (one per level {names}); "
                             f"got {thresholds!r}")
        return t

    @staticmethod
    def _check_unknown(value: Any) -> float | None:
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"unknown_threshold must be in [0, 1] (or None to disable); got {value}")
        return None if value is None else float(value)

    def _check_outputs(self) -> None:
        probe = np.zeros((1, self.input_size, self.input_size, 3), np.uint8)
        try:
            outs = self._backend.run(probe)
        except Exception as e:
            raise ModelIntegrityError(f"{self.directory}: the model failed on a probe input ({e})") from None
        sizes = [np.asarray(o).shape[-1] for o in outs]
        want = [*self.base_taxonomy.sizes, *([self.manifest.embedding["dim"]] if self.manifest.embedding else [])]
        if sizes != want:
            raise ModelIntegrityError(
                f"{self.directory}: model outputs have sizes {sizes}, the manifest says {want} (the taxonomy's "
                f"levels{', then the embedding' if self.manifest.embedding else ''})")

    def preprocess(self, image: ImageSource) -> np.ndarray:
        return prepare(image, self.input_size)

    def _run(self, batch: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The model's own per-level log-probs (float64) and its embeddings (None without that output)."""
        outs = self._backend.run(np.ascontiguousarray(batch, dtype=np.uint8))
        depth = self.base_taxonomy.depth
        emb = np.asarray(outs[depth], np.float32) if len(outs) > depth else None
        return [np.asarray(o, dtype=np.float64) for o in outs[:depth]], emb

    def logprobs(self, batch: np.ndarray, view: _View | None = None) -> list[np.ndarray]:
        """Per-level log-probabilities (float64) of a uint8 (N, S, S, 3) batch over `self.taxonomy` (the
        model's own, extended by the enrolled classes)."""
        lps, emb = self._run(batch)
        view = view or self._view
        return view.enrollment.extend(lps, emb, self.base_taxonomy, view.stats)

    def embeddings(self, batch: np.ndarray) -> np.ndarray:
        """(N, dim) float32 L2-normalized embeddings for a uint8 (N, S, S, 3) batch."""
        self._require_embedding()
        return normalize(self._run(batch)[1]).astype(np.float32)

    def embed(self, images: Sequence[ImageSource]) -> np.ndarray:
        """(N, dim) float32 L2-normalized embeddings of images; a bad image raises its error, naming its index."""
        return self.embeddings(self._prepare_all(images))

    def _require_embedding(self) -> None:
        if self.manifest.embedding is None:
            raise EmbeddingUnavailableError(
                f"{self.directory}: this model has no embedding output (exported before enrollment existed), so "
                "it cannot embed or enroll; re-export it with this hierfg version (`python -m converters` or "
                "`python -m quantize`). Classifying works as before.")

    @property
    def can_enroll(self) -> bool:
        """Does this model have what enrollment needs: the embedding output and its statistics?"""
        return self.manifest.embedding is not None and self._stats is not None

    def write_embedding_stats(self, images: Sequence[ImageSource], labels: Sequence[str], source: str = "",
                              batch: int = 32) -> dict[str, Any]:
        """Fit the embedding statistics enrollment needs from training photos and their fine labels, and
        save them atomically beside the model (`embedding_stats-<sha256[:12]>.npz`, declared in the manifest).
        Refused while products are enrolled (their prototypes live in the old statistics' space)."""
        self._require_embedding()
        tax, leaf = self.base_taxonomy, self.base_taxonomy.depth - 1
        images, labels = _image_list(images), list(labels)
        if len(images) != len(labels) or len(images) < 2:
            raise ValueError(f"need at least 2 photos, one label each; got {len(images)} photos, {len(labels)} labels")
        unknown = sorted(set(labels) - set(tax.names(leaf)))
        if unknown:
            raise ValueError(f"labels that are not trained {tax.level_names[leaf]!r} classes: {unknown[:5]}")
        with self._enroll_lock:
            if self._view.enrollment.classes:
                raise EnrollmentError("forget the enrolled products first: their prototypes live in the space of "
                                      "the current statistics")
            y = np.array([tax.index(leaf, n) for n in labels])
            embs, ys = [], []
            for i in range(0, len(images), batch):
                views, photo = mirror_views(self._prepare_all(images[i:i + batch]))
                embs.append(self._run(views)[1])
                ys.append(y[i + photo])
            ys = np.concatenate(ys)
            stats = EmbeddingStats.fit(np.concatenate(embs), ys, tax.sizes[-1])
            # a new file under a new name, then the manifest, then the old file goes: a kill at any moment
            # leaves a manifest whose statistics file exists and matches
            data = stats.to_bytes()
            digest = hashlib.sha256(data).hexdigest()
            name = f"{Path(STATS_NAME).stem}-{digest[:12]}.npz"
            old = (self.manifest.embedding.get("stats") or {}).get("file")
            atomic_write(self.directory / name, data)
            rec = {"file": name, "sha256": digest, "photos": len(images), "views": int(len(ys)),
                   "classes": int((stats.counts > 0).sum()), "rank": int(stats.basis.shape[1]),
                   **({"data": source} if source else {})}
            self.manifest.embedding = {**self.manifest.embedding, "stats": rec}
            self.manifest.save(self.directory)
            if (self.directory / ENROLLMENT_NAME).exists():  # empty now: bind it to the new statistics
                save_enrollment(self.directory, self.manifest, self._view.enrollment)
            if old and old != name and Path(old).name == old:
                (self.directory / old).unlink(missing_ok=True)
            self._stats = stats
            self._set_enrollment(self._view.enrollment)
        return rec

    def _prepare_all(self, images: Sequence[ImageSource]) -> np.ndarray:
        arrays = []
        for i, image in enumerate(_image_list(images)):
            try:
                arrays.append(self.preprocess(image))
            except HierfgError as e:
                raise type(e)(f"image {i}: {e}") from e
        if not arrays:
            raise ValueError("no images given")
        return np.stack(arrays)

    def enroll(self, label: str, parent: str, images: Sequence[ImageSource], save: bool = True) -> EnrolledClass:
        """Add a product as a new leaf under `parent` (a node name at the level above the leaves, or
        `level:name`) from its photos (at least 2; 5-10 recommended). Answers include it at once; with
        `save` it is also written atomically to `enrolled.json`, which `Classifier.load` picks up. Raises
        `EmbeddingUnavailableError` (no embedding output) or `EnrollmentError` (unknown parent, label in use,
        no embedding statistics)."""
        self._require_embedding()
        parent = validate_request(label, parent, self.base_taxonomy, self._view.enrollment)
        batch = self._prepare_all(images)
        if len(batch) < MIN_PHOTOS:
            # one photo gives no leave-one-out check of how a new photo of it scores; measured leave-classes-out,
            # one photo is right 40-53 % of the time, five 79-85 % (research/enrollment.py)
            raise EnrollmentError(f"enrolling {label!r} needs at least {MIN_PHOTOS} photos (5-10 recommended); "
                                  f"got {len(batch)}")
        stats = self._stats
        if stats is None:
            raise EnrollmentError(
                f"{self.directory}: this model has no embedding statistics ({STATS_NAME}), which enrollment "
                "compares new products in; write them once from the photos it was trained on: "
                f"`python -m sdk embedding-stats --model {self.directory} --data DATASET`")
        views, photo = mirror_views(batch)
        cls = fit_class(label, parent, self._run(views)[1], photo, stats, self.base_taxonomy)
        with self._enroll_lock:
            if self._stats is not stats:  # rewritten meanwhile: the prototype lives in the old space
                raise EnrollmentError("the embedding statistics were rewritten while enrolling; enroll again")
            enrollment = self._view.enrollment
            validate_request(label, parent, self.base_taxonomy, enrollment)  # another thread may have taken it
            self._commit(enrollment.with_class(cls), save)
        return cls

    def forget(self, label: str, save: bool = True) -> None:
        """Remove an enrolled class (trained classes cannot be forgotten: `EnrollmentError`)."""
        with self._enroll_lock:
            if label in self.base_taxonomy.names(self.base_taxonomy.depth - 1):
                raise EnrollmentError(f"{label!r} is a trained class, not an enrolled one; only enrolled classes "
                                      "can be forgotten (use deny=[...] to exclude a trained one from answers)")
            self._commit(self._view.enrollment.without(label), save)

    def _commit(self, enrollment: Enrollment, save: bool) -> None:
        if save:  # the file first: if writing fails, memory still matches what is on disk
            save_enrollment(self.directory, self.manifest, enrollment)
        self._set_enrollment(enrollment)

    def leaf_mask(self, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None) -> np.ndarray | None:
        """Leaves an answer may end in, for node names in `allow` / `deny` (see `TreeDecoder.leaf_mask`)."""
        return self._view.decoder.leaf_mask(allow, deny)

    def _decode_batch(self, lps: list[np.ndarray], top_k: int, thresholds: tuple[float, ...],
                      unknown_threshold: float | None, mask: np.ndarray | None, view: _View,
                      ) -> list[HierarchicalPrediction | ModelOutputError]:
        tax, dec = view.taxonomy, view.decoder
        leaf, errors = dec.leaf_probs(lps)
        marg = dec.node_sums(leaf)
        unk = unknown_scores(self.unknown_score_kind, leaf, marg)  # on the unrestricted distribution
        allowed_mass, keep = np.ones(len(leaf)), None
        if mask is not None:
            allowed_mass = leaf[:, mask].sum(axis=1)
            masked, masked_errors = dec.leaf_probs(lps, mask)
            errors = {**masked_errors, **errors}
            marg = dec.node_sums(masked)
            keep = [s[0] > 0 for s in dec.node_sums(mask[None].astype(float))]  # nodes with an allowed leaf
        out: list[HierarchicalPrediction | ModelOutputError] = []
        for row in range(len(leaf)):
            if row in errors:
                out.append(errors[row])
                continue
            full = tuple(LevelPrediction(tax.level_names[l], i, tax.node(l, i).name, float(marg[l][row, i]))
                         for l, i in enumerate(dec.greedy_path(marg, row)))
            # back-off: the answer stops above the first level whose marginal is under its threshold
            kept = next((l for l, (p, t) in enumerate(zip(full, thresholds)) if p.probability < t), len(full))
            topk = {}
            for l, name in enumerate(tax.level_names):
                cand = np.argsort(-marg[l][row], kind="stable")
                if keep is not None:
                    cand = cand[keep[l][cand]]
                topk[name] = tuple((tax.node(l, int(i)).name, float(marg[l][row, i])) for i in cand[:top_k])
            is_unknown = unknown_threshold is not None and float(unk[row]) > unknown_threshold
            out.append(HierarchicalPrediction(() if is_unknown else full[:kept], full, topk, is_unknown,
                                              float(unk[row]), float(allowed_mass[row]), tax))
        return out

    def classify(self, image: ImageSource, top_k: int = 5,
                 thresholds: Sequence[float] | Mapping[str, float] | None = None,
                 allow: Iterable[str] | None = None, deny: Iterable[str] | None = None,
                 unknown_threshold: Any = _MANIFEST) -> HierarchicalPrediction:
        """Classify one image (path, bytes, PIL image, or uint8 HxWx3 RGB array).

        `thresholds`: per-level back-off thresholds (default: the manifest's calibrated ones, else 0).
        `allow` / `deny`: node names (any level, or `level:name`) the answer must / must not end under;
        the distribution is renormalized over the allowed leaves. `unknown_threshold`: out-of-catalogue
        cut-off (default: the manifest's; None disables). Raises the input's error or `ModelOutputError`.
        """
        return self.classify_batch([image], top_k, thresholds, allow, deny, unknown_threshold,  # type: ignore
                                   raise_errors=True)[0]

    def classify_batch(self, images: Sequence[ImageSource], top_k: int = 5,
                       thresholds: Sequence[float] | Mapping[str, float] | None = None,
                       allow: Iterable[str] | None = None, deny: Iterable[str] | None = None,
                       unknown_threshold: Any = _MANIFEST, raise_errors: bool = False,
                       batch_size: int = 16) -> list[HierarchicalPrediction | ItemError]:
        """Classify many images, `batch_size` at a time. A bad item (undecodable, or NaN model output)
        yields an `ItemError` naming its index and the rest are answered; `raise_errors=True` raises
        the first such error instead. Options as in `classify`."""
        images = _image_list(images)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer; got {top_k!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        th = self._check_thresholds(thresholds) if thresholds is not None else self.thresholds
        ut = self.unknown_threshold if unknown_threshold is _MANIFEST else self._check_unknown(unknown_threshold)
        view = self._view  # one view for the whole call, whatever enroll / forget do meanwhile
        mask = view.decoder.leaf_mask(allow, deny)
        results: list[HierarchicalPrediction | ItemError | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            arrays: dict[int, np.ndarray] = {}  # item index -> model input
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    arrays[i] = self.preprocess(images[i])
                except _ITEM_ERRORS as e:
                    if raise_errors:
                        raise
                    results[i] = ItemError(i, e)
            if arrays:
                lps = self.logprobs(np.stack(list(arrays.values())), view)
                for i, d in zip(arrays, self._decode_batch(lps, top_k, th, ut, mask, view)):
                    if isinstance(d, ModelOutputError) and raise_errors:
                        raise d
                    results[i] = ItemError(i, d) if isinstance(d, ModelOutputError) else d
        return results  # type: ignore[return-value]
