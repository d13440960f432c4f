"""Few-shot enrollment: new fine classes from a handful of photos, on the device, without retraining.

A new product becomes a prototype (the renormalized mean of its photos' descriptors) and a leaf
appended under an existing parent at the deepest level. A photo's descriptor joins, with equal weight,
two unit vectors the model already computes: its L2-normalized embedding (the pooled head conv) and the
square root of its fine-level distribution over the trained classes (cosine = Bhattacharyya coefficient).
The second is what tells a new product from its trained siblings: a sibling's photos put their mass on
that sibling, the new product's photos spread it in their own characteristic way. Measured leave-classes-
out on Grocery (research/enrollment.py), 5-shot prototypes separate the held-out classes' photos from
their siblings' with ROC AUC 0.94 on the joint descriptor against 0.86 on the embedding alone.
For a photo x, its log-odds against the parent's trained children taken together are

    d(x) = scale * cos(x, prototype) + bias,

and the new leaf takes that share of the fine-level mass the model gives the parent's subtree: with
enrolled classes j under a parent of trained mass M(x), the new leaf j gets M * e^d_j / (1 + sum e^d),
the trained siblings keep theirs times 1 / (1 + sum e^d). Every parent's mass is unchanged, so the
coarser levels' marginals and every answer under another parent are exactly what they were, and the
extended tree is decoded like the trained one (tree-consistent, back-off, unknown).

The scale and bias are fitted on the enrollment photos themselves. How a *new* photo of the product
scores is estimated by each photo's leave-one-out cosine to the prototype of the other photos (mean c,
spread s, floored at MIN_SPREAD; the in-sample cosine would flatter it). The temperature is s:
`scale = SHARPNESS / s` nats per unit of cosine, so a photo one spread less like the product loses
SHARPNESS nats whatever the embedding's geometry. The tie with the trained siblings (d = 0) sits at
tau = c - TIE_SPREADS * s: a photo as close as the product's own photos is the new product at odds
e^(SHARPNESS * TIE_SPREADS), one clearly farther stays a trained sibling. What this gives on the
enrollment photos — the new class's score against the best trained class's, how often it wins, how
much of the fine mass the model gives the parent — is measured and kept in the `calibration` record.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import EnrollmentError, EnrollmentFileError
from ._files import atomic_write, json_sha256
from ._manifest import Manifest
from ._taxonomy import Node, Taxonomy

ENROLLMENT_NAME = "enrolled.json"
ENROLLMENT_FORMAT = "hierfg.enrollment/1"
SHARPNESS = 1.5  # nats per spread of the own leave-one-out cosines (research/enrollment.py measures it)
TIE_SPREADS = 2.0  # the tie with the trained classes sits this many spreads below the own mean cosine
MIN_PHOTOS = 2  # leave-one-out needs two; Classifier.enroll refuses fewer
MIN_SPREAD = 0.03  # floor of the spread: a few photos under-estimate it (and one photo has none)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class EnrolledClass:
    label: str
    parent: str  # name of a node at the level above the leaves
    prototype: np.ndarray  # (embedding dim + trained fine classes,) unit descriptor vector, float32
    scale: float
    bias: float
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


def descriptor(embeddings: np.ndarray, trained_fine: np.ndarray) -> np.ndarray:
    """Unit descriptors: [normalized embedding, sqrt of the fine distribution] / sqrt 2 (module docstring)."""
    prob = np.sqrt(np.exp(np.asarray(trained_fine, np.float64)))
    return normalize(np.hstack([normalize(embeddings), normalize(prob)]))


def parent_mass(fine: np.ndarray, siblings: np.ndarray) -> np.ndarray:
    """log of the fine-level mass of the trained children of a parent, per row."""
    with np.errstate(invalid="ignore"):  # a NaN row stays NaN: the decoder refuses it per item
        return np.logaddexp.reduce(np.asarray(fine, np.float64)[:, siblings], axis=1)


def fit_class(label: str, parent: str, views: np.ndarray, photo_of_view: np.ndarray, trained_fine: np.ndarray,
              siblings: np.ndarray, sharpness: float = SHARPNESS, tie_spreads: float = TIE_SPREADS) -> EnrolledClass:
    """Prototype and calibrated (scale, bias) of a new class.

    `views`: (n_views, dim) embeddings of the photos and their mirror images; `photo_of_view` says which
    photo each view is of (leave-one-out leaves a photo out with its mirror); `trained_fine`: (n_views,
    n_trained) fine log-probs the model gives the same views; `siblings`: the parent's trained fine classes.
    """
    e = descriptor(views, trained_fine)
    photos = np.unique(photo_of_view)
    proto = normalize(e.mean(0))
    if len(photos) > 1:
        # how a *new* photo of the product scores: each view against the prototype of the other photos
        total = e.sum(0)
        own = np.stack([total - e[photo_of_view == p].sum(0) for p in photo_of_view])
        cos = (e * normalize(own)).sum(1)
    else:
        cos = (e * proto).sum(1)  # one photo: its views only (optimistic; the spread floor does the rest)
    spread = max(float(cos.std()), MIN_SPREAD)
    tau = float(cos.mean()) - tie_spreads * spread
    scale = sharpness / spread
    bias = -scale * tau
    trained_best = trained_fine.max(1)
    mass = parent_mass(trained_fine, siblings)
    d = scale * cos + bias
    share = -np.logaddexp(0.0, d)  # log 1 / (1 + e^d): what the trained siblings keep
    own_scores = mass + d + share  # the new class's fine log-prob on its own (held-out) photos
    extended = np.array(trained_fine, np.float64)
    extended[:, siblings] += share[:, None]  # the trained classes once the new one takes its share
    calibration = {
        "views": int(len(e)), "own_cosine_mean": float(cos.mean()), "own_cosine_spread": spread, "tie_cosine": tau,
        "own_score_mean": float(own_scores.mean()), "trained_best_mean": float(trained_best.mean()),
        "trained_best_min": float(trained_best.min()), "trained_best_max": float(trained_best.max()),
        # > 0: on its own photos the new class outscores the best trained class by this many nats on average
        "own_minus_trained_mean": float((own_scores - trained_best).mean()),
        # how often it beats every trained class on its own photos once enrolled
        "own_wins": float((own_scores > extended.max(1)).mean()),
        # share of the fine mass the model gives the parent on these photos: low means the model puts the
        # product under another parent, where the new leaf cannot win
        "parent_mass_mean": float(np.exp(mass).mean()),
    }
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return EnrolledClass(label, parent, proto.astype(np.float32), float(scale), float(bias), int(len(photos)),
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

    def extend(self, logprobs: list[np.ndarray], embeddings: np.ndarray | None, base: Taxonomy) -> list[np.ndarray]:
        """Per-level log-probs of the extended tree (`base` + the enrolled classes): each enrolled score
        (module docstring) appended to the fine level, which is renormalized. Without enrolled classes the
        model's log-probs come back unchanged."""
        if not self.classes:
            return logprobs
        trained = np.asarray(logprobs[-1], np.float64)
        protos = np.stack([c.prototype for c in self.classes]).astype(np.float64)
        d = descriptor(embeddings, trained) @ protos.T * np.array([c.scale for c in self.classes]) \
            + np.array([c.bias for c in self.classes])
        fine = np.concatenate([trained, np.zeros_like(d)], axis=1)
        for parent in dict.fromkeys(c.parent for c in self.classes):
            mine = [j for j, c in enumerate(self.classes) if c.parent == parent]
            sib = siblings(base, parent)
            with np.errstate(invalid="ignore"):  # a NaN row stays NaN: the decoder refuses it per item
                keep = -np.logaddexp.reduce(np.concatenate([np.zeros((len(d), 1)), d[:, mine]], axis=1), axis=1)
                fine[:, sib] += keep[:, None]
                fine[:, trained.shape[1] + np.asarray(mine)] = (parent_mass(trained, sib) + keep)[:, None] + d[:, mine]
        return [*logprobs[:-1], fine]


def siblings(base: Taxonomy, parent: str) -> np.ndarray:
    """The trained leaves under `parent` (a node at the level above the leaves)."""
    up = base.depth - 2
    return np.asarray(base.children(up, base.index(up, parent)), np.int64)


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
    """Write `enrolled.json` atomically: bound to the model's sha256 and dimension, hashed over its content."""
    payload = {"format": ENROLLMENT_FORMAT, "model_sha256": manifest.sha256, "taxonomy_hash": manifest.taxonomy.hash,
               "embedding_dim": int(manifest.embedding["dim"]) if manifest.embedding else 0,
               "descriptor_dim": descriptor_dim(manifest),
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
    enrollment = Enrollment()
    try:
        for d in payload["classes"]:
            cls = EnrolledClass.from_dict(d, descriptor_dim(manifest))
            validate_request(cls.label, cls.parent, manifest.taxonomy, enrollment)
            enrollment = enrollment.with_class(cls)
    except (KeyError, TypeError, ValueError) as e:  # EnrollmentError is a ValueError
        raise EnrollmentFileError(f"{path}: invalid class entry ({type(e).__name__}: {e}){redo}") from None
    return enrollment


def descriptor_dim(manifest: Manifest) -> int:
    return int(manifest.embedding["dim"]) + manifest.taxonomy.sizes[-1] if manifest.embedding else 0


def mirror_views(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each uint8 (N, S, S, 3) photo and its mirror image, and the photo index of every view: a product
    looks the same mirrored, and the extra view steadies a prototype made from very few photos."""
    views = np.concatenate([batch, batch[:, :, ::-1]])
    return np.ascontiguousarray(views), np.concatenate([np.arange(len(batch))] * 2)
