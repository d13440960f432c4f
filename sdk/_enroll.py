"""Few-shot enrollment: new fine classes from a handful of photos, on the device, without retraining.

A new product becomes a prototype (the renormalized mean of its photos' embeddings, each photo with its
mirror image) and a leaf under an existing parent at the deepest level. It is compared in the
`EmbeddingStats` space (the L2-normalized embedding, centred on the training photos' mean and whitened
against the spread within the trained classes), where each trained class is its mean direction. For a photo x,

    d_j(x) = SHARPNESS * (cos(x, prototype_j) - max_c cos(x, mean_c) - MARGIN)

are the log-odds of enrolled class j against the trained model's answer as a whole: class j takes the share
e^d_j / (1 + sum_k e^d_k) at every level of its lineage, every trained node keeps its probability times
1 / (1 + sum_k e^d_k). Every level still sums to one, so the extended tree decodes like the trained one.

Measured leave-classes-out on Grocery (research/enrollment.py): 5 photos per class enrol at 79-85 % fine
top-1 while the other classes lose 0.6-0.9 pt; comparing only with the parent's own trained children caps
them near 70 %, because the model sends a fifth of an unseen product's photos to another parent.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import EnrollmentError, EnrollmentFileError, ModelIntegrityError
from ._files import atomic_write, json_sha256, sha256_file
from ._manifest import Manifest
from ._taxonomy import Node, Taxonomy

ENROLLMENT_NAME = "enrolled.json"
ENROLLMENT_FORMAT = "hierfg.enrollment/2"
STATS_NAME = "embedding_stats.npz"
SHARPNESS = 50.0  # nats per unit of cosine margin (research/enrollment.py measures 20-100 alike)
MARGIN = 0.0  # cosine margin the prototype must win by: 0 is nearest-class-mean
STATS_RANK = 128  # whitened directions kept (a 1280-wide embedding: 0.6 MB of float32)
STATS_SHRINK = 0.5  # within-class covariance + SHRINK * its mean eigenvalue
MIN_PHOTOS = 2  # Classifier.enroll refuses fewer (one photo has no leave-one-out check)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class EmbeddingStats:
    """Where the trained classes sit in the embedding: the space enrolled prototypes are compared in."""

    mean: np.ndarray  # (dim,) mean of the training photos' normalized embeddings
    basis: np.ndarray  # (dim, rank) strongest within-class directions
    gain: np.ndarray  # (rank,) factor - 1 along each: sqrt(lam / (eigenvalue + lam)) - 1
    class_means: np.ndarray  # (n_trained, dim) unit mean direction of each trained class in the space
    counts: np.ndarray  # (n_trained,) photos behind each mean; 0: the class had none (never compared)

    def space(self, embeddings: np.ndarray) -> np.ndarray:
        """Unit vectors of the whitened, centred space for (N, dim) embeddings."""
        z = normalize(embeddings) - self.mean
        return normalize(z + ((z @ self.basis) * self.gain) @ self.basis.T)

    def trained_cosines(self, z: np.ndarray) -> np.ndarray:
        """(N, n_trained) cosine of each space vector to every trained class mean (-inf: a class without one)."""
        cos = z @ self.class_means.T
        cos[:, self.counts == 0] = -np.inf
        return cos

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, n_classes: int, rank: int = STATS_RANK,
            shrink: float = STATS_SHRINK) -> "EmbeddingStats":
        """From (N, dim) embeddings of training photos and their (N,) fine class indices (checked by the caller,
        `Classifier.write_embedding_stats`)."""
        x = normalize(embeddings)
        labels = np.asarray(labels, np.int64)
        counts = np.bincount(labels, minlength=n_classes)
        raw = np.zeros((n_classes, x.shape[1]))
        np.add.at(raw, labels, x)
        raw /= np.maximum(counts, 1)[:, None]
        within = x - raw[labels]
        cov = within.T @ within / len(x)
        lam = shrink * float(np.trace(cov)) / cov.shape[0] + 1e-12
        values, vectors = np.linalg.eigh(cov)
        rank = min(rank, cov.shape[0])
        basis, values = vectors[:, ::-1][:, :rank], np.maximum(values[::-1][:rank], 0.0)
        stats = cls(x.mean(0), basis, np.sqrt(lam / (values + lam)) - 1.0, np.zeros_like(raw), counts)
        z = stats.space(x)
        means = np.zeros_like(raw)
        np.add.at(means, labels, z)
        means[counts > 0] = normalize(means[counts > 0])
        return cls(stats.mean, basis, stats.gain, means, counts)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype("<f4"), basis=self.basis.astype("<f4"), gain=self.gain.astype("<f4"),
                 class_means=self.class_means.astype("<f4"), counts=self.counts.astype("<i8"))
        return buf.getvalue()

    @classmethod
    def load(cls, directory: str | os.PathLike, manifest: Manifest) -> "EmbeddingStats | None":
        """The statistics the manifest declares (None when it declares none); a missing, altered or
        malformed file raises `ModelIntegrityError`."""
        rec = (manifest.embedding or {}).get("stats")
        if rec is None:
            return None
        name = str(rec.get("file", STATS_NAME))
        if Path(name).name != name:
            raise ModelIntegrityError(f"manifest names embedding statistics {name!r} outside the model directory")
        path = Path(directory) / name
        if not path.is_file():
            raise ModelIntegrityError(f"{path}: the embedding statistics the manifest declares are missing; "
                                      "rewrite them with `python -m sdk embedding-stats`")
        if sha256_file(path) != rec.get("sha256"):
            raise ModelIntegrityError(f"{path}: sha256 does not match the manifest's (changed after it was written); "
                                      "rewrite it with `python -m sdk embedding-stats`")
        dim, n = int(manifest.embedding["dim"]), manifest.taxonomy.sizes[-1]
        try:
            with np.load(path, allow_pickle=False) as f:
                a = {k: f[k] for k in ("mean", "basis", "gain", "class_means", "counts")}
        except (OSError, ValueError, KeyError) as e:
            raise ModelIntegrityError(f"{path}: not readable as embedding statistics ({e})") from None
        r = a["gain"].shape[0] if a["gain"].ndim == 1 else -1
        shapes_ok = (a["mean"].shape == (dim,) and a["basis"].shape == (dim, r) and a["class_means"].shape == (n, dim)
                     and a["counts"].shape == (n,))
        if not shapes_ok or not all(np.isfinite(a[k]).all() for k in ("mean", "basis", "gain", "class_means")) \
                or not (a["counts"] > 0).any():
            raise ModelIntegrityError(f"{path}: embedding statistics do not fit this model ({dim}-wide embedding, "
                                      f"{n} trained classes) or are not finite")
        return cls(*(a[k].astype(np.float64) for k in ("mean", "basis", "gain", "class_means")),
                   a["counts"].astype(np.int64))


@dataclass(frozen=True)
class EnrolledClass:
    label: str
    parent: str  # name of a node at the level above the leaves
    prototype: np.ndarray  # (embedding dim,) unit vector in the EmbeddingStats space, float32
    scale: float  # SHARPNESS when enrolled
    bias: float  # -SHARPNESS * MARGIN when enrolled
    n_photos: int
    created: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "parent": self.parent, "n_photos": self.n_photos, "scale": self.scale,
                "bias": self.bias, "created": self.created, "calibration": self.calibration,
                "prototype": base64.b64encode(np.asarray(self.prototype, "<f4").tobytes()).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict[str, Any], dim: int) -> "EnrolledClass":
        proto = np.frombuffer(base64.b64decode(d["prototype"], validate=True), "<f4").astype(np.float32)
        if proto.shape != (dim,) or not np.isfinite(proto).all() or abs(float(np.linalg.norm(proto)) - 1) > 1e-3:
            raise ValueError(f"class {d.get('label')!r}: prototype is not a finite unit vector of {dim} numbers")
        scale, bias = float(d["scale"]), float(d["bias"])
        if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
            raise ValueError(f"class {d.get('label')!r}: scale {scale} / bias {bias} are not usable")
        return cls(str(d["label"]), str(d["parent"]), proto, scale, bias, int(d["n_photos"]), str(d.get("created", "")),
                   dict(d.get("calibration", {})))


def fit_class(label: str, parent: str, views: np.ndarray, photo_of_view: np.ndarray, stats: EmbeddingStats,
              base: Taxonomy) -> EnrolledClass:
    """Prototype of a new class and what it measures on its own photos.

    `views`: (n_views, dim) embeddings of the photos and their mirror images; `photo_of_view` says which
    photo each view is of. How a *new* photo of the product will score is estimated leave-one-out: each
    view against the prototype of the other photos (the in-sample cosine would flatter it).
    """
    z = stats.space(views)
    photos = np.unique(photo_of_view)
    proto = normalize(z.mean(0))
    if len(photos) > 1:
        total = z.sum(0)
        own = (z * normalize(np.stack([total - z[photo_of_view == p].sum(0) for p in photo_of_view]))).sum(1)
    else:
        own = z @ proto
    cos = stats.trained_cosines(z)
    nearest = cos.argmax(1)
    m = own - cos.max(1) - MARGIN
    leaf = base.depth - 1
    rivals = {base.node(leaf, int(c)).name: int(k) for c, k in zip(*np.unique(nearest, return_counts=True))}
    calibration = {
        "views": int(len(z)),
        # leave-one-out: how far each view is nearer its own prototype than the nearest trained class
        "own_margin_mean": float(m.mean()), "own_margin_min": float(m.min()),
        "own_wins": float((m > 0).mean()),  # share of views it would win once enrolled
        # the trained classes its photos are nearest to, with view counts: the products it will be told from
        "nearest_trained": dict(sorted(rivals.items(), key=lambda kv: -kv[1])[:3]),
    }
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return EnrolledClass(label, parent, proto.astype(np.float32), SHARPNESS, -SHARPNESS * MARGIN, int(len(photos)),
                         created, calibration)


@dataclass(frozen=True)
class Enrollment:
    """The enrolled classes of one model, in enrollment order (immutable: enroll / forget make a new one)."""

    classes: tuple[EnrolledClass, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    def with_class(self, cls: EnrolledClass) -> "Enrollment":
        return Enrollment((*self.classes, cls))

    def without(self, label: str) -> "Enrollment":
        if label not in self.labels:
            raise EnrollmentError(f"no enrolled class named {label!r}; enrolled: {self.labels or 'none'}")
        return Enrollment(tuple(c for c in self.classes if c.label != label))

    def taxonomy(self, base: Taxonomy) -> Taxonomy:
        """`base` with every enrolled class appended, in order, at the deepest level under its parent."""
        if not self.classes:
            return base
        leaf, up = base.depth - 1, base.depth - 2
        levels = [[base.node(l, i) for i in range(n)] for l, n in enumerate(base.sizes)]
        levels[leaf] += [Node(c.label, base.index(up, c.parent)) for c in self.classes]
        return Taxonomy(base.level_names, levels)

    def extend(self, logprobs: list[np.ndarray], embeddings: np.ndarray | None, base: Taxonomy,
               stats: EmbeddingStats | None) -> list[np.ndarray]:
        """Per-level log-probs of the extended tree (`base` + the enrolled classes, module docstring).
        Without enrolled classes the model's log-probs come back unchanged."""
        if not self.classes:
            return logprobs
        if stats is None or embeddings is None:
            raise EnrollmentError("enrolled classes need the model's embedding and its embedding statistics")
        z = stats.space(embeddings)
        protos = np.stack([c.prototype for c in self.classes]).astype(np.float64)
        scale, bias = (np.array([getattr(c, k) for c in self.classes]) for k in ("scale", "bias"))
        d = (z @ protos.T - stats.trained_cosines(z).max(1, keepdims=True)) * scale + bias
        with np.errstate(invalid="ignore"):  # a NaN row stays NaN: the decoder refuses it per item
            top = np.maximum(d.max(1, keepdims=True), 0.0)
            norm = np.log(np.exp(-top) + np.exp(d - top).sum(1, keepdims=True)) + top
            keep, share = -norm, d - norm  # log 1 / (1 + sum e^d), log e^d_j / (1 + sum e^d)
        up = base.depth - 2
        lineage = [base.ancestors(up, base.index(up, c.parent)) for c in self.classes]  # per level, root first
        out = []
        for level, lp in enumerate(logprobs[:-1]):
            lp = np.asarray(lp, np.float64) + keep
            for j, nodes in enumerate(lineage):
                lp[:, nodes[level]] = np.logaddexp(lp[:, nodes[level]], share[:, j])
            out.append(lp)
        out.append(np.concatenate([np.asarray(logprobs[-1], np.float64) + keep, share], axis=1))
        return out


def validate_request(label: str, parent: str, base: Taxonomy, enrollment: Enrollment) -> str:
    """The parent's name at the level above the leaves; EnrollmentError naming what is wrong."""
    if not isinstance(label, str) or not label.strip() or label != label.strip():
        raise EnrollmentError(f"label must be a non-empty name without surrounding spaces; got {label!r}")
    leaf, up = base.depth - 1, base.depth - 2
    if base.depth < 2:
        raise EnrollmentError("enrollment needs a taxonomy of at least two levels (a parent for the new leaf)")
    if label in base.names(leaf) or label in enrollment.labels:
        raise EnrollmentError(f"a {base.level_names[leaf]!r} class named {label!r} already exists; choose another "
                              "label, or forget the enrolled one first")
    name = parent.split(":", 1)[1] if parent.startswith(f"{base.level_names[up]}:") else parent
    if name not in base.names(up):
        raise EnrollmentError(f"no {base.level_names[up]!r} node named {parent!r} to enroll under; the "
                              f"{base.level_names[up]!r} level has: {', '.join(base.names(up))}")
    return name


# ---- the enrollment file ----------------------------------------------------------------------------
def save_enrollment(directory: str | os.PathLike, manifest: Manifest, enrollment: Enrollment) -> Path:
    """Write `enrolled.json` atomically: bound to the model's sha256, its embedding statistics (the
    prototypes live in their space) and dimension, hashed over its content."""
    payload = {"format": ENROLLMENT_FORMAT, "model_sha256": manifest.sha256, "taxonomy_hash": manifest.taxonomy.hash,
               "embedding_dim": int(manifest.embedding["dim"]) if manifest.embedding else 0,
               "stats_sha256": stats_sha256(manifest),
               "classes": [c.to_dict() for c in enrollment.classes]}
    doc = {**payload, "sha256": json_sha256(payload)}
    return atomic_write(Path(directory) / ENROLLMENT_NAME, json.dumps(doc, indent=1, ensure_ascii=False))


def load_enrollment(directory: str | os.PathLike, manifest: Manifest) -> Enrollment:
    """The enrolled classes beside a model (none when there is no file). A file that is corrupt, altered
    after it was written, or made for another model is refused with `EnrollmentFileError`."""
    path = Path(directory) / ENROLLMENT_NAME
    if not path.exists():
        return Enrollment()
    redo = (f"; move {path.name} away (and re-enroll the products) or restore the file it replaced "
            "— it is never used as it is")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EnrollmentFileError(f"{path}: not readable as JSON ({e}){redo}") from None
    if not isinstance(doc, dict) or doc.get("format") != ENROLLMENT_FORMAT:
        raise EnrollmentFileError(f"{path}: not a {ENROLLMENT_FORMAT} file{redo}")
    payload = {k: v for k, v in doc.items() if k != "sha256"}
    if doc.get("sha256") != json_sha256(payload):
        raise EnrollmentFileError(f"{path}: content hash mismatch (the file was changed or damaged after it was "
                                  f"written){redo}")
    if payload.get("model_sha256") != manifest.sha256 or payload.get("taxonomy_hash") != manifest.taxonomy.hash:
        raise EnrollmentFileError(
            f"{path}: made for another model (sha256 {str(payload.get('model_sha256'))[:12]}…, this model is "
            f"{manifest.sha256[:12]}…); embeddings of different models are not comparable{redo}")
    if manifest.embedding is None or payload.get("embedding_dim") != manifest.embedding["dim"]:
        raise EnrollmentFileError(f"{path}: embedding width {payload.get('embedding_dim')} does not match the "
                                  f"model's {(manifest.embedding or {}).get('dim')}{redo}")
    if payload.get("classes") and payload.get("stats_sha256") != stats_sha256(manifest):
        raise EnrollmentFileError(f"{path}: made with other embedding statistics than the model's (rewritten "
                                  f"since?); its prototypes live in their space{redo}")
    enrollment = Enrollment()
    try:
        for d in payload["classes"]:
            cls = EnrolledClass.from_dict(d, int(manifest.embedding["dim"]))
            validate_request(cls.label, cls.parent, manifest.taxonomy, enrollment)
            enrollment = enrollment.with_class(cls)
    except (KeyError, TypeError, ValueError) as e:  # EnrollmentError is a ValueError
        raise EnrollmentFileError(f"{path}: invalid class entry ({type(e).__name__}: {e}){redo}") from None
    return enrollment


def stats_sha256(manifest: Manifest) -> str:
    return str(((manifest.embedding or {}).get("stats") or {}).get("sha256", ""))


def mirror_views(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each uint8 (N, S, S, 3) photo and its mirror image, and the photo index of every view: a product
    looks the same mirrored, and the extra view steadies a prototype made from very few photos."""
    views = np.concatenate([batch, batch[:, :, ::-1]])
    return np.ascontiguousarray(views), np.concatenate([np.arange(len(batch))] * 2)
